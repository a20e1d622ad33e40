"""Checkpoint files in Dassl's layout, written as plain data so `torch.load(weights_only=True)`
reads them: <run dir>/<module name>/model.pth.tar-<epoch> (or model-best.pth.tar) and a
`checkpoint` file naming the latest one. Every checkpoint is read as data, whoever wrote it: a
file whose pickle names anything else is refused unrun (trainers/untrusted_files.py).

The modules of one epoch form a set: each module's file is written first, then one marker,
<run dir>/checkpoint_set.pth.tar-<epoch>, which lists them and holds what else a resumed run needs
(the random generators' state). A run resumes only from a set whose marker exists, so a kill
between two modules' saves can never mix epochs. Which sets are kept is decided here too
(`prune_checkpoints`).
"""

import collections
import logging
import os
import os.path as osp
import re

import torch

from ..errors import CheckpointError
from ..model.backbones.base import describe_signature, same_backbone
from ..untrusted_files import UnloadableFile, load_plain

logger = logging.getLogger(__name__)

CHECKPOINT_POINTER = "checkpoint"
BEST = "model-best.pth.tar"
EPOCH_FILE = re.compile(r"model\.pth\.tar-(\d+)")
MARKER_FILE = re.compile(r"checkpoint_set\.pth\.tar-(\d+)")
# Buffers rebuilt from the current class names; checkpoints of CoOp-family code carry them.
CLASS_DEPENDENT = ("token_prefix", "token_suffix", "tokenized_prompts")
# Prefixes other code bases put in front of the keys of the same modules.
FOREIGN_PREFIXES = ("module.", "mha.", "prompt_learner.")


class PickledState:
    """An optimiser or scheduler object pickled in an older Dassl checkpoint, built as its bare
    attributes: none of its code runs, and only the weights of such a file are used."""


def _plain_dict(*_default_factory):
    """A pickled defaultdict, read as a plain dict: torch's weights-only unpickler fills only plain ones."""
    return {}


# What Dassl 0.6.3's save_model pickles besides tensors and plain data: a warm-up scheduler's
# state dict holds its successor scheduler object, which holds the optimiser object
# (dassl/optim/lr_scheduler.py and optimizer.py: the optimisers and schedulers they build).
OLDER_DASSL_OBJECTS = {
    **{name: PickledState for name in (
        "torch.optim.lr_scheduler.StepLR", "torch.optim.lr_scheduler.MultiStepLR",
        "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.optim.sgd.SGD", "torch.optim.adam.Adam",
        "torch.optim.adamw.AdamW", "torch.optim.rmsprop.RMSprop", "dassl.optim.radam.RAdam",
    )},
    # The optimiser's per-parameter state (a defaultdict of dict), and MultiStepLR's milestones.
    "collections.defaultdict": _plain_dict,
    "builtins.dict": dict,
    "collections.Counter": collections.Counter,
}


def _save_atomically(payload, path):
    """torch.save to a temporary file, flushed to disk, then renamed: a kill at any moment leaves
    either the old file or the complete new one."""
    partial = path + ".partial"
    with open(partial, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def write_checkpoint(payload, folder, filename):
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, filename)
    _save_atomically(payload, path)
    pointer = osp.join(folder, CHECKPOINT_POINTER)
    with open(pointer + ".partial", "w") as handle:
        handle.write(filename + "\n")
    os.replace(pointer + ".partial", pointer)
    return path


def _epoch_files(folder):
    """{epoch: path} of the model.pth.tar-<epoch> files in a module folder."""
    found = {}
    for name in os.listdir(folder) if osp.isdir(folder) else ():
        if match := EPOCH_FILE.fullmatch(name):
            found[int(match.group(1))] = osp.join(folder, name)
    return found


def latest_checkpoint(folder):
    """The file the `checkpoint` pointer names; when the pointer is missing, empty or garbled, the
    newest model.pth.tar-<epoch> of the folder, with a warning."""
    pointer = osp.join(folder, CHECKPOINT_POINTER)
    problem = None
    if not osp.isfile(pointer):
        problem = f"the file {pointer} naming the latest checkpoint is missing"
    else:
        with open(pointer, encoding="utf-8", errors="replace") as handle:
            name = osp.basename(handle.readline().strip())
        path = osp.join(folder, name)
        if name and osp.isfile(path):
            return path
        problem = f"{pointer} is empty or garbled" if not name else f"{pointer} names {name!r}, which is not in {folder}"
    epochs = _epoch_files(folder)
    if not epochs:
        raise CheckpointError(f"No checkpoint in {folder}: {problem}, and the folder holds no model.pth.tar-<epoch>.")
    newest = epochs[max(epochs)]
    logger.warning("%s; using the newest checkpoint there, %s. (The pointer file holds the file name of the "
                   "latest checkpoint, e.g. model.pth.tar-5.)", problem, osp.basename(newest))
    return newest


