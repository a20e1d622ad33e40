"""Fake run folders, log.txt files and results.jsonl records in the formats train.py and Dassl tools write
(see dassl-contract.md), and scripts/parse_results.py loaded as a module for the tests."""
import importlib.util
import sys
from pathlib import Path

TRAINER = "RAdaCoOp"
CFG = "vit_b16_ep50_ctxv1"


def dassl_block(accuracy):
    """Dassl's evaluator output: one decimal."""
    return [
        "=> result",
        "* total: 1,000",
        f"* correct: {round(accuracy * 10):,}",
        f"* accuracy: {accuracy:.1f}%",
        f"* error: {100 - accuracy:.1f}%",
        f"* macro_f1: {max(accuracy - 1, 0):.1f}%",
    ]


def training_lines(epochs=5, batches=4, stop_epoch=None, stop_batch=None, val_accuracy=None):
    """Epoch lines as Dassl prints them; with val_accuracy a validation block after each epoch
    (TEST.FINAL_MODEL best_val); stop_* cut the run short."""
    lines = []
    for epoch in range(1, (stop_epoch or epochs) + 1):
        last_batch = stop_batch if epoch == stop_epoch and stop_batch else batches
        for batch in range(1, last_batch + 1):
            lines.append(f"epoch [{epoch}/{epochs}] batch [{batch}/{batches}] time 0.105 (0.120) "
                         f"data 0.001 (0.010) loss 1.2345 (1.3456) lr 2.0000e-03 eta 0:00:{batch:02d}")
        if val_accuracy is not None and not (epoch == stop_epoch and stop_batch):
            lines += ["Evaluate on the *val* set", *dassl_block(val_accuracy)]
    return lines


def rada_log(accuracy, *, subsample="base", seed=1, trainer=TRAINER, shots=16, split="test",
             dataset="Caltech101", train=True, epochs=5, backbone=None):
    """A finished run of this project's train.py (training unless train=False, i.e. --eval-only);
    without `backbone`, the result line of versions that did not name it."""
    lines = ["Setting fixed seed: 1", "** Config **", "OPTIM:", f"  MAX_EPOCH: {epochs}"]
    if train:
        lines += training_lines(epochs) + ["Finish training", "Deploy the last-epoch model"]
    lines += [
        f"Evaluate on the *{split}* set",
        *dassl_block(accuracy),
        f"* result: dataset={dataset} subsample={subsample} split={split} shots={shots} seed={seed} "
        f"trainer={trainer} accuracy={accuracy:.2f}%" + (f" backbone={backbone}" if backbone else ""),
    ]
    if train:
        lines.append("Elapsed: 0:01:02")
    return "\n".join(lines) + "\n"


def dassl_log(accuracy, *, train=True, finish_line="Finished training", evaluate_line=True):
    """A finished run logged by CoOp/MaPLe code: Dassl's block only, no `* result:` line."""
    lines = ["Setting fixed seed: 1"]
    if train:
        lines += training_lines(5) + [finish_line, "Deploy the last-epoch model"]
    if evaluate_line:
        lines.append("Evaluate on the *test* set")
    lines += dassl_block(accuracy)
    return "\n".join(lines) + "\n"


def unfinished_log(stop_epoch=3, epochs=5, stop_batch=20, batches=40, val_accuracy=None):
    lines = ["Setting fixed seed: 1"] + training_lines(epochs, batches, stop_epoch, stop_batch, val_accuracy)
    return "\n".join(lines) + "\n"


def write_run(root, part_folder, dataset, seed, log_text, *, trainer=TRAINER, cfg=CFG, shots=16):
    """Creates root/<part_folder>/<dataset>/shots_<K>/<trainer>/<cfg>/seed<S>[/log.txt] like the scripts."""
    run_dir = Path(root) / part_folder / dataset / f"shots_{shots}" / trainer / cfg / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if log_text is not None:
        (run_dir / "log.txt").write_text(log_text)
    return run_dir


def load_parse_results():
    """scripts/parse_results.py as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "parse_results.py"
    spec = importlib.util.spec_from_file_location("parse_results", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parse_results"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def record_drawn_charts(monkeypatch):
    """Let parse_results draw its charts as usual and collect {chart path: bars drawn} in the returned dict."""
    import figures.results

    drawn = {}
    plot = figures.results.plot_results

    def keep(*args, **kwargs):
        drawn.update(plot(*args, **kwargs))
        return drawn

    monkeypatch.setattr(figures.results, "plot_results", keep)
    return drawn


def write_record_run(root, part_folder, dataset, seed, metrics, *, trainer=TRAINER, cfg=CFG, shots=16,
                     subsample="base", split="test", finished=True, backbone="ViT-B/16", log_text=None):
    """A run folder of the scripts' layout whose results.jsonl holds one record (as train.py appends it),
    and, with log_text, a log.txt beside it."""
    from trainers.runs.results import append_record, evaluation_record

    run_dir = write_run(root, part_folder, dataset, seed, log_text, trainer=trainer, cfg=cfg, shots=shots)
    append_record(run_dir, evaluation_record(
        run_dir=run_dir, dataset=dataset, subsample=subsample, split=split, shots=shots, seed=seed, trainer=trainer,
        backbone=backbone, metrics=metrics, finished=finished))
    return run_dir
