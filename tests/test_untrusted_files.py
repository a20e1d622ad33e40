"""Files from elsewhere (a downloaded run, a colleague's results tree, weights) are read as data:
a pickle that would run code on load is refused with one line naming the file, and nothing runs.
Every reader of such files is checked with files whose pickle calls os.system or open."""

import ast
import glob
import hashlib
import logging
import os
import pickle
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import requires_dassl
from tests.train_harness import TrainRun
from trainers.errors import CheckpointError
from trainers.model.backbones import load_backbone
from trainers.model.backbones.base import BackboneError
from trainers.model.backbones.openai_loader import CLIPLoadError, build_clip, load_clip
from trainers.model.backbones.openai_package import clip_api
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import (
    PickledState,
    latest_checkpoint_set,
    read_checkpoint,
    write_checkpoint_set,
)

REPO = Path(__file__).resolve().parent.parent


class RunsShell:
    """Unpickling this runs `touch marker` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


class OpensFile:
    """Unpickling this creates the marker file through open(marker, "w")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


TRAPS = {"os.system": (RunsShell, "system"), "open": (OpensFile, "open")}


def write_trap(path, trap, marker, as_torch=True):
    """A checkpoint-shaped file whose pickle runs `trap` on load (torch.save's format or a bare pickle).
    The trap comes first: a bare pickle's tensors would name a torch function that is refused too."""
    content = {"scheduler": trap(str(marker)), "state_dict": {"weight": torch.zeros(2)}, "epoch": 1}
    if as_torch:
        torch.save(content, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return str(path)


def assert_refused(error, path, called):
    """One line naming the file and the refused function; never torch's advice to drop weights_only."""
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert "was refused" in message and called in message and "nothing in it was run" in message, message
    assert "weights_only" not in message, message


def assert_not_loadable(error, path):
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    assert "is not a loadable checkpoint" in message and "corrupt" in message, message
    assert "weights_only" not in message, message


GARBLED = {
    "random bytes": os.urandom(600),
    "a pickle cut short": b"\x80\x02}q\x00(X\x05\x00\x00\x00epoch",
    "empty": b"",
}


def truncated_checkpoint(tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": {"weight": torch.ones(64)}}, whole)
    return whole.read_bytes()[:300]


# ---- checkpoints (--model-dir, resume, the RAda authors' runs) ----------------------------------

@pytest.mark.parametrize("trap", TRAPS)
@pytest.mark.parametrize("as_torch", [True, False], ids=["torch.save", "bare pickle"])
def test_checkpoint_that_would_run_code_is_refused(trap, as_torch, tmp_path):
    marker = tmp_path / "ran"
    trap_class, called = TRAPS[trap]
    path = write_trap(tmp_path / "model.pth.tar-1", trap_class, marker, as_torch)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert not marker.exists()
    assert_refused(error.value, path, called)


@pytest.mark.parametrize("content", GARBLED)
def test_garbled_checkpoint_is_not_loadable_and_gets_no_weights_only_advice(content, tmp_path):
    path = tmp_path / "model.pth.tar-1"
    path.write_bytes(GARBLED[content])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(str(path))
    assert_not_loadable(error.value, path)


def test_truncated_checkpoint_is_not_loadable(tmp_path):
    path = tmp_path / "model.pth.tar-1"
    path.write_bytes(truncated_checkpoint(tmp_path))
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(str(path))
    assert_not_loadable(error.value, path)


def dassl_warmup(warmup_class, optimizer, successor, **rates):
    """Dassl 0.6.3's warm-up scheduler as torch 1.x built it: its __init__ passes `verbose` positionally,
    which current torch refuses, so the base initialiser is called the way torch 1.x's took it."""
    scheduler = warmup_class.__new__(warmup_class)
    scheduler.successor, scheduler.warmup_epoch = successor, 1
    for name, value in rates.items():
        setattr(scheduler, name, value)
    torch.optim.lr_scheduler.LRScheduler.__init__(scheduler, optimizer, -1)
    return scheduler


@requires_dassl
@pytest.mark.parametrize("optimizer_name, schedule, warmup", [
    ("sgd", "cosine", "constant"),  # CoOp's recipes
    ("radam", "multi_step", "linear"),  # Dassl's own optimiser class, MultiStepLR's Counter
    ("adam", "single_step", "constant"),
])
def test_older_dassl_checkpoint_with_a_pickled_scheduler_loads_its_weights(optimizer_name, schedule, warmup, tmp_path):
    from dassl.config import get_cfg_default
    from dassl.optim import build_lr_scheduler, build_optimizer
    from dassl.optim.lr_scheduler import ConstantWarmupScheduler, LinearWarmupScheduler
    from dassl.utils import save_checkpoint

    cfg = get_cfg_default().OPTIM
    cfg.NAME, cfg.LR_SCHEDULER, cfg.MAX_EPOCH, cfg.STEPSIZE = optimizer_name, schedule, 5, (2, 4)
    head = RAdaHead(16, num_heads=4)
    optimizer = build_optimizer(head, cfg)
    successor = build_lr_scheduler(optimizer, cfg)  # WARMUP_EPOCH 0: the torch scheduler itself
    if warmup == "constant":
        scheduler = dassl_warmup(ConstantWarmupScheduler, optimizer, successor, cons_lr=1e-5)
    else:
        scheduler = dassl_warmup(LinearWarmupScheduler, optimizer, successor, min_lr=1e-5)
    head(torch.randn(2, 16), torch.randn(3, 16), 10.0)[0].sum().backward()
    optimizer.step()
    scheduler.step()
    saved = scheduler.state_dict()
    assert isinstance(saved["successor"], torch.optim.lr_scheduler.LRScheduler)  # what makes these files pickles
    save_checkpoint({"state_dict": head.state_dict(), "epoch": 1, "optimizer": optimizer.state_dict(),
                     "scheduler": saved, "val_result": None}, save_dir=str(tmp_path / "rada_head"),
                    model_name="model.pth.tar-1")

    checkpoint = read_checkpoint(str(tmp_path / "rada_head" / "model.pth.tar-1"))
    assert checkpoint["state_dict"].keys() == head.state_dict().keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in head.state_dict().items())
    # The pickled scheduler and its optimiser are built as bare attributes: none of their code ran.
    successor = checkpoint["scheduler"]["successor"]
    assert type(successor) is PickledState and type(successor.optimizer) is PickledState
    assert checkpoint["scheduler"]["warmup_epoch"] == 1


def test_legacy_format_checkpoint_with_a_pickled_scheduler_loads(tmp_path):
    """torch before 1.6 wrote its own (non-zip) format; Dassl runs of that time hold the same objects."""
    head = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    successor = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4])
    head(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    successor.step()
    path = tmp_path / "model.pth.tar-3"
    torch.save({"state_dict": head.state_dict(), "epoch": 3, "optimizer": optimizer.state_dict(),
                "scheduler": {"successor": successor, "warmup_epoch": 1}}, path, _use_new_zipfile_serialization=False)
    checkpoint = read_checkpoint(str(path))
    assert torch.equal(checkpoint["state_dict"]["weight"], head.weight)
    assert type(checkpoint["scheduler"]["successor"]) is PickledState


# ---- run records: the checkpoint sets a resumed run reads ---------------------------------------

def write_sets(run_dir, epochs):
    head = RAdaHead(16, num_heads=4)
    for epoch in epochs:
        write_checkpoint_set(str(run_dir), epoch, {"rada_head": {"state_dict": head.state_dict(), "epoch": epoch}},
                             {"random_states": []})


def test_checkpoint_set_marker_that_would_run_code_is_refused(tmp_path):
    write_sets(tmp_path, (1, 2))
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint_set.pth.tar-2"
    torch.save({"epoch": 2, "modules": {"rada_head": "model.pth.tar-2"}, "random_states": RunsShell(str(marker))},
               path)
    with pytest.raises(CheckpointError) as error:
        latest_checkpoint_set(str(tmp_path), ["rada_head"])
    assert not marker.exists()
    assert_refused(error.value, path, "system")


def test_garbled_checkpoint_set_marker_is_skipped_without_weights_only_advice(tmp_path, caplog):
    write_sets(tmp_path, (1, 2))
    (tmp_path / "checkpoint_set.pth.tar-2").write_bytes(GARBLED["random bytes"])
    with caplog.at_level(logging.WARNING):
        marker, _ = latest_checkpoint_set(str(tmp_path), ["rada_head"])
    assert marker["epoch"] == 1
    assert "checkpoint_set.pth.tar-2 is not a loadable checkpoint" in caplog.text
    assert "weights_only" not in caplog.text


@requires_dassl
@pytest.mark.e2e
def test_eval_only_refuses_a_model_dir_whose_checkpoint_would_run_code(synthetic_data_root, tiny_clip_path, tmp_path):
    model_dir = tmp_path / "downloaded_run"
    marker = tmp_path / "ran"
    os.makedirs(model_dir / "rada_head")
    path = write_trap(model_dir / "rada_head" / "model.pth.tar-5", RunsShell, marker)
    (model_dir / "rada_head" / "checkpoint").write_text("model.pth.tar-5\n")
    run = TrainRun("RAda", "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    result = run.evaluate(model_dir=str(model_dir), subsample="all")
    assert result.returncode == 2 and "Traceback" not in result.output, result.output[-3000:]
    assert not marker.exists()
    refusal = [line for line in result.output.splitlines() if "was refused" in line]
    assert len(refusal) == 1 and path in refusal[0] and "weights_only" not in result.output


# ---- backbone weights: OpenAI CLIP files, TorchScript archives, open_clip, Hugging Face ----------

@pytest.mark.parametrize("trap", TRAPS)
def test_clip_weights_that_would_run_code_are_refused(trap, tmp_path):
    marker = tmp_path / "ran"
    trap_class, called = TRAPS[trap]
    path = write_trap(tmp_path / "ViT-B-16.pt", trap_class, marker)
    with pytest.raises(CLIPLoadError) as error:
        load_clip(path)
    assert not marker.exists()
    assert_refused(error.value, path, called)


@pytest.mark.parametrize("content", GARBLED)
def test_garbled_clip_weights_are_not_loadable_and_get_no_weights_only_advice(content, tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(GARBLED[content])
    with pytest.raises(CLIPLoadError) as error:
        load_clip(str(path))
    assert_not_loadable(error.value, path)


def rewrite_archive(archive_path, target, data_pickle):
    """A copy of a TorchScript archive whose data.pkl is replaced by `data_pickle`."""
    with zipfile.ZipFile(archive_path) as source, zipfile.ZipFile(target, "w") as copy:
        for name in source.namelist():
            copy.writestr(name, data_pickle if name.endswith("/data.pkl") else source.read(name))
    return str(target)


def test_torchscript_archive_that_would_run_code_is_refused(tiny_clip_torchscript_path, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code; only OpenAI's own files may go through it")

    monkeypatch.setattr(torch.jit, "load", never)
    marker = tmp_path / "ran"
    path = rewrite_archive(tiny_clip_torchscript_path, tmp_path / "ViT-B-16.pt",
                           pickle.dumps(RunsShell(str(marker)), protocol=2))
    with pytest.raises(CLIPLoadError) as error:
        load_clip(path)
    assert not marker.exists()
    assert_refused(error.value, path, "system")


def test_torchscript_archive_is_read_as_data(tiny_clip_torchscript_path, tiny_clip_path, monkeypatch):
    """Its parameters and buffers, read without running it, are those torch.jit.load gives."""
    reference = build_clip(torch.jit.load(str(tiny_clip_torchscript_path), map_location="cpu").state_dict()).state_dict()

    def never(*args, **kwargs):
        raise AssertionError("an archive that is not OpenAI's went through torch.jit.load")

    monkeypatch.setattr(torch.jit, "load", never)
    from_archive = load_clip(str(tiny_clip_torchscript_path)).state_dict()
    assert from_archive.keys() == reference.keys() == load_clip(str(tiny_clip_path)).state_dict().keys()
    assert all(torch.equal(from_archive[k], reference[k]) for k in reference)


def test_openai_release_archive_goes_through_torch_jit_load(tiny_clip_torchscript_path, monkeypatch):
    """OpenAI's own files (their SHA-256 is in clip's download URLs) load as clip.load loads them."""
    digest = hashlib.sha256(Path(tiny_clip_torchscript_path).read_bytes()).hexdigest()
    monkeypatch.setitem(clip_api._MODELS, "Tiny/32", f"https://openaipublic.azureedge.net/clip/models/{digest}/t.pt")
    jit_load, loaded = torch.jit.load, []

    def spy(*args, **kwargs):
        loaded.append(args[0])
        return jit_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    load_clip(str(tiny_clip_torchscript_path))
    assert loaded == [str(tiny_clip_torchscript_path)]


@pytest.fixture
def open_clip_folder(tmp_path):
    from tests.open_clip_models import save_clip_style

    folder = save_clip_style(str(tmp_path / "open_clip_model"))
    return folder, os.path.join(folder, "open_clip_pytorch_model.bin")


def test_open_clip_weights_that_would_run_code_are_refused(open_clip_folder, tmp_path):
    from tests.open_clip_models import backbone_name

    folder, weights = open_clip_folder
    marker = tmp_path / "ran"
    write_trap(weights, RunsShell, marker)
    with pytest.raises(BackboneError) as error:
        load_backbone(backbone_name(folder))
    assert not marker.exists()
    assert_refused(error.value, folder, "system")


def test_garbled_open_clip_weights_are_not_loadable(open_clip_folder):
    from tests.open_clip_models import backbone_name

    folder, weights = open_clip_folder
    Path(weights).write_bytes(GARBLED["a pickle cut short"])
    with pytest.raises(BackboneError) as error:
        load_backbone(backbone_name(folder))
    assert_not_loadable(error.value, folder)


@pytest.fixture
def hf_folder(tiny_hf_path, tmp_path):
    """The tiny Hugging Face CLIP with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    pytest.importorskip("transformers")
    folder = str(tmp_path / "hf_clip")
    shutil.copytree(tiny_hf_path("clip"), folder)
    for safetensors in glob.glob(os.path.join(folder, "*.safetensors")):
        os.remove(safetensors)
    return folder, os.path.join(folder, "pytorch_model.bin")


def test_hugging_face_weights_that_would_run_code_are_refused(hf_folder, tmp_path):
    folder, weights = hf_folder
    marker = tmp_path / "ran"
    write_trap(weights, RunsShell, marker)
    with pytest.raises(BackboneError) as error:
        load_backbone(f"hf:{folder}")
    assert not marker.exists()
    assert_refused(error.value, folder, "system")


def test_garbled_hugging_face_weights_are_not_loadable(hf_folder):
    folder, weights = hf_folder
    Path(weights).write_bytes(GARBLED["a pickle cut short"])
    with pytest.raises(BackboneError) as error:
        load_backbone(f"hf:{folder}")
    assert_not_loadable(error.value, folder)


# ---- few-shot caches (CoOp's split_fewshot/*.pkl, ImageNet's preprocessed.pkl) ------------------

def fewshot_images(dataset_dir, count=3):
    os.makedirs(os.path.join(dataset_dir, "images"))
    paths = [os.path.join(dataset_dir, "images", f"{index}.jpg") for index in range(count)]
    for path in paths:
        Path(path).touch()
    return paths


@pytest.mark.parametrize("trap", TRAPS)
def test_fewshot_cache_that_would_run_code_is_not_run_and_is_rebuilt(trap, tmp_path, caplog):
    from datasets.cache import load_or_build
    from datasets.records import Record

    dataset_dir = str(tmp_path / "dtd")
    fewshot_images(dataset_dir)
    marker = tmp_path / "ran"
    trap_class, called = TRAPS[trap]
    path = tmp_path / "dtd" / "split_fewshot" / "shot_1-seed_1.pkl"
    os.makedirs(path.parent)
    with open(path, "wb") as handle:
        pickle.dump({"train": [trap_class(str(marker))], "val": []}, handle, pickle.HIGHEST_PROTOCOL)
    sampled = {"train": [Record(os.path.join(dataset_dir, "images", "0.jpg"), 0, 0, "banded")], "val": []}
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        assert load_or_build(str(path), ("train", "val"), dataset_dir, lambda: sampled) == sampled
    assert not marker.exists()
    warning = [record.getMessage() for record in caplog.records if "Rebuilding" in record.getMessage()]
    assert len(warning) == 1 and str(path) in warning[0] and called in warning[0] and "not allowed" in warning[0]


@requires_dassl
def test_coop_fewshot_cache_of_dassl_datum_objects_loads(tmp_path):
    from dassl.data.datasets import Datum

    from datasets.cache import load_or_build
    from datasets.records import Record

    dataset_dir = str(tmp_path / "dtd")
    paths = fewshot_images(dataset_dir)
    path = tmp_path / "dtd" / "split_fewshot" / "shot_1-seed_1.pkl"
    os.makedirs(path.parent)
    with open(path, "wb") as handle:  # what CoOp's datasets write
        pickle.dump({"train": [Datum(paths[0], 0, 0, "banded"), Datum(paths[1], 1, 0, "dotted")],
                     "val": [Datum(paths[2], 1, 0, "dotted")]}, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def never_built():
        raise AssertionError("the cache was rebuilt instead of read")

    loaded = load_or_build(str(path), ("train", "val"), dataset_dir, never_built)
    assert loaded == {"train": [Record(paths[0], 0, 0, "banded"), Record(paths[1], 1, 0, "dotted")],
                      "val": [Record(paths[2], 1, 0, "dotted")]}


# ---- no other reader --------------------------------------------------------------------------

# The only places that unpickle files, each checked above: load_plain (torch.load, weights only), the
# TorchScript and few-shot cache unpicklers (explicit allow-lists), and torch.jit.load of OpenAI's own files.
UNPICKLERS = {
    ("trainers/untrusted_files.py", "torch.load"),
    ("trainers/untrusted_files.py", "pickle.Unpickler"),
    ("datasets/cache.py", "pickle.Unpickler"),
    ("trainers/model/backbones/openai_loader.py", "torch.jit.load"),
}
LOADING_NAMES = ("torch.load", "torch.jit.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
                 "numpy.load", "np.load", "dill.load", "joblib.load", "yaml.load", "yaml.unsafe_load")


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_no_other_code_unpickles_files():
    files = [path for folder in ("trainers", "datasets", "figures", "scripts") for path in (REPO / folder).rglob("*.py")]
    files += [REPO / "train.py", REPO / "rada_plugin.py"]
    found = set()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) in LOADING_NAMES:
                found.add((path.relative_to(REPO).as_posix(), dotted(node.func)))
                if dotted(node.func) == "torch.load":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    assert weights_only and getattr(weights_only[0].value, "value", None) is True, path
            if isinstance(node, ast.ClassDef):
                found.update((path.relative_to(REPO).as_posix(), dotted(base)) for base in node.bases
                             if dotted(base) in LOADING_NAMES)
    assert found == UNPICKLERS
