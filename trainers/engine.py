"""The Dassl glue shared by every trainer of this project.

`CLIPTrainer` is a Dassl `TrainerX` that loads the backbone (MODEL.BACKBONE.NAME: OpenAI CLIP,
open_clip, ...; trainers.model.backbones) once, lets a subclass compose the classifier (`build_classifier`) and name the modules it trains (`trainable_modules`), and
handles the rest: precision, optimisers, the learning-rate schedule, the training step, the
result line that `scripts/parse_results.py` reads, and checkpoints.

Checkpoints are written and read here rather than by Dassl 0.6.3, whose scheduler state
cannot be loaded by current torch (`weights_only=True`): every file holds plain data and records
the backbone and trainer it was made with; each epoch is saved as one checkpoint set (see
trainers/runs/checkpoint.py) so that an interrupted run resumes bit for bit.
"""

import datetime
import logging
import os
import os.path as osp
import sys
import time

import torch
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer
from dassl.utils import AverageMeter, MetricMeter
from torchvision.transforms import Compose

from .config import check_values
from .errors import CheckpointError, UserFacingError
from .model.backbones import follow_preprocess, load_backbone
from .model.image_resize import evaluation_resize
from .model.precision import Precision
from .model.rada_head import rada_loss
from .runs import distributed
from .runs.checkpoint import (
    CHECKPOINT_POINTER,
    authors_run_folder,
    find_checkpoint,
    frozen_differences,
    latest_checkpoint,
    latest_checkpoint_set,
    load_weights,
    module_part,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
    write_checkpoint_set,
)
from .runs.random_state import capture as capture_random_state
from .runs.random_state import restore as restore_random_state
from .runs.random_state import use_deterministic_algorithms
from .runs.results import backbone_identity, config_differences, flatten_config, other_settings_message, result_line
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
    """Base of all trainers here. Subclasses set PREC_NODE and implement build_classifier."""

    # The config node whose PREC key sets CLIP's precision, TRAINER.<PREC_NODE>.PREC (the rule is in
    # trainers/config.py).
    PREC_NODE = "COOP"
    # Whether the trainer learns prompt token embeddings (CoOp's context, MaPLe's prompts), which
    # needs a text tower that takes embeddings; Hugging Face towers take token ids only.
    LEARNS_PROMPTS = False

    def __init__(self, cfg):
        _log_to_stdout()
        if cfg.DETERMINISTIC:  # before the model reaches the GPU (cuBLAS reads its setting once)
            use_deterministic_algorithms()
        super().__init__(cfg)
        self.evaluator = distributed.sharded_evaluator(self.evaluator)  # distributed: gathers the shards

    def check_cfg(self, cfg):
        """Dassl calls this first in the constructor, before anything is built."""
        check_values(cfg, prec_node=self.PREC_NODE)

    # ---- to be provided by subclasses -------------------------------------------------------
    def build_classifier(self, backbone, classnames):
        """Return the CLIPClassifier of this method on `backbone` (a trainers.model.backbones.Backbone)."""
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
        if not self.LEARNS_PROMPTS or backbone.text_encoder.takes_embeddings:
            return
        supported = [
            name for name in TRAINER_REGISTRY.registered_names()
            if issubclass(TRAINER_REGISTRY.get(name), CLIPTrainer) and not TRAINER_REGISTRY.get(name).LEARNS_PROMPTS
        ]
        raise UserFacingError(
            f"{self.cfg.TRAINER.NAME} learns prompt embeddings, which is not supported for this backbone "
            f"({backbone.name}: its text tower takes token ids only). Trainers supported on it: {', '.join(supported)}."
        )

    def build_model(self):
        self.precision = Precision(self.precision_mode(), self.device)
        backbone = self.dual_encoder
        self._check_input_size(backbone)
        self.precision.cast_clip(backbone)
        self.backbone = backbone.signature()
        logger.info("CLIP: %s; precision %s", backbone.describe(), self.precision.mode)

        self.model = self.build_classifier(backbone, self.dm.dataset.classnames)
        self.model.requires_grad_(False)
        trainable = self.trainable_modules()
        for module in trainable.values():
            module.requires_grad_(True)
        self.model.to(self.device)
        for name, module in trainable.items():
            self.register_model(name, module, *self.build_optimization(name, module))
            count = sum(p.numel() for p in module.parameters() if p.requires_grad)
            logger.info("Learnable parameters in %s: %s", name, f"{count:,}")
        self.scaler = self.precision.grad_scaler()
        self.data_parallel = None  # distributed: set by wrap_data_parallel before training

    def _check_input_size(self, backbone):
        expected = backbone.preprocess.image_size
        size = tuple(self.cfg.INPUT.SIZE)
        if size != (expected, expected):
            raise UserFacingError(
                f"INPUT.SIZE is {size} but {self.cfg.MODEL.BACKBONE.NAME} takes {expected} px images: "
                f"add `INPUT.SIZE ({expected},{expected})` to the command line or the config."
            )

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
        """Dassl's training loop; its progress lines also give the throughput of all processes."""
        self.set_model_mode("train")
        losses, batch_time, data_time = MetricMeter(), AverageMeter(), AverageMeter()
        self.num_batches = len(self.train_loader_x)
        images = 0
        end = time.time()
        for batch_idx, batch in enumerate(self.train_loader_x):
            self.batch_idx = batch_idx
            data_time.update(time.time() - end)
            losses.update(self.forward_backward(batch))
            batch_time.update(time.time() - end)
            images += len(batch["label"]) * distributed.world_size()
            print_freq = self.cfg.TRAIN.PRINT_FREQ
            if (self.batch_idx + 1) % print_freq == 0 or self.num_batches < print_freq:
                remaining = self.num_batches - self.batch_idx - 1 + (self.max_epoch - self.epoch - 1) * self.num_batches
                print(
                    f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                    f"time {batch_time.val:.3f} ({batch_time.avg:.3f}) data {data_time.val:.3f} ({data_time.avg:.3f}) "
                    f"{losses} lr {self.get_current_lr():.4e} images/s {images / batch_time.sum:.1f} "
                    f"eta {datetime.timedelta(seconds=int(batch_time.avg * remaining))}"
                )
            n_iter = self.epoch * self.num_batches + self.batch_idx
            for name, meter in losses.meters.items():
                self.write_scalar("train/" + name, meter.avg, n_iter)
            self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            end = time.time()

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

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

    # ---- checkpoints --------------------------------------------------------------------------
    def after_epoch(self):
        if not self.cfg.TEST.NO_TEST and self.cfg.TEST.FINAL_MODEL == "best_val":
            result = self.test(split="val")
            if result > self.best_result:
                self.best_result = result
                self.save_model(self.epoch, self.output_dir, val_result=result, model_name="model-best.pth.tar")
        self.save_model(self.epoch, self.output_dir)
        if distributed.is_main_process():  # one writer
            prune_checkpoints(self.output_dir, self.get_model_names(), self.epoch + 1, self.cfg.TRAIN.CHECKPOINT_FREQ)

    def _checkpoint_payload(self, name, epoch, val_result):
        return {
            "state_dict": self._models[name].state_dict(),
            "epoch": epoch + 1,
            "optimizer": self._optims[name].state_dict() if self._optims[name] else None,
            "scheduler": self._scheds[name].state_dict() if self._scheds[name] else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "val_result": val_result,
            "backbone": self.backbone,
            "trainer": self.cfg.TRAINER.NAME,
        }

    def _random_loaders(self):
        return {"train_loader_x": self.train_loader_x}

    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        # Every process's generators (each draws its own augmentations), collected before one process writes.
        random_states = None if model_name else distributed.gather_objects(capture_random_state(self._random_loaders()))
        self._write_checkpoints(epoch, directory, val_result, model_name, random_states)

    @distributed.on_main_process
    def _write_checkpoints(self, epoch, directory, val_result, model_name, random_states):
        names = self.get_model_names()
        if model_name:  # model-best.pth.tar: a copy of the best epoch, not a point to resume from
            for name in names:
                write_checkpoint(self._checkpoint_payload(name, epoch, val_result), osp.join(directory, name), model_name)
            return
        payloads = {name: self._checkpoint_payload(name, epoch, val_result) for name in names}
        write_checkpoint_set(directory, epoch + 1, payloads, {
            "random_states": random_states,
            "best_result": float(self.best_result),
            "config": flatten_config(self.cfg),
            "trainer": self.cfg.TRAINER.NAME,
        })

    def resume_model_if_exist(self, directory):
        """Resumes from the newest complete checkpoint set: every module, optimiser, scheduler and
        the random generators as they were at the end of that epoch."""
        names = self.get_model_names()
        found = latest_checkpoint_set(directory, names) if names else None
        if found is None:
            return self._resume_without_set(directory, names)
        marker, paths = found
        changed = config_differences(marker.get("config", {}), flatten_config(self.cfg))
        if changed:
            raise UserFacingError(other_settings_message(
                directory, changed, "; resuming it would mix the two (e.g. continue the old schedule)"))
        logger.info("Found checkpoint at %s (will resume training)", directory)
        for name in names:
            self._resume_module(name, paths[name])
        self._restore_random_states(marker)
        self.best_result = marker.get("best_result", self.best_result)
        logger.info("Resumed the checkpoint set of epoch %d (next epoch: %d)", marker["epoch"], marker["epoch"] + 1)
        return marker["epoch"]

    def _restore_random_states(self, marker):
        """Each process continues its own random stream; markers before per-process states hold one."""
        states = marker.get("random_states") or [marker["random_state"]]
        if len(states) != distributed.world_size():
            logger.warning("The checkpoint was written by %d process(es) and this run has %d: the random generators "
                           "are not restored (each process keeps seed + rank), so the resumed run is not "
                           "bit-identical to an uninterrupted one.", len(states), distributed.world_size())
            return
        restore_random_state(states[distributed.rank()], self._random_loaders())

    def _resume_without_set(self, directory, names):
        """Runs written before checkpoint sets existed: each module's latest checkpoint, all of one epoch."""
        if not names or not all(osp.isfile(osp.join(directory, n, CHECKPOINT_POINTER)) for n in names):
            logger.info("No checkpoint found, train from scratch")
            return 0
        logger.info("Found checkpoint at %s (will resume training)", directory)
        logger.warning("%s has no checkpoint set markers (an older run): the random generators are not restored, "
                       "so the resumed run is not bit-identical to an uninterrupted one.", directory)
        epochs = {name: self._resume_module(name, latest_checkpoint(osp.join(directory, name))) for name in names}
        if len(set(epochs.values())) > 1:
            raise CheckpointError(
                f"The latest checkpoints in {directory} are of different epochs "
                f"({', '.join(f'{n}: {e}' for n, e in epochs.items())}); delete the run folder to train again."
            )
        return next(iter(epochs.values()))

    def _resume_module(self, name, path):
        checkpoint = read_checkpoint(path, self.backbone)
        load_weights(self._models[name], checkpoint["state_dict"], path)
        if self._optims[name] is not None and checkpoint.get("optimizer"):
            self._optims[name].load_state_dict(checkpoint["optimizer"])
        if self._scheds[name] is not None and checkpoint.get("scheduler"):
            self._scheds[name].load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        logger.info("Resumed %s from %s (next epoch: %d)", name, path, checkpoint["epoch"] + 1)
        return checkpoint["epoch"]

    def load_model(self, directory, epoch=None):
        """Loads the modules trained in `directory`, a training output of this project or a run of
        the RAda authors' code (their whole model under RAda/, LP/ or MultiModalPromptLearner/).

        A run of another trainer loads when it trained exactly modules this trainer has (same
        registered names, same weights): e.g. a RAda run into RAdaTTT. A run that also trained
        modules this trainer lacks (a RAdaCoOp run given to RAda) is refused, since part of it
        would be ignored; one lacking a module this trainer needs fails on the missing folder."""
        if not directory:
            logger.info("No --model-dir given: evaluating without loading trained weights")
            return
        names = self.get_model_names()
        authors_folder = authors_run_folder(directory, names)
        if authors_folder:
            self._load_authors_run(authors_folder, epoch)
            return
        self._refuse_partial_run(directory, names)
        trainers = set()
        for name in names:
            path = find_checkpoint(osp.join(directory, name), epoch)
            checkpoint = read_checkpoint(path, self.backbone)
            load_weights(self._models[name], checkpoint["state_dict"], path)
            trainers.add(checkpoint.get("trainer"))
            val = checkpoint.get("val_result")
            val_text = f", val_result={val:.1f}" if isinstance(val, (int, float)) else ""
            logger.info("Load %s to %s (epoch=%s%s)", path, name, checkpoint.get("epoch"), val_text)
        others = sorted(t for t in trainers if t and t != self.cfg.TRAINER.NAME)
        if others:
            logger.info("%s was trained by %s; its %s load unchanged into %s", directory, ", ".join(others),
                        ", ".join(names), self.cfg.TRAINER.NAME)

    def _refuse_partial_run(self, directory, names):
        unused = sorted(entry for entry in os.listdir(directory) if entry not in names
                        and osp.isfile(osp.join(directory, entry, CHECKPOINT_POINTER))) if osp.isdir(directory) else []
        if unused:
            raise CheckpointError(
                f"{directory} also holds trained {', '.join(unused)}, which {self.cfg.TRAINER.NAME} does not have "
                f"(it trains {', '.join(names)}) and would ignore. Evaluate that run with the trainer that wrote it."
            )

    def _load_authors_run(self, folder, epoch):
        path = find_checkpoint(folder, epoch)
        checkpoint = read_checkpoint(path, self.backbone)
        whole = checkpoint["state_dict"]
        prefixes = []
        for name in self.get_model_names():
            part, sources = module_part(whole, name, path)
            load_weights(self._models[name], part, path)
            prefixes += [source.rstrip("*") for source in sources]
            logger.info("Load %s (%s of the RAda authors' whole model) to %s (epoch=%s)", path, ", ".join(sources), name,
                        checkpoint.get("epoch"))
        differing = frozen_differences(self.model.state_dict(), whole, prefixes)
        if differing:
            logger.warning("%s: %d frozen CLIP tensors differ from the loaded backbone's (e.g. %s): predictions will "
                           "not be those of the authors' model. Set MODEL.BACKBONE.NAME to the CLIP that run used.",
                           path, len(differing), ", ".join(differing[:3]))
