"""The checkpoint policy of one run, in one object. The training loop calls it once per epoch
(`end_of_epoch`), once at its start (`resume`) and before an evaluation (`load`), and knows
nothing of files; the file format is trainers/runs/checkpoint.py's.

What it decides: which modules, optimisers, schedulers and loss scaler a checkpoint set holds,
with every process's random generators and the states a method adds (`add_state`: state that
spans epochs, e.g. a running average of prompts, restored on resume); which sets are kept; whether
a run folder may be resumed (same settings) or loaded (a run of this project with exactly this
trainer's modules, or a run of the RAda authors' code); and the refusals in between.
"""

import logging
import os
import os.path as osp

from ..errors import CheckpointError, UserFacingError
from . import distributed
from .checkpoint import (
    BEST,
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
from .random_state import capture as capture_random_state
from .random_state import restore as restore_random_state
from .results import config_differences, other_settings_message

logger = logging.getLogger(__name__)


class RunKeeper:
    """Checkpoints of the modules of one trainer.

    modules, optimizers, schedulers: {registered name: object} (an optimiser or scheduler may be
    None); scaler: the run's GradScaler; backbone: the backbone's signature (checkpoints of another
    backbone are refused); trainer: the trainer's name; config: the run's flattened config of record
    (a resume with other settings is refused); random_loaders: {name: DataLoader} whose generators
    are saved with the process's own; model: the whole classifier (to compare a loaded authors' run's
    frozen weights with it).
    """

    def __init__(self, *, run_dir, trainer, backbone, config, modules, optimizers, schedulers, scaler,
                 random_loaders, model):
        self.run_dir = run_dir
        self.trainer = trainer
        self.backbone = backbone
        self.config = config
        self.modules, self.optimizers, self.schedulers = modules, optimizers, schedulers
        self.scaler = scaler
        self.random_loaders = random_loaders
        self.model = model
        self.best_result = float("-inf")
        self._states = {}

    @property
    def names(self):
        return list(self.modules)

    def add_state(self, name, holder):
        """Keep `holder`'s state_dict() (plain data and tensors) in every checkpoint set and give it back
        through holder.load_state_dict() on resume: state of a method that spans epochs."""
        self._states[name] = holder

    # ---- saving --------------------------------------------------------------------------------
    def end_of_epoch(self, epoch, val_result=None, keep_every=0):
        """After epoch `epoch` (0-based): model-best when val_result is the best so far, the epoch's
        checkpoint set, and the previous set deleted unless `keep_every` (TRAIN.CHECKPOINT_FREQ) keeps it.
        Every process calls it (each contributes its random generators); process 0 writes."""
        if val_result is not None and val_result > self.best_result:
            self.best_result = val_result
            self._write_best(epoch, val_result)
        random_states = distributed.gather_objects(capture_random_state(self.random_loaders))
        self._write_set(epoch, random_states, keep_every)

    def _payload(self, name, epoch, val_result):
        optimizer, scheduler = self.optimizers.get(name), self.schedulers.get(name)
        return {
            "state_dict": self.modules[name].state_dict(),
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "val_result": val_result,
            "backbone": self.backbone,
            "trainer": self.trainer,
        }

    @distributed.on_main_process
    def _write_best(self, epoch, val_result):
        # A copy of the best epoch's modules, not a point to resume from.
        for name in self.names:
            write_checkpoint(self._payload(name, epoch, val_result), osp.join(self.run_dir, name), BEST)

    @distributed.on_main_process
    def _write_set(self, epoch, random_states, keep_every):
        payloads = {name: self._payload(name, epoch, None) for name in self.names}
        write_checkpoint_set(self.run_dir, epoch + 1, payloads, {
            "random_states": random_states,
            "best_result": float(self.best_result),
            "config": self.config,
            "trainer": self.trainer,
            "method_states": {name: holder.state_dict() for name, holder in self._states.items()},
        })
        prune_checkpoints(self.run_dir, self.names, epoch + 1, keep_every)

    # ---- resuming ------------------------------------------------------------------------------
    def resume(self, directory):
        """The number of epochs `directory` holds, restored from its newest complete checkpoint set:
        every module, optimiser, scheduler, the scaler, the random generators and the added states
        as they were at the end of that epoch; 0 when it holds none."""
        found = latest_checkpoint_set(directory, self.names) if self.names else None
        if found is None:
            return self._resume_without_set(directory)
        marker, paths = found
        changed = config_differences(marker.get("config", {}), self.config)
        if changed:
            raise UserFacingError(other_settings_message(
                directory, changed, "; resuming it would mix the two (e.g. continue the old schedule)"))
        logger.info("Found checkpoint at %s (will resume training)", directory)
        for name in self.names:
            self._resume_module(name, paths[name])
        self._restore_random_states(marker)
        self._restore_method_states(marker.get("method_states", {}))
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
        restore_random_state(states[distributed.rank()], self.random_loaders)

    def _restore_method_states(self, saved):
        for name, holder in self._states.items():
            if name in saved:
                holder.load_state_dict(saved[name])
            else:
                logger.warning("The checkpoint set has no %s (written by an earlier version): it starts afresh, so "
                               "the resumed run is not bit-identical to an uninterrupted one.", name)

    def _resume_without_set(self, directory):
        """Runs written before checkpoint sets existed: each module's latest checkpoint, all of one epoch."""
        names = self.names
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
        load_weights(self.modules[name], checkpoint["state_dict"], path)
        optimizer, scheduler = self.optimizers.get(name), self.schedulers.get(name)
        if optimizer is not None and checkpoint.get("optimizer"):
            optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and checkpoint.get("scheduler"):
            scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        logger.info("Resumed %s from %s (next epoch: %d)", name, path, checkpoint["epoch"] + 1)
        return checkpoint["epoch"]

    # ---- loading -------------------------------------------------------------------------------
    def load(self, directory, epoch=None, other_trainers_hint=""):
        """Loads the modules trained in `directory`, a training output of this project or a run of
        the RAda authors' code (their whole model under RAda/, LP/ or MultiModalPromptLearner/).

        A run of another trainer loads when it trained exactly modules this trainer has (same
        registered names, same weights): e.g. a RAda run into RAdaTTT. A run that also trained
        modules this trainer lacks (a RAdaCoOp run given to RAda) is refused, since part of it
        would be ignored (`other_trainers_hint` ends that message); one lacking a module this trainer
        needs fails on the missing folder."""
        if not directory:
            logger.info("No --model-dir given: evaluating without loading trained weights")
            return
        authors_folder = authors_run_folder(directory, self.names)
        if authors_folder:
            self._load_authors_run(authors_folder, epoch)
            return
        self._refuse_partial_run(directory, other_trainers_hint)
        trainers = set()
        for name in self.names:
            path = find_checkpoint(osp.join(directory, name), epoch)
            checkpoint = read_checkpoint(path, self.backbone)
            load_weights(self.modules[name], checkpoint["state_dict"], path)
            trainers.add(checkpoint.get("trainer"))
            val = checkpoint.get("val_result")
            val_text = f", val_result={val:.1f}" if isinstance(val, (int, float)) else ""
            logger.info("Load %s to %s (epoch=%s%s)", path, name, checkpoint.get("epoch"), val_text)
        others = sorted(t for t in trainers if t and t != self.trainer)
        if others:
            logger.info("%s was trained by %s; its %s load unchanged into %s", directory, ", ".join(others),
                        ", ".join(self.names), self.trainer)

    def _refuse_partial_run(self, directory, hint):
        unused = sorted(entry for entry in os.listdir(directory) if entry not in self.names
                        and osp.isfile(osp.join(directory, entry, CHECKPOINT_POINTER))) if osp.isdir(directory) else []
        if unused:
            raise CheckpointError(
                f"{directory} also holds trained {', '.join(unused)}, which {self.trainer} does not have "
                f"(it trains {', '.join(self.names)}) and would ignore. "
                + (hint or "Evaluate that run with the trainer that wrote it.")
            )

    def _load_authors_run(self, folder, epoch):
        path = find_checkpoint(folder, epoch)
        checkpoint = read_checkpoint(path, self.backbone)
        whole = checkpoint["state_dict"]
        prefixes = []
        for name in self.names:
            part, sources = module_part(whole, name, path)
            load_weights(self.modules[name], part, path)
            prefixes += [source.rstrip("*") for source in sources]
            logger.info("Load %s (%s of the RAda authors' whole model) to %s (epoch=%s)", path, ", ".join(sources), name,
                        checkpoint.get("epoch"))
        differing = frozen_differences(self.model.state_dict(), whole, prefixes)
        if differing:
            logger.warning("%s: %d frozen CLIP tensors differ from the loaded backbone's (e.g. %s): predictions will "
                           "not be those of the authors' model. Set MODEL.BACKBONE.NAME to the CLIP that run used.",
                           path, len(differing), ", ".join(differing[:3]))
