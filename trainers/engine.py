"""The Dassl glue shared by every trainer of this project.

`CLIPTrainer` is a Dassl `TrainerX` that loads CLIP once, lets a subclass compose the
classifier (`build_classifier`) and name the modules it trains (`trainable_modules`), and
handles the rest: precision, optimisers, the learning-rate schedule, the training step, the
result line that `scripts/parse_results.py` reads, and checkpoints.

Checkpoints are written and read here rather than by Dassl 0.6.3, whose scheduler state
cannot be loaded by current torch (`weights_only=True`): every file holds plain data, is
saved every epoch so an interrupted run resumes, and records the backbone it was trained on.
"""

import logging
import os
import os.path as osp
import sys

import torch
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer
from torchvision.transforms import Compose

from .config import check_values
from .core.checkpoint import (
    CHECKPOINT_POINTER,
    find_checkpoint,
    latest_checkpoint,
    load_weights,
    read_checkpoint,
    write_checkpoint,
)
from .core.clip_loader import clip_signature, describe_clip, load_clip
from .core.errors import UserFacingError
from .core.precision import Precision
from .core.rada_head import rada_loss
from .core.schedule import build_lr_scheduler

logger = logging.getLogger(__name__)
_package_logger = logging.getLogger(__name__.rpartition(".")[0])


def _log_to_stdout():
    """Send this package's log records to stdout, which Dassl tees into log.txt, unless the
    host program (our train.py or another) has configured logging already."""
    # Importing dassl.data runs logging.disable(logging.WARNING) (in its wilds module), which
    # would silence every message below ERROR in the whole process.
    logging.disable(logging.NOTSET)
    if not logging.getLogger().handlers and not _package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _package_logger.addHandler(handler)
        _package_logger.setLevel(logging.INFO)


def register_trainer(cls):
    """Register a trainer in Dassl unless the host program already has one of that name.

    Plugged into a CoOp or MaPLe checkout (see rada_plugin.py), the host's own CoOp, MaPLe
    or ZeroshotCLIP keep their names and ours step aside instead of clashing.
    """
    if cls.__name__ in TRAINER_REGISTRY.registered_names():
        logger.info("Trainer %s is already registered by the host program; keeping that one", cls.__name__)
        return cls
    TRAINER_REGISTRY.register(cls)  # Dassl's register() returns None when given the class
    return cls


