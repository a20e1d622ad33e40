"""Checkpoint files in Dassl's layout, written as plain data so `torch.load(weights_only=True)`
reads them: <run dir>/<module name>/model.pth.tar-<epoch> (or model-best.pth.tar) and a
`checkpoint` file naming the latest one.
"""

import logging
import os
import os.path as osp

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_POINTER = "checkpoint"
BEST = "model-best.pth.tar"
# Buffers rebuilt from the current class names; checkpoints of CoOp-family code carry them.
CLASS_DEPENDENT = ("token_prefix", "token_suffix", "tokenized_prompts")
# Prefixes other code bases put in front of the keys of the same modules.
FOREIGN_PREFIXES = ("module.", "mha.", "prompt_learner.")


def write_checkpoint(payload, folder, filename):
    os.makedirs(folder, exist_ok=True)
    path = osp.join(folder, filename)
    partial = path + ".partial"
    torch.save(payload, partial)
    os.replace(partial, path)  # an interrupted save never leaves a truncated checkpoint
    with open(osp.join(folder, CHECKPOINT_POINTER), "w") as pointer:
        pointer.write(filename + "\n")
    return path


def latest_checkpoint(folder):
    pointer = osp.join(folder, CHECKPOINT_POINTER)
    if not osp.isfile(pointer):
        raise CheckpointError(f"No checkpoint in {folder}: the file {pointer} naming the latest one is missing.")
    with open(pointer) as handle:
        name = osp.basename(handle.readline().strip())
    path = osp.join(folder, name)
    if not osp.isfile(path):
        raise CheckpointError(f"{pointer} names {name}, which is not in {folder}.")
    return path


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
    """Load a checkpoint; refuse one trained on another backbone than `backbone`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not plain data"
        try:
            # Files written by Dassl 0.6.3 pickle scheduler objects: read them the old way.
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"Cannot read checkpoint {path}: {error}. The file is corrupt or not a checkpoint.") from None
        logger.warning("%s holds pickled Python objects (an older Dassl checkpoint); loaded it with "
                       "weights_only=False. Only load such files if you trust their origin.", path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict' entry).")
    saved = checkpoint.get("backbone")
    if backbone is not None and saved is not None and saved != backbone:
        raise CheckpointError(
            f"{path} was trained on another backbone ({_describe(saved)}) than the one loaded now "
            f"({_describe(backbone)}). Set MODEL.BACKBONE.NAME to the backbone of that run, or use a "
            "--model-dir trained with this backbone."
        )
    return checkpoint


def _describe(signature):
    return f"{signature['vision']} width {signature['vision_width']}, embedding {signature['embed_dim']}"


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
