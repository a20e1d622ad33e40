"""The Dassl glue shared by every trainer of this project.

`CLIPTrainer` is a Dassl `TrainerX` that loads the backbone (MODEL.BACKBONE.NAME: OpenAI CLIP,
open_clip, ...; trainers.model.backbones) once, builds the model its composition declares
(trainers/model/compositions.py) and handles the rest: precision, optimisers, the learning-rate
schedule, the training step, the results and checkpoints.

Checkpoints are kept by a RunKeeper (trainers/runs/run_keeper.py) rather than by Dassl 0.6.3,
whose scheduler state cannot be loaded by current torch (`weights_only=True`): every file holds
plain data and records the backbone and trainer it was made with; each epoch is saved as one
checkpoint set so that an interrupted run resumes bit for bit.
"""

import logging

import torch
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer

from .config import check_values
from .model.backbones import check_input_size, follow_preprocess, load_backbone
from .model.compositions import build_classifier, check_backbone_supports
from .model.image_resize import prepare_evaluation_images
from .model.precision import Precision
from .model.rada_head import RAdaHead, rada_loss
from .runs import distributed
from .runs.log_output import send_package_logs_to_stdout
from .runs.progress import EpochProgress
from .runs.random_state import use_deterministic_algorithms
from .runs.results import (
    KeptResults,
    append_record,
    backbone_identity,
    evaluation_record,
    flatten_config,
    result_line,
)
from .runs.run_keeper import RunKeeper
from .runs.schedule import build_lr_scheduler, require_per_step_schedule

