#!/usr/bin/env python
"""Pictures of what a trained RAda head learned, and of a run's training curves.

    python scripts/visualize.py --out DIR  --root DATA --trainer RAdaCoOp \\
        --dataset-config-file configs/datasets/caltech101.yaml \\
        --config-file configs/trainers/RAdaCoOp/vit_b16_ep50_ctxv1.yaml \\
        --model-dir output/base2new/train_base/caltech101/shots_16/RAdaCoOp/vit_b16_ep50_ctxv1/seed1 \\
        [--load-epoch N] [--images N | --images PATH [--images PATH ...]] [--top-k 5] [--max-images N] \\
        DATASET.SUBSAMPLE_CLASSES new

    python scripts/visualize.py --curves RUN_DIR --out DIR

The first form takes train.py's own arguments and builds the trainer as train.py does, loads
--model-dir (without it: the untrained head, M = 1) and runs the model over the test set of the
config (a head trained on base classes is shown on new ones with DATASET.SUBSAMPLE_CLASSES new).
It writes into DIR:

  mask_histogram.png   the mask values M over the test set: all entries, and the true class's rows
                       against the other classes' rows, with the share clipped at 0 and mean |M - 1|
  rational_<image>.png per chosen test image: R = f * t_k, M and M * R for the true class and the
                       top-scoring others, dimensions sorted by the true class's R, the image beside;
                       the title gives the prediction with M = 1 ("zero-shot": CLIP's decision on the
                       same prompts) and the head's
  summary.json         the numbers behind each figure

--images N (default 4) picks N test images spread over the test set; --images PATH picks those
files (paths of the test set). The second form draws loss, accuracy, learning rate and mask
penalty per iteration from RUN_DIR/tensorboard into DIR/training_curves.png.
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402  (the repository root is on sys.path only from here on)

logger = logging.getLogger("visualize")
DEFAULT_IMAGES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, add_help=False)
    parser.add_argument("--out", required=True, help="folder to write the figures and summary.json into")
    parser.add_argument("--curves", metavar="RUN_DIR", help="draw the training curves of this run instead")
    parser.add_argument("--images", action="append", default=None, metavar="N|PATH",
                        help=f"how many test images to draw (default {DEFAULT_IMAGES}), or a test image path (repeatable)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per rational matrix, the true class first")
    parser.add_argument("--max-images", type=int, default=0, help="histogram over the first N test images (0: all)")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        parser.print_help()
        sys.exit(0)
    return own, rest


def main(argv=None):
    own, rest = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from trainers.errors import UserFacingError

    try:
        if own.curves:
            return draw_curves(own)
        return draw_head(own, train.parse_args(rest))
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def draw_curves(own):
    from figures.curves import NoEventFilesError, plot_training_curves
    from trainers.errors import UserFacingError

    out = Path(own.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        path, scalars = plot_training_curves(own.curves, out / "training_curves.png")
    except NoEventFilesError as error:
        raise UserFacingError(str(error)) from None
    print(f"Wrote {path} ({', '.join(f'{tag}: {len(points)} points' for tag, points in sorted(scalars.items()))})")
    return 0


def build_trainer(args):
    """The trainer of train.py's arguments, its model loaded from --model-dir, ready to evaluate."""
    try:
        import dassl  # noqa: F401
    except ImportError:
        from trainers.errors import UserFacingError

        raise UserFacingError(train.DASSL_INSTALL) from None
    from dassl.engine import build_trainer as dassl_build_trainer
    from dassl.utils import set_random_seed

    from trainers.errors import UserFacingError
    from trainers.model.compositions import COMPOSITIONS, composition_of
    from trainers.ttt_trainers import TEST_TIME_TRAINERS

    if not args.trainer:
        raise UserFacingError("--trainer is missing: give the trainer of the run (e.g. --trainer RAdaCoOp).")
    test_time = {cls.__name__: cls.SOURCE for cls in TEST_TIME_TRAINERS}
    if args.trainer in test_time:
        raise UserFacingError(
            f"{args.trainer} trains its head anew for every test image and keeps no weights: visualize the run it "
            f"starts from with --trainer {test_time[args.trainer]} (its config, --model-dir of that run)."
        )
    cfg = train.setup_cfg(args)
    train.register_all(cfg)
    if not composition_of(cfg.TRAINER.NAME).head:  # decided by the declaration, before anything is built
        with_head = [name for name, declared in COMPOSITIONS.items() if declared.head and name not in test_time]
        raise UserFacingError(
            f"{cfg.TRAINER.NAME} has no RAda head, so there is no mask to show: use a RAda trainer "
            f"({', '.join(with_head)})."
        )
    if cfg.SEED >= 0:
        set_random_seed(cfg.SEED)
    trainer = dassl_build_trainer(cfg)
    if getattr(trainer, "subset_index", None) is not None:
        raise UserFacingError(
            f"{cfg.DATASET.NAME} is scored over ImageNet's classes and then reduced to its own; its mask rows are "
            "ImageNet's. Visualize the head on ImageNet itself, or set TRAINER.FT.IMAGENET_SUBSET_EVAL False."
        )
    trainer.load_model(args.model_dir, epoch=args.load_epoch)
    trainer.set_model_mode("eval")
    return trainer


