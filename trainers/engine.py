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
import sys

import torch
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer
from torchvision.transforms import Compose

from .config import check_values
from .errors import UserFacingError
from .model.backbones import follow_preprocess, load_backbone
from .model.compositions import COMPOSITIONS, build_classifier
from .model.image_resize import evaluation_resize
from .model.precision import Precision
from .model.rada_head import RAdaHead, rada_loss
from .runs import distributed
from .runs.progress import EpochProgress
from .runs.random_state import use_deterministic_algorithms
from .runs.results import backbone_identity, flatten_config, result_line
from .runs.run_keeper import RunKeeper
from .runs.schedule import build_lr_scheduler

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
    """Base of all trainers here. A subclass sets `composition` (a Composition of
    trainers/model/compositions.py) and overrides behaviour only."""

    composition = None
    # The config node whose PREC key sets CLIP's precision (train.py checks it before building).
    PREC_NODE = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.composition is not None:
            cls.PREC_NODE = cls.composition.prec_node

    def __init__(self, cfg):
        _log_to_stdout()
        if cfg.DETERMINISTIC:  # before the model reaches the GPU (cuBLAS reads its setting once)
            use_deterministic_algorithms()
        super().__init__(cfg)
        self.evaluator = distributed.sharded_evaluator(self.evaluator)  # distributed: gathers the shards

    def check_cfg(self, cfg):
        """Dassl calls this first in the constructor, before anything is built."""
        check_values(cfg, prec_node=self.PREC_NODE)

    # ---- data ---------------------------------------------------------------------------------
    def build_data_loader(self):
        # Dassl builds the data loaders before the model: the backbone is loaded first, so that the
        # images are prepared as the backbone expects (its image size, mean/std, interpolation, resize mode).
        self.dual_encoder = self.load_backbone()
        self._check_backbone_supports_trainer(self.dual_encoder)
        self.cfg, changed = follow_preprocess(self.cfg, self.dual_encoder.preprocess)
        if changed:
            logger.info("Input preprocessing of %s: %s", self.cfg.MODEL.BACKBONE.NAME,
                        ", ".join(f"INPUT.{key} {value}" for key, value in changed.items()))
        with distributed.main_process_first():  # process 0 writes the few-shot cache the others read
            super().build_data_loader()
        # distributed: this process's share of each training batch and of the evaluation images
        self.train_loader_x = distributed.distributed_train_loader(
            self.train_loader_x, self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.cfg.SEED
        )
        self.val_loader = distributed.sharded_loader(self.val_loader)
        self.test_loader = distributed.sharded_loader(self.test_loader)
        # Evaluation images are brought to INPUT.SIZE the backbone's way (INPUT.RESIZE_MODE; None for
        # "shortest", Dassl's own), after what some test sets do first (ObjectNet's frame is cut off).
        resize = evaluation_resize(self.cfg.INPUT.RESIZE_MODE, self.cfg.INPUT.SIZE, self.cfg.INPUT.INTERPOLATION)
        pre_transform = getattr(self.dm.dataset, "test_pre_transform", None)
        for step in (pre_transform, resize):
            if step is not None:
                logger.info(str(step))
        for loader, steps in ((self.val_loader, [resize]), (self.test_loader, [pre_transform, resize])):
            steps = [step for step in steps if step is not None]
            if loader is not None and steps:
                loader.dataset.transform = Compose([*steps, loader.dataset.transform])

    # ---- model --------------------------------------------------------------------------------
    def load_backbone(self):
        backbone = self.cfg.MODEL.BACKBONE
        logger.info("Loading CLIP (backbone: %s)", backbone.NAME)
        return load_backbone(backbone.NAME, weights=backbone.WEIGHTS, cache_dir=backbone.CACHE_DIR or None)

    def _check_backbone_supports_trainer(self, backbone):
        if not self.composition.learns_prompts or backbone.text_encoder.takes_embeddings:
            return
        registered = TRAINER_REGISTRY.registered_names()
        supported = [name for name, declared in COMPOSITIONS.items()
                     if name in registered and not declared.learns_prompts]
        raise UserFacingError(
            f"{self.cfg.TRAINER.NAME} learns prompt embeddings, which is not supported for this backbone "
            f"({backbone.name}: its text tower takes token ids only). Trainers supported on it: {', '.join(supported)}."
        )

    def build_classifier(self, backbone, classnames):
        """(classifier, {registered name: trained module}) of this trainer's composition."""
        return build_classifier(self.composition, self.cfg, backbone, classnames)

    def build_model(self):
        self.precision = Precision(self.composition.precision(self.cfg), self.device)
        backbone = self.dual_encoder
        self._check_input_size(backbone)
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

    def _check_input_size(self, backbone):
        expected = backbone.preprocess.image_size
        size = tuple(self.cfg.INPUT.SIZE)
        if size != (expected, expected):
            raise UserFacingError(
                f"INPUT.SIZE is {size} but {self.cfg.MODEL.BACKBONE.NAME} takes {expected} px images: "
                f"add `INPUT.SIZE ({expected},{expected})` to the command line or the config."
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
        """After each optimiser step; the OPTIM schedule counts epochs."""
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()

    def training_summary(self, output, labels, loss):
        """What one training step reports (the progress line and train/<key> scalars); with a head, the
        mask regulariser's value whatever ALPHA weighs it with: how far the mask has moved from 1."""
        summary = {"loss": loss.item(), "acc": compute_accuracy(output.logits, labels)[0].item()}
        if output.mask is not None:
            summary["mask_penalty"] = RAdaHead.mask_regularizer(output.mask.detach()).item()
        return summary

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
    def init_writer(self, log_dir):
        if distributed.is_main_process():  # one writer
            super().init_writer(log_dir)

    def evaluate(self, split):
        """Accuracy on `split` ("val" or "test"): Dassl's evaluation loop over its loader."""
        distributed.broadcast_buffers(self._models.values())  # every shard evaluated by the same model
        return super().test(split)

    def test(self, split=None):
        cfg = self.cfg
        evaluated = split or cfg.TEST.SPLIT
        if evaluated == "val" and self.val_loader is None:
            evaluated = "test"
        accuracy = self.evaluate(evaluated)
        # Program output like Dassl's result block (printed, so it reaches log.txt in any host).
        print(result_line(dataset=cfg.DATASET.NAME, subsample=cfg.DATASET.SUBSAMPLE_CLASSES, split=evaluated,
                          shots=cfg.DATASET.NUM_SHOTS, seed=cfg.SEED, trainer=cfg.TRAINER.NAME, accuracy=accuracy,
                          backbone=backbone_identity(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.WEIGHTS)))
        return accuracy

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