logger = logging.getLogger(__name__)


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
    """Base of all trainers here. A subclass sets `composition` (a Composition of
    trainers/model/compositions.py) and overrides behaviour only."""

    composition = None
    # The config node whose PREC key sets CLIP's precision (train.py checks it before building).
    PREC_NODE = None
    # None: the OPTIM schedule, stepped once per epoch. Otherwise the trainer's schedulers count optimiser
    # steps, and this says how, for the message that refuses OPTIM's epoch schedule and warm-up.
    PER_STEP_SCHEDULE = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.composition is not None:
            cls.PREC_NODE = cls.composition.prec_node

    def __init__(self, cfg):
        send_package_logs_to_stdout(__name__.rpartition(".")[0])
        if cfg.DETERMINISTIC:  # before the model reaches the GPU (cuBLAS reads its setting once)
            use_deterministic_algorithms()
        super().__init__(cfg)
        # distributed: gathers the shards; every metric kept for the run's results file
        self.evaluator = KeptResults(distributed.sharded_evaluator(self.evaluator))

    def check_cfg(self, cfg):
        """Dassl calls this first in the constructor, before anything is built."""
        check_values(cfg, prec_node=self.PREC_NODE)
        if self.PER_STEP_SCHEDULE:
            require_per_step_schedule(cfg.OPTIM, type(self).__name__, self.PER_STEP_SCHEDULE)

    # ---- data ---------------------------------------------------------------------------------
    def build_data_loader(self):
        # Dassl builds the data loaders before the model: the backbone is loaded first, so that the
        # images are prepared as the backbone expects (its image size, mean/std, interpolation, resize mode).
        self.dual_encoder = self.load_backbone()
        check_backbone_supports(self.composition, self.cfg.TRAINER.NAME, self.dual_encoder,
                                TRAINER_REGISTRY.registered_names())
        self.cfg, _ = follow_preprocess(self.cfg, self.dual_encoder.preprocess)  # logs what it changed
        with distributed.main_process_first():  # process 0 writes the few-shot cache the others read
            super().build_data_loader()
        # distributed: this process's share of each training batch and of the evaluation images
        self.train_loader_x = distributed.distributed_train_loader(
            self.train_loader_x, self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.cfg.SEED
        )
        self.val_loader = distributed.sharded_loader(self.val_loader)
        self.test_loader = distributed.sharded_loader(self.test_loader)
        steps = prepare_evaluation_images(self.val_loader, self.test_loader, self.cfg.INPUT,
                                          getattr(self.dm.dataset, "test_pre_transform", None))
        for step in steps:
            logger.info(str(step))

    # ---- model --------------------------------------------------------------------------------
    def load_backbone(self):
        backbone = self.cfg.MODEL.BACKBONE
        logger.info("Loading CLIP (backbone: %s)", backbone.NAME)
        return load_backbone(backbone.NAME, weights=backbone.WEIGHTS, cache_dir=backbone.CACHE_DIR or None)

    def build_classifier(self, backbone, classnames):
        """(classifier, {registered name: trained module}) of this trainer's composition."""
        return build_classifier(self.composition, self.cfg, backbone, classnames)

    def build_model(self):
        self.precision = Precision(self.composition.precision(self.cfg), self.device)
        backbone = self.dual_encoder
        check_input_size(self.cfg.INPUT.SIZE, self.cfg.MODEL.BACKBONE.NAME, backbone.preprocess)
        self.precision.cast_clip(backbone)
        self.backbone = backbone.signature()
        logger.info("CLIP: %s; precision %s", backbone.describe(), self.precision.mode)

        self.model, trained = self.build_classifier(backbone, self.dm.dataset.classnames)
        self.model.to(self.device)
        for name, module in trained.items():
            self.register_model(name, module, *self.build_optimization(name, module))
            count = sum(p.numel() for p in module.parameters() if p.requires_grad)
            logger.info("Learnable parameters in %s: %s", name, f"{count:,}")
        self.scaler = self.precision.grad_scaler()
        self.data_parallel = None  # distributed: set by wrap_data_parallel before training
        self.run_keeper = RunKeeper(
            run_dir=self.output_dir, trainer=self.cfg.TRAINER.NAME, backbone=self.backbone,
            config=flatten_config(self.cfg), modules=self._models, optimizers=self._optims, schedulers=self._scheds,
            scaler=self.scaler, random_loaders={"train_loader_x": self.train_loader_x}, model=self.model,
        )

    def build_optimization(self, name, module):
        """(optimiser, scheduler) of a registered module: Dassl's optimiser over its trainable
        parameters and the epoch schedule of OPTIM."""
        params = [p for p in module.parameters() if p.requires_grad]
        optim = build_optimizer(None, self.cfg.OPTIM, param_groups=params)
        return optim, build_lr_scheduler(optim, self.cfg.OPTIM)

    # ---- training -----------------------------------------------------------------------------
    def before_train(self):
        distributed.seed_per_process(self.cfg.SEED)  # before Dassl's resume restores each process's state
        super().before_train()
        self.wrap_data_parallel()

    def wrap_data_parallel(self):
        """distributed: all-reduce the gradients of the registered modules from now on."""
        self.data_parallel = distributed.data_parallel(self._models)

    def before_epoch(self):
        super().before_epoch()
        distributed.set_epoch(self.train_loader_x, self.epoch)

    def run_epoch(self):
        self.set_model_mode("train")
        self.num_batches = len(self.train_loader_x)
        progress = EpochProgress(self.epoch, self.max_epoch, self.num_batches, self.cfg.TRAIN.PRINT_FREQ,
                                 processes=distributed.world_size())
        for batch_idx, batch in enumerate(self.train_loader_x):
            self.batch_idx = batch_idx
            progress.loaded()
            summary = self.forward_backward(batch)
            progress.stepped(summary, len(batch["label"]), self.get_current_lr())
            if progress.due():
                print(progress.line())
            for tag, value in progress.scalars().items():
                self.write_scalar(tag, value, progress.global_step)

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_train(self, images, labels):
        """(ClassifierOutput, targets of its logits) of a training batch."""
        return self.model(images), labels

    def compute_loss(self, output, targets):
        """Cross-entropy, plus the mask penalty (TRAINER.RADA.ALPHA) when a RAda head made the logits."""
        return rada_loss(output.logits, output.mask, targets, self.cfg.TRAINER.RADA.ALPHA)

    def forward_loss(self, images, labels):
        """(ClassifierOutput, targets, loss) of a training batch; distributed: run inside DDP's forward."""
        with self.precision.autocast():
            output, targets = self.forward_train(images, labels)
            return output, targets, self.compute_loss(output, targets)

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        output, targets, loss = distributed.run_step(self.data_parallel, self.forward_loss, images, labels)
        self._backward_and_step(loss)
        self.step_schedulers()
        return self.training_summary(output, targets, loss)

    def step_schedulers(self):
        """After each optimiser step: the OPTIM schedule counts epochs, a per-step one optimiser steps."""
        if self.PER_STEP_SCHEDULE:
            for name in self.get_model_names():
                self._scheds[name].step()
        elif (self.batch_idx + 1) == self.num_batches:
            self.update_lr()

    def training_summary(self, output, labels, loss):
        """What one training step reports (the progress line and train/<key> scalars); with a head, the
        mask regulariser's value whatever ALPHA weighs it with: how far the mask has moved from 1."""
        summary = {"loss": loss.item(), "acc": compute_accuracy(output.logits, labels)[0].item()}
        if output.mask is not None:
            summary["mask_penalty"] = RAdaHead.mask_regularizer(output.mask.detach()).item()
        return summary

    def _backward_and_step(self, loss):
        self._refuse_non_finite(loss)
        self.model_zero_grad()
        self.scaler.scale(loss).backward()
        self._step_optimisers()

    def _refuse_non_finite(self, loss, others=None):
        """Without loss scaling (which skips such steps) a non-finite loss, or one of the `others` ({name: loss}
        a method also descends along), stops the run, naming the fix."""
        others = others or {}
        if not self.scaler.is_enabled() and not all(torch.isfinite(value) for value in (loss, *others.values())):
            detail = "".join(f" ({name} {value.item()})" for name, value in others.items())
            raise FloatingPointError(
                f"The loss became {loss.item()}{detail} at epoch {self.epoch + 1}, batch {self.batch_idx + 1}. "
                "Try a lower OPTIM.LR, or PREC fp32 / amp instead of fp16."
            )

    def _step_optimisers(self):
        """Every registered module's optimiser steps on its gradients, through the loss scaler."""
        for name in self.get_model_names():
            self.scaler.step(self._optims[name])
        self.scaler.update()

    def model_inference(self, images):
        with self.precision.autocast():
            return self.model(images).logits

    # ---- evaluation ---------------------------------------------------------------------------
    def init_writer(self, log_dir):
        if distributed.is_main_process():  # one writer
            super().init_writer(log_dir)

    def evaluate(self, split):
        """Every metric on `split` ("val" or "test"): Dassl's evaluation loop over its loader."""
        distributed.broadcast_buffers(self._models.values())  # every shard evaluated by the same model
        super().test(split)
        return self.evaluator.results

    def test(self, split=None):
        """Evaluates on `split` (TEST.SPLIT by default: the run's final evaluation); prints the result line
        and appends the run's results record. Returns the first metric (accuracy), as Dassl's test does."""
        cfg = self.cfg
        evaluated = split or cfg.TEST.SPLIT
        if evaluated == "val" and self.val_loader is None:
            evaluated = "test"
        metrics = self.evaluate(evaluated)
        accuracy = next(iter(metrics.values()))
        fields = dict(dataset=cfg.DATASET.NAME, subsample=cfg.DATASET.SUBSAMPLE_CLASSES, split=evaluated,
                      shots=cfg.DATASET.NUM_SHOTS, seed=cfg.SEED, trainer=cfg.TRAINER.NAME,
                      backbone=backbone_identity(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.WEIGHTS))
        print(result_line(**fields, accuracy=accuracy))  # for people, and for tools that read logs
        self._append_record(fields, metrics, finished=split is None)
        return accuracy

    @distributed.on_main_process
    def _append_record(self, fields, metrics, finished):
        if self.cfg.OUTPUT_DIR:
            append_record(self.cfg.OUTPUT_DIR, evaluation_record(run_dir=self.cfg.OUTPUT_DIR, metrics=metrics,
                                                                 finished=finished, **fields))

    # ---- checkpoints (trainers/runs/run_keeper.py) ---------------------------------------------
    def after_epoch(self):
        val_result = None
        if not self.cfg.TEST.NO_TEST and self.cfg.TEST.FINAL_MODEL == "best_val":
            val_result = self.test(split="val")
        self.run_keeper.end_of_epoch(self.epoch, val_result, keep_every=self.cfg.TRAIN.CHECKPOINT_FREQ)

    def resume_model_if_exist(self, directory):
        return self.run_keeper.resume(directory)

    def load_model(self, directory, epoch=None):
        self.run_keeper.load(directory, epoch)