# ---- checkpoint sets -------------------------------------------------------------------------------

def _marker_path(run_dir, epoch):
    return osp.join(run_dir, f"checkpoint_set.pth.tar-{epoch}")


def write_checkpoint_set(run_dir, epoch, payloads, resume_state):
    """Writes model.pth.tar-<epoch> of every module ({name: payload}), then the set's marker with
    `resume_state` (plain data: what a resumed run restores besides the modules)."""
    files = {name: osp.basename(write_checkpoint(payload, osp.join(run_dir, name), f"model.pth.tar-{epoch}"))
             for name, payload in payloads.items()}
    _save_atomically({"epoch": epoch, "modules": files, **resume_state}, _marker_path(run_dir, epoch))


def latest_checkpoint_set(run_dir, names):
    """(marker, {name: checkpoint path}) of the newest complete set of the modules `names`, or
    None when the run has no marker at all. Incomplete or unreadable sets are skipped with a warning."""
    epochs = sorted((int(m.group(1)) for f in (os.listdir(run_dir) if osp.isdir(run_dir) else ())
                     if (m := MARKER_FILE.fullmatch(f))), reverse=True)
    if not epochs:
        return None
    for epoch in epochs:
        marker_path = _marker_path(run_dir, epoch)
        try:
            marker = load_plain(marker_path)
        except UnloadableFile as error:
            if error.refused:
                raise CheckpointError(str(error)) from None
            logger.warning("Skipping the checkpoint set of epoch %d: %s", epoch, error)
            continue
        files = marker.get("modules", {}) if isinstance(marker, dict) else {}
        paths = {name: osp.join(run_dir, name, files.get(name, "")) for name in names}
        absent = [name for name, path in paths.items() if name not in files or not osp.isfile(path)]
        if absent:
            logger.warning("Skipping the checkpoint set of epoch %d: it lacks %s", epoch, ", ".join(absent))
            continue
        return marker, paths
    raise CheckpointError(
        f"No complete checkpoint set in {run_dir}: every checkpoint_set.pth.tar-<epoch> there is unreadable or lacks "
        f"a module file of {', '.join(names)}. Delete the run folder to train from scratch."
    )


def prune_checkpoints(run_dir, names, epoch, freq):
    """After epoch `epoch` was saved: delete the previous epoch's set unless TRAIN.CHECKPOINT_FREQ
    (`freq`) keeps it. Every epoch is saved so that an interrupted run resumes; only the last one
    and the multiples of `freq` are kept. The marker goes first, so a kill here leaves no
    marker of an incomplete set."""
    previous = epoch - 1
    if previous < 1 or (freq > 0 and previous % freq == 0):
        return
    marker = _marker_path(run_dir, previous)
    if osp.isfile(marker):
        os.remove(marker)
    for name in names:
        stale = osp.join(run_dir, name, f"model.pth.tar-{previous}")
        if osp.isfile(stale):
            os.remove(stale)


def find_checkpoint(folder, epoch=None):
    """model.pth.tar-<epoch> if epoch is given; else model-best.pth.tar, else the latest."""
    if not osp.isdir(folder):
        parent = osp.dirname(folder)
        raise CheckpointError(
            f"No trained weights at {folder}. --model-dir must be the output folder of a training run "
            f"of this trainer (it holds {osp.basename(folder)}/model.pth.tar-N); "
            f"{parent} {'exists but lacks that folder' if osp.isdir(parent) else 'does not exist'}."
        )
    if epoch is not None:
        path = osp.join(folder, f"model.pth.tar-{epoch}")
        if not osp.isfile(path):
            present = sorted(f for f in os.listdir(folder) if f.startswith("model"))
            raise CheckpointError(
                f"No checkpoint for epoch {epoch}: {path} does not exist. Present: {', '.join(present) or 'none'}. "
                "Leave out --load-epoch to load the latest one."
            )
        return path
    best = osp.join(folder, BEST)
    return best if osp.isfile(best) else latest_checkpoint(folder)


