import importlib.util
import logging
import os

# The tests' tensors are tiny: torch's worker threads cost more than they save, and on a busy machine
# they spin (a 150-step training of a small head: 44 s of CPU with 2 threads, 3 s with 1). Set before
# torch is imported, so that the train.py subprocesses inherit it; an OMP_NUM_THREADS of the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.image_trees import write_class_folders, write_images  # noqa: F401  (re-exported for tests)
from trainers.model.precision import cpu_runs_half_precision
from trainers.model.tiny_clip import save_tiny_clip

HAS_DASSL = importlib.util.find_spec("dassl") is not None

requires_dassl = pytest.mark.skipif(not HAS_DASSL, reason="Dassl is not installed (see README)")


requires_cpu_half = pytest.mark.skipif(not cpu_runs_half_precision(), reason="this torch has no fp16 CPU kernels")


@pytest.fixture(autouse=True)
def undo_dassls_logging_disable():
    """Importing dassl.data calls logging.disable(logging.WARNING) for the whole process;
    tests that read log records (caplog) must not depend on whether an earlier test imported it."""
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny ViT CLIP saved as a plain state dict."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-vit.pt")


@pytest.fixture(scope="session")
def tiny_clip_torchscript_path(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-vit-jit.pt", torchscript=True)


@pytest.fixture
def clip_model(tiny_clip_path):
    """The tiny ViT CLIP loaded through the project's loader, in float32."""
    from trainers.model.backbones.openai_loader import load_clip

    return load_clip(str(tiny_clip_path)).float()


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(3, 3, 224, 224)


@pytest.fixture(scope="session")
def tiny_resnet_clip_path(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-rn.pt", vision="ResNet")


@pytest.fixture(scope="session")
def synthetic_data_root(tmp_path_factory):
    """The demo's synthetic dataset (10 colour-shape classes) in CoOp's layout."""
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(str(root))
    return str(root)


@pytest.fixture(scope="session")
def tiny_hf_path(tmp_path_factory):
    """tiny_hf_path(family) -> a folder holding a tiny random transformers model of that family
    (clip, siglip, align, blip) as save_pretrained writes it; each is built once per session."""
    from tests.tiny_hf import save_tiny_hf

    root = tmp_path_factory.mktemp("hf")
    folders = {}

    def folder(family):
        if family not in folders:
            folders[family] = save_tiny_hf(family, root)
        return folders[family]

    return folder


def train_only(model, *trained):
    """Freeze `model` except the given submodules, as the trainers do before building optimisers."""
    model.requires_grad_(False)
    for module in trained:
        module.requires_grad_(True)
    return model
