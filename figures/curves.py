"""Training curves from the TensorBoard event files of a run, drawn without TensorBoard running.

Dassl's TrainerX writes, every iteration, `train/<key>` for each entry of the summary that
forward_backward returns (the running mean over the current epoch, as its log line shows) and
`train/lr`; our trainers return `loss`, `acc` and, with a RAda head, `mask_penalty`
(max |M - 1| averaged over the batch, the regulariser that TRAINER.RADA.ALPHA weighs).
"""

from pathlib import Path

from matplotlib.ticker import MaxNLocator

from .style import OKABE_ITO, new_figure, save, styled

PANELS = (
    ("train/loss", "loss", OKABE_ITO["blue"]),
    ("train/acc", "training accuracy (%)", OKABE_ITO["green"]),
    ("train/lr", "learning rate", OKABE_ITO["orange"]),
    ("train/mask_penalty", "mask penalty max |M - 1|", OKABE_ITO["vermillion"]),
)


class NoEventFilesError(FileNotFoundError):
    pass


def event_directory(run_dir):
    """The folder holding the event files: RUN_DIR/tensorboard (Dassl's) or RUN_DIR itself."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "tensorboard", run_dir):
        if candidate.is_dir() and any(candidate.glob("events.out.tfevents.*")):
            return candidate
    raise NoEventFilesError(
        f"No TensorBoard event files in {run_dir} or {run_dir / 'tensorboard'}: give the output folder of a "
        "training run (train.py writes OUTPUT_DIR/tensorboard)."
    )


def read_scalars(run_dir):
    """{tag: [(step, value)]} sorted by step; a step logged again by a resumed run keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    # One event file per session (a resumed run adds one); read them in the order they were written.
    for path in sorted(event_directory(run_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            by_step = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                by_step[event.step] = event.value
    return {tag: sorted(by_step.items()) for tag, by_step in scalars.items()}


def plot_training_curves(run_dir, path, title=""):
    """Loss, accuracy, learning rate and mask penalty against the iteration, one panel each
    (a panel says so when the run did not log its value). Returns (PNG path, the scalars read)."""
    scalars = read_scalars(run_dir)
    with styled():
        figure = new_figure(11, 7)
        for axes, (tag, label, colour) in zip(figure.subplots(2, 2).flat, PANELS, strict=True):
            points = scalars.get(tag)
            axes.set_title(label)
            axes.set_xlabel("iteration")
            if not points:
                axes.text(0.5, 0.5, f"not logged ({tag})", transform=axes.transAxes, ha="center", va="center",
                          color="0.4")
                continue
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, color=colour, linewidth=1.6, marker="o" if len(steps) < 30 else None, markersize=3)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.grid(color="0.9", linewidth=0.8)
            if tag == "train/lr":
                axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        figure.suptitle(title or f"{Path(run_dir).name}: running means over each epoch, as Dassl logs them")
        save(figure, path)
    return str(path), scalars
