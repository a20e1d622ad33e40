"""Test-time training trainers (Dassl glue): RAdaTTT and RAdaCoOpTTT.

Each one is the trainer whose classifier it adapts (RAda: hand-crafted prompts and the head;
RAdaCoOp: CoOp's context and the head) with evaluation replaced by per-image test-time training
(trainers/model/ttt.py). It therefore builds, registers and loads exactly that trainer's modules:
without --model-dir it starts from the identity head (the paper's "RAda"), with --model-dir
from a training run of that trainer (the paper's "RAda†"). The optimiser is OPTIM.*.

    python train.py --trainer RAdaTTT --eval-only [--model-dir OUTPUT_OF_A_RADA_RUN] \\
        --root DATA --seed 1 --dataset-config-file configs/datasets/imagenet_a.yaml \\
        --config-file configs/trainers/RAdaTTT/vit_b16_imagenet.yaml --output-dir DIR
"""

import logging

import torch
from torchvision import transforms as T

from .engine import CLIPTrainer, register_trainer
from .errors import UserFacingError
from .model.ttt import TestTimeAdapter, TestTimeTally, TestTimeViews
from .rada_trainers import RAda, RAdaCoOp
from .runs import distributed

logger = logging.getLogger(__name__)


class TestTimeTrainer(CLIPTrainer):
    """Test-time training of the classifier of another trainer of this project, whose classifier has
    a RAda head. A registered trainer lists both: `class RAdaTTT(TestTimeTrainer, RAda)`; that trainer
    brings its composition, this class the behaviour (checks, data, model set-up, loading, training
    and evaluation), so the order of the bases does not matter."""

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.OPTIM.WARMUP_EPOCH > 0:
            # A warm-up scheduler would replace OPTIM.LR by its warm-up rate for every image.
            raise UserFacingError("test-time training has no epochs to warm up: set OPTIM.WARMUP_EPOCH 0")

    def build_data_loader(self):
        super().build_data_loader()
        cfg = self.cfg
        normalize = None
        if "normalize" in cfg.INPUT.TRANSFORMS:
            normalize = T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
        # Each image becomes its views; the original keeps the test transform of every other protocol.
        for loader in (self.test_loader, self.val_loader):
            if loader is not None:
                loader.dataset.transform = TestTimeViews(
                    loader.dataset.transform, cfg.INPUT.SIZE, n_views=cfg.TRAINER.TTT.N_VIEWS,
                    augmix=cfg.TRAINER.TTT.AUGMIX, normalize=normalize,
                )

    def build_model(self):
        super().build_model()
        adapted = [self.model.head]
        if self.cfg.TRAINER.TTT.ADAPT_PROMPTS:
            if not any(True for _ in self.model.prompts.parameters()):
                raise UserFacingError(
                    f"TRAINER.TTT.ADAPT_PROMPTS is True but {self.cfg.TRAINER.NAME} has hand-crafted prompts, "
                    "with nothing to adapt: use RAdaCoOpTTT to adapt a CoOp context."
                )
            adapted.append(self.model.prompts)
        self.adapted_names = [name for name, module in self._models.items() if any(module is m for m in adapted)]
        for name, module in self._models.items():
            module.requires_grad_(name in self.adapted_names)

    def load_model(self, directory, epoch=None):
        # A run of another trainer would load only in part (e.g. a RAdaCoOp head without its context).
        hint = "Test-time train a run with the trainer built on the same modules: " + ", ".join(
            f"{cls.__name__} for a {cls.SOURCE} run" for cls in TEST_TIME_TRAINERS) + "."
        self.run_keeper.load(directory, epoch, other_trainers_hint=hint)
        if not directory:
            logger.info("Test-time training starts from the identity head (mask M = 1)")

    def train(self):
        logger.info("%s trains nothing beforehand: running test-time training on the test set. "
                    "To start from a trained model, use --eval-only --model-dir DIR.", self.cfg.TRAINER.NAME)
        self.test()

    @torch.no_grad()
    def evaluate(self, split):
        """Test-time train on each image of the split in turn; its metrics, and the zero-shot accuracy."""
        cfg, ttt = self.cfg, self.cfg.TRAINER.TTT
        loader = self.val_loader if split == "val" else self.test_loader
        adapter = TestTimeAdapter(
            self.model, [self._optims[name] for name in self.adapted_names], steps=ttt.STEPS,
            confident_fraction=ttt.CONFIDENT_FRACTION, autocast=self.precision.autocast,
            scaler=self.scaler if self.scaler.is_enabled() else None,
        )
        tally = TestTimeTally(len(loader.sampler))  # distributed: this process's shard
        views = f"{ttt.N_VIEWS} random resized crops{' with AugMix' if ttt.AUGMIX else ''}"
        logger.info(
            "Test-time training of %s on %s images: per image the original and %s, the most confident %s kept, "
            "%s step(s) of %s at lr %s", ", ".join(self.adapted_names), len(loader.dataset), views,
            f"{ttt.CONFIDENT_FRACTION:.0%}", ttt.STEPS, cfg.OPTIM.NAME, f"{cfg.OPTIM.LR:g}",
        )
        self.set_model_mode("eval")
        self.evaluator.reset()
        print(f"Evaluate on the *{split}* set")
        frequency = max(cfg.TRAIN.PRINT_FREQ, 1)
        for batch in loader:
            batch_views, labels = self.parse_batch_test(batch)  # (B, 1 + N, C, H, W) views per image
            with torch.enable_grad():
                predictions = [adapter.adapt_and_predict(image_views) for image_views in batch_views]
            adapted = torch.cat([p.adapted for p in predictions])
            seen_before = tally.seen
            tally.update(torch.cat([p.initial for p in predictions]), adapted, labels)
            self.evaluator.process(adapted, labels)
            if tally.seen // frequency > seen_before // frequency or tally.seen == tally.total:
                logger.info(tally.progress())
        results = self.evaluator.evaluate()
        for name, value in results.items():
            self.write_scalar(f"{split}/{name}", value, self.epoch)
        accuracy = list(results.values())[0]
        zero_shot = TestTimeTally.percent(*distributed.sum_over_processes(tally.correct_initial, tally.seen))
        print(f"* zero-shot accuracy: {zero_shot:.2f}% (the same model before test-time training; "
              f"after: {accuracy:.2f}%)")
        self.write_scalar(f"{split}/zero_shot_accuracy", zero_shot, self.epoch)
        return {**results, "zero_shot_accuracy": zero_shot}


@register_trainer
class RAdaTTT(TestTimeTrainer, RAda):
    """Test-time training of RAda's classifier: hand-crafted prompts and the head (the head adapts)."""

    SOURCE = "RAda"


@register_trainer
class RAdaCoOpTTT(TestTimeTrainer, RAdaCoOp):
    """Test-time training of RAdaCoOp's classifier: the head adapts, and the CoOp context too with
    TRAINER.TTT.ADAPT_PROMPTS True."""

    SOURCE = "RAdaCoOp"


TEST_TIME_TRAINERS = (RAdaTTT, RAdaCoOpTTT)