class CLIPTrainer(TrainerX):
    """Base of all trainers here. Subclasses set PREC_NODE and implement build_classifier."""

    # The config node whose PREC key sets CLIP's precision, TRAINER.<PREC_NODE>.PREC (the rule is in
    # trainers/config.py).
    PREC_NODE = "COOP"

    def __init__(self, cfg):
        _log_to_stdout()
        super().__init__(cfg)

    def check_cfg(self, cfg):
        """Dassl calls this first in the constructor, before anything is built."""
        check_values(cfg, prec_node=self.PREC_NODE)

    # ---- to be provided by subclasses -------------------------------------------------------
    def build_classifier(self, clip_model, classnames):
        """Return the CLIPClassifier of this method."""
        raise NotImplementedError

    def trainable_modules(self):
        """{registered name: module}; each gets an optimiser and a checkpoint folder."""
        return {}

    def forward_train(self, images, labels):
        """(ClassifierOutput, targets of its logits) of a training batch."""
        return self.model(images), labels

    def compute_loss(self, output, targets):
        """Cross-entropy, plus the mask penalty (TRAINER.RADA.ALPHA) when a RAda head made the logits."""
        return rada_loss(output.logits, output.mask, targets, self.cfg.TRAINER.RADA.ALPHA)

    def precision_mode(self):
        """The PREC CLIP runs in; trainers that update CLIP's own weights may refuse some."""
        return self.cfg.TRAINER[self.PREC_NODE].PREC

    def build_optimization(self, name, module):
        """(optimiser, scheduler) of a registered module: Dassl's optimiser over its trainable
        parameters and the epoch schedule of OPTIM."""
        params = [p for p in module.parameters() if p.requires_grad]
        optim = build_optimizer(None, self.cfg.OPTIM, param_groups=params)
        return optim, build_lr_scheduler(optim, self.cfg.OPTIM)

    # ---- data ---------------------------------------------------------------------------------
    def build_data_loader(self):
        super().build_data_loader()
        # Some test sets transform each image first (ObjectNet's frame is cut off).
        pre_transform = getattr(self.dm.dataset, "test_pre_transform", None)
        if pre_transform is not None:
            logger.info(str(pre_transform))
            wrapper = self.test_loader.dataset
            wrapper.transform = Compose([pre_transform, wrapper.transform])

    # ---- model --------------------------------------------------------------------------------
    def build_model(self):
        cfg = self.cfg
        self.precision = Precision(self.precision_mode(), self.device)
        logger.info(f"Loading CLIP (backbone: {cfg.MODEL.BACKBONE.NAME})")
        clip_model = load_clip(cfg.MODEL.BACKBONE.NAME, cache_dir=cfg.MODEL.BACKBONE.CACHE_DIR or None)
        self._check_input_size(clip_model)
        self.precision.cast_clip(clip_model)
        self.backbone = clip_signature(clip_model)
        logger.info(f"CLIP: {describe_clip(clip_model)}; precision {self.precision.mode}")

        self.model = self.build_classifier(clip_model, self.dm.dataset.classnames)
        self.model.requires_grad_(False)
        trainable = self.trainable_modules()
        for module in trainable.values():
            module.requires_grad_(True)
        self.model.to(self.device)
        for name, module in trainable.items():
            self.register_model(name, module, *self.build_optimization(name, module))
            count = sum(p.numel() for p in module.parameters() if p.requires_grad)
            logger.info(f"Learnable parameters in {name}: {count:,}")
        self.scaler = self.precision.grad_scaler()

    def _check_input_size(self, clip_model):
        expected = clip_model.visual.input_resolution
        size = tuple(self.cfg.INPUT.SIZE)
        if size != (expected, expected):
            raise UserFacingError(
                f"INPUT.SIZE is {size} but {self.cfg.MODEL.BACKBONE.NAME} takes {expected} px images: "
                f"add `INPUT.SIZE ({expected},{expected})` to the command line or the config."
            )

    # ---- training -----------------------------------------------------------------------------
    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.precision.autocast():
            output, targets = self.forward_train(images, labels)
            loss = self.compute_loss(output, targets)
        self._backward_and_step(loss)
        self.step_schedulers()
        return self.training_summary(output, targets, loss)

    def step_schedulers(self):
        """After each optimiser step; the OPTIM schedule counts epochs."""
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()

    def training_summary(self, output, labels, loss):
        """What one training step reports; Dassl prints it and writes each entry to TensorBoard (train/<key>)."""
        return {"loss": loss.item(), "acc": compute_accuracy(output.logits, labels)[0].item()}

    def _backward_and_step(self, loss):
        if not self.scaler.is_enabled() and not torch.isfinite(loss):
            raise FloatingPointError(
                f"The loss became {loss.item()} at epoch {self.epoch + 1}, batch {self.batch_idx + 1}. "
                "Try a lower OPTIM.LR, or PREC fp32 / amp instead of fp16."
            )
        self.model_zero_grad()
        self.scaler.scale(loss).backward()
        for name in self.get_model_names():
            self.scaler.step(self._optims[name])
        self.scaler.update()

    def model_inference(self, images):
        with self.precision.autocast():
            return self.model(images).logits

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split):
        """Accuracy on `split` ("val" or "test"): Dassl's evaluation loop over its loader."""
        return super().test(split)

    def test(self, split=None):
        cfg = self.cfg
        evaluated = split or cfg.TEST.SPLIT
        if evaluated == "val" and self.val_loader is None:
            evaluated = "test"
        accuracy = self.evaluate(evaluated)
        # Program output like Dassl's result block (printed, so it reaches log.txt in any host).
        print(
            f"* result: dataset={cfg.DATASET.NAME} subsample={cfg.DATASET.SUBSAMPLE_CLASSES} "
            f"split={evaluated} shots={cfg.DATASET.NUM_SHOTS} seed={cfg.SEED} "
            f"trainer={cfg.TRAINER.NAME} accuracy={accuracy:.2f}%"
        )
        return accuracy

    # ---- checkpoints --------------------------------------------------------------------------
    def after_epoch(self):
        epoch_number = self.epoch + 1
        if not self.cfg.TEST.NO_TEST and self.cfg.TEST.FINAL_MODEL == "best_val":
            result = self.test(split="val")
            if result > self.best_result:
                self.best_result = result
                self.save_model(self.epoch, self.output_dir, val_result=result, model_name="model-best.pth.tar")
        # Every epoch is saved so that an interrupted run resumes; only the last epoch and
        # multiples of TRAIN.CHECKPOINT_FREQ are kept.
        self.save_model(self.epoch, self.output_dir)
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        previous = epoch_number - 1
        if previous >= 1 and not (freq > 0 and previous % freq == 0):
            for name in self.get_model_names():
                stale = osp.join(self.output_dir, name, f"model.pth.tar-{previous}")
                if osp.isfile(stale):
                    os.remove(stale)

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        for name in self.get_model_names():
            payload = {
                "state_dict": self._models[name].state_dict(),
                "epoch": epoch + 1,
                "optimizer": self._optims[name].state_dict() if self._optims[name] else None,
                "scheduler": self._scheds[name].state_dict() if self._scheds[name] else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "val_result": val_result,
                "backbone": self.backbone,
                "trainer": self.cfg.TRAINER.NAME,
            }
            write_checkpoint(payload, osp.join(directory, name), model_name or f"model.pth.tar-{epoch + 1}")

    def resume_model_if_exist(self, directory):
        names = self.get_model_names()
        if not names or not all(osp.isfile(osp.join(directory, n, CHECKPOINT_POINTER)) for n in names):
            logger.info("No checkpoint found, train from scratch")
            return 0
        logger.info(f"Found checkpoint at {directory} (will resume training)")
        start_epoch = 0
        for name in names:
            path = latest_checkpoint(osp.join(directory, name))
            checkpoint = read_checkpoint(path, self.backbone)
            load_weights(self._models[name], checkpoint["state_dict"], path)
            if self._optims[name] is not None and checkpoint.get("optimizer"):
                self._optims[name].load_state_dict(checkpoint["optimizer"])
            if self._scheds[name] is not None and checkpoint.get("scheduler"):
                self._scheds[name].load_state_dict(checkpoint["scheduler"])
            if checkpoint.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(checkpoint["scaler"])
            start_epoch = checkpoint["epoch"]
            logger.info(f"Resumed {name} from {path} (next epoch: {start_epoch + 1})")
        return start_epoch

    def load_model(self, directory, epoch=None):
        if not directory:
            logger.info("No --model-dir given: evaluating without loading trained weights")
            return
        for name in self.get_model_names():
            path = find_checkpoint(osp.join(directory, name), epoch)
            checkpoint = read_checkpoint(path, self.backbone)
            load_weights(self._models[name], checkpoint["state_dict"], path)
            val = checkpoint.get("val_result")
            val_text = f", val_result={val:.1f}" if isinstance(val, (int, float)) else ""
            logger.info(f"Load {path} to {name} (epoch={checkpoint.get('epoch')}{val_text})")