def read_checkpoint(path, backbone=None):
    """Load a checkpoint as data (tensors, plain data and the objects older Dassl checkpoints pickle,
    built inert); refuse one trained on another backbone than `backbone`."""
    try:
        checkpoint = load_plain(path, OLDER_DASSL_OBJECTS)
    except UnloadableFile as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry).")
    saved = checkpoint.get("backbone")
    if backbone is not None and saved is not None and not same_backbone(saved, backbone):
        raise CheckpointError(
            f"{path} was trained on another backbone ({describe_signature(saved)}) than the one loaded now "
            f"({describe_signature(backbone)}). Set MODEL.BACKBONE.NAME to the backbone of that run, or use a "
            "--model-dir trained with this backbone."
        )
    return checkpoint


def _normalise_key(key):
    changed = True
    while changed:
        changed = False
        for prefix in FOREIGN_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_weights(module, state_dict, path):
    """Load learned weights; class-dependent buffers are ignored, everything else must fit."""
    expected = module.state_dict()
    weights = {}
    for key, value in state_dict.items():
        key = key if key in expected else _normalise_key(key)
        if key.rpartition(".")[2] in CLASS_DEPENDENT and key not in expected:
            continue
        weights[key] = value
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path} lacks weights this model needs ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): "
            "it was saved by a different trainer or configuration."
        )
    for key, value in weights.items():
        if key in expected and value.shape != expected[key].shape:
            hint = ""
            if key.endswith("ctx") and value.dim() == 3:
                hint = " A class-specific context (CSC) only applies to the classes it was trained on."
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)} but this model needs {tuple(expected[key].shape)}; "
                f"the checkpoint was made with another backbone or configuration.{hint}"
            )
    if unexpected:
        logger.warning("Ignoring entries of %s this model does not have: %s", path, ", ".join(unexpected))
    module.load_state_dict({k: v for k, v in weights.items() if k in expected})


# ---- runs of the RAda authors' code ----------------------------------------------------------------

# Their Dassl trainers register their whole model (frozen CLIP included) under one name: RAda for
# the head on hand-crafted prompts, LP for the adapter variants, MultiModalPromptLearner for MaPLe's.
AUTHORS_FOLDERS = ("RAda", "LP", "MultiModalPromptLearner")
# Where each of our registered modules sits in their whole-model state dict: (key prefix, whether
# our module's keys are the rest of the key, i.e. the prefix is stripped).
WHOLE_MODEL_PARTS = {
    "rada_head": (("mha.", True),),
    "prompt_learner": (("prompt_learner.", True),),
    "adapter": (("adapter_image.", False), ("adapter_text.", False)),
}


def authors_run_folder(directory, names):
    """The checkpoint folder of a run of the RAda authors' code in `directory`, when it holds
    none of our modules' folders (`names`) and exactly one of theirs; else None."""
    if not osp.isdir(directory) or any(osp.isdir(osp.join(directory, name)) for name in names):
        return None
    found = [folder for folder in AUTHORS_FOLDERS if osp.isdir(osp.join(directory, folder))]
    return osp.join(directory, found[0]) if len(found) == 1 else None


def module_part(whole_state, name, path):
    """The weights of our module `name` in a whole-model state dict, and the key prefixes they came from."""
    if name not in WHOLE_MODEL_PARTS:
        raise CheckpointError(
            f"{path} holds a whole model of the RAda authors' code; this trainer's {name} has no counterpart in it. "
            f"Their runs load into trainers whose modules are among {', '.join(WHOLE_MODEL_PARTS)}."
        )
    part = {}
    for prefix, strip in WHOLE_MODEL_PARTS[name]:
        for key, value in whole_state.items():
            if key.startswith(prefix):
                part[key[len(prefix):] if strip else key] = value
    return part, [prefix + "*" for prefix, _ in WHOLE_MODEL_PARTS[name]]


def frozen_differences(model_state, whole_state, trained_prefixes):
    """Keys of the whole-model state dict, outside the trained modules, whose tensor the model
    has under the same name with another value (compared in the model's dtype)."""
    differing = []
    for key, value in whole_state.items():
        if key.startswith(tuple(trained_prefixes)) or key not in model_state:
            continue
        ours = model_state[key]
        if ours.shape != value.shape or not torch.equal(ours, value.to(device=ours.device, dtype=ours.dtype)):
            differing.append(key)
    return differing