class HeadProbe:
    """Runs the model's own forward and keeps what its head received: the normalised image and
    text features and the logit scale, from which R = f * t_k and the M = 1 logits follow."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.inputs = None
        self._handle = trainer.model.head.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.inputs = args

    def __call__(self, images):
        import torch

        from trainers.model.rada_head import clip_logits

        with torch.no_grad(), self.trainer.precision.autocast():
            output = self.trainer.model(images.to(self.trainer.device))
        image_features, text_features, scale = (x.float() if torch.is_tensor(x) else x for x in self.inputs)
        zero_shot = clip_logits(scale, image_features, text_features)
        return output.logits.float(), output.mask.float(), zero_shot, image_features, text_features

    def close(self):
        self._handle.remove()


def accumulate_mask_statistics(trainer, probe, max_images=0):
    from figures.head import MaskStatistics

    statistics = MaskStatistics()
    for batch in trainer.test_loader:
        images, labels = trainer.parse_batch_test(batch)
        if max_images:
            room = max_images - statistics.images
            if room <= 0:
                break
            images, labels = images[:room], labels[:room]
        logits, mask, zero_shot, _, _ = probe(images)
        statistics.add(mask, labels, logits, zero_shot)
    return statistics


def chosen_indices(trainer, selection):
    """Test-set indices of --images: a count spread over the test set, or the given image paths."""
    from trainers.errors import UserFacingError

    items = trainer.test_loader.dataset.data_source
    selection = selection or [str(DEFAULT_IMAGES)]
    if len(selection) == 1 and selection[0].isdigit():
        count = min(int(selection[0]), len(items))
        return [round(i * (len(items) - 1) / max(count - 1, 1)) for i in range(count)] if count else []
    by_path = {os.path.realpath(item.impath): index for index, item in enumerate(items)}
    indices = []
    for path in selection:
        index = by_path.get(os.path.realpath(path))
        if index is None:
            raise UserFacingError(
                f"--images {path}: not an image of the test set of {trainer.cfg.DATASET.NAME} "
                f"(subsample {trainer.cfg.DATASET.SUBSAMPLE_CLASSES}, {len(items)} images, e.g. {items[0].impath}); "
                "give a test image's path or a number of images."
            )
        indices.append(index)
    return indices


def figure_names(impaths):
    """rational_<image>.png per image: the file's stem, with its folder where stems repeat."""
    def clean(text):
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text)

    stems = [Path(p).stem for p in impaths]
    names = [clean(f"{Path(p).parent.name}_{s}" if stems.count(s) > 1 else s) for p, s in zip(impaths, stems, strict=True)]
    seen = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return [f"rational_{name}.png" for name in unique]


def display_image(trainer, tensor):
    """The (H, W, 3) image the model saw, un-normalised."""
    import torch

    cfg = trainer.cfg
    image = tensor.detach().float().cpu()
    if "normalize" in cfg.INPUT.TRANSFORMS:
        image = image * torch.tensor(cfg.INPUT.PIXEL_STD).view(3, 1, 1) + torch.tensor(cfg.INPUT.PIXEL_MEAN).view(3, 1, 1)
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def draw_rational_matrices(trainer, probe, indices, out, top_k):
    import torch

    from figures.head import plot_rational_matrix

    dataset = trainer.test_loader.dataset
    classnames = trainer.dm.dataset.classnames
    records = []
    items = [dataset[index] for index in indices]
    for item, name in zip(items, figure_names([item["impath"] for item in items]), strict=True):
        logits, mask, zero_shot, image_features, text_features = probe(item["img"].unsqueeze(0))
        label = int(item["label"])
        others = [k for k in torch.argsort(logits[0], descending=True).tolist() if k != label]
        shown = [label] + others[: max(top_k, 1) - 1]
        rational = image_features[0].unsqueeze(0) * text_features  # (K, D)
        rada_prediction, zero_shot_prediction = int(logits[0].argmax()), int(zero_shot[0].argmax())
        title = (f"true: {classnames[label]}  |  zero-shot (M = 1): {classnames[zero_shot_prediction]}  |  "
                 f"RAda: {classnames[rada_prediction]}")
        path, order = plot_rational_matrix(
            display_image(trainer, item["img"]), rational[shown].cpu().numpy(), mask[0, shown].cpu().numpy(),
            [classnames[k] for k in shown], out / name, title=title,
            clip_logits=zero_shot[0, shown].tolist(), rada_logits=logits[0, shown].tolist(),
        )
        image_mask = mask[0]
        records.append({
            "file": name,
            "impath": item["impath"],
            "label": label,
            "true_class": classnames[label],
            "zero_shot_prediction": classnames[zero_shot_prediction],
            "rada_prediction": classnames[rada_prediction],
            "classes_shown": [classnames[k] for k in shown],
            "zero_shot_logits": zero_shot[0, shown].tolist(),
            "rada_logits": logits[0, shown].tolist(),
            "dimension_order": order.tolist(),
            "mask_clipped_share": float((image_mask == 0).double().mean()),
            "mask_mean_abs_deviation": float((image_mask.double() - 1).abs().mean()),
        })
        print(f"Wrote {path}")
    return records


def draw_head(own, args):
    from figures.head import plot_mask_histogram

    out = Path(own.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.output_dir:
        args.output_dir = str(out)
    trainer = build_trainer(args)
    cfg = trainer.cfg
    probe = HeadProbe(trainer)
    statistics = accumulate_mask_statistics(trainer, probe, own.max_images).summary()
    weights = Path(args.model_dir).name if args.model_dir else "untrained head"
    if args.model_dir and args.load_epoch:
        weights += f", epoch {args.load_epoch}"
    title = f"{cfg.TRAINER.NAME} on {cfg.DATASET.NAME} ({cfg.DATASET.SUBSAMPLE_CLASSES} classes), {weights}"
    histogram_path = plot_mask_histogram(statistics, out / "mask_histogram.png", title=title)
    print(f"Wrote {histogram_path}")
    rational = draw_rational_matrices(trainer, probe, chosen_indices(trainer, own.images), out, own.top_k)
    probe.close()
    summary = {
        "trainer": cfg.TRAINER.NAME,
        "dataset": cfg.DATASET.NAME,
        "subsample": cfg.DATASET.SUBSAMPLE_CLASSES,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "model_dir": args.model_dir or None,
        "load_epoch": args.load_epoch,
        "mask_histogram": {"file": "mask_histogram.png", **statistics},
        "rational": rational,
    }
    with open(out / "summary.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    accuracy = statistics["accuracy"]
    print(f"Wrote {out / 'summary.json'}: {statistics['images']} images, accuracy {accuracy['rada']:.2f}% with the head, "
          f"{accuracy['zero_shot']:.2f}% with M = 1; mask clipped at 0: {statistics['all']['clipped_share']:.2%}, "
          f"mean |M - 1|: {statistics['all']['mean_abs_deviation']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
