"""An existing CoOp-style checkout gains `--trainer RAdaCoOp` with two added lines.

The host below is a minimal program in the shape of CoOp's and MaPLe's repositories: its own
`trainers` package (with its own CoOp trainer, whose name must not clash with ours), its own
`datasets` package, its own `clip` package laid out as MaPLe's (clip.py, model.py whose
build_model needs a `design_details` argument, simple_tokenizer.py), which shadows the installed
one, and a train.py that assembles the config with an extend_cfg function. The test adds
`import rada_plugin` and `rada_plugin.extend_cfg(cfg)` to that train.py, puts this repository
on PYTHONPATH and runs the host's train.py with --trainer RAdaCoOp.
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO

pytestmark = requires_dassl

HOST_TRAIN = '''\
import argparse

from dassl.config import get_cfg_default
from dassl.engine import build_trainer
from dassl.utils import set_random_seed, setup_logger
from yacs.config import CfgNode as CN

import clip
import datasets.shapes
import trainers.coop
{plugin_import}

def extend_cfg(cfg):
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 16
    cfg.TRAINER.COOP.CSC = False
    cfg.TRAINER.COOP.CTX_INIT = ""
    cfg.TRAINER.COOP.PREC = "fp16"
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    {plugin_extend}

def main():
    parser = argparse.ArgumentParser()
    for flag in ("--root", "--output-dir", "--trainer", "--config-file", "--dataset-config-file"):
        parser.add_argument(flag, default="")
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.merge_from_file(args.dataset_config_file)
    cfg.merge_from_file(args.config_file)
    cfg.DATASET.ROOT, cfg.OUTPUT_DIR, cfg.TRAINER.NAME, cfg.SEED = args.root, args.output_dir, args.trainer, args.seed
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)
    print("clip package:", clip.__file__)
    build_trainer(cfg).train()


if __name__ == "__main__":
    main()
'''

HOST_COOP = '''\
from clip import clip  # the host's own clip package, as MaPLe's trainers import it
from dassl.engine import TRAINER_REGISTRY, TrainerX


@TRAINER_REGISTRY.register()
class CoOp(TrainerX):
    """The host's own CoOp (a stand-in): registered under the same name as ours."""
'''

HOST_DATASET = '''\
import json
import os

from dassl.data.datasets import DATASET_REGISTRY, Datum, DatasetBase


@DATASET_REGISTRY.register()
class HostShapes(DatasetBase):
    """The host's reader of a split_zhou-style file (here: the synthetic shapes)."""

    def __init__(self, cfg):
        folder = os.path.join(cfg.DATASET.ROOT, "synthetic_shapes")
        with open(os.path.join(folder, "split_zhou_SyntheticShapes.json")) as handle:
            split = json.load(handle)

        def read(items):
            return [Datum(impath=os.path.join(folder, "images", path), label=label, classname=name)
                    for path, label, name in items]

        super().__init__(train_x=read(split["train"]), val=read(split["val"]), test=read(split["test"]))
'''


# The host's clip package: MaPLe's layout, with a build_model that needs design_details. Our trainers
# must never reach it: each entry point fails loudly.
HOST_CLIP = {
    "__init__.py": "from .clip import *\n",
    "clip.py": (
        "from .model import build_model\n"
        "from .simple_tokenizer import SimpleTokenizer as _Tokenizer\n\n"
        "__all__ = ['available_models', 'load', 'tokenize']\n"
        "_MODELS = {}\n\n\n"
        "def available_models():\n    return list(_MODELS)\n\n\n"
        "def load(name, device='cpu', design_details=None):\n    raise RuntimeError('the host clip.load')\n\n\n"
        "def tokenize(texts, context_length=77):\n    raise RuntimeError('the host clip.tokenize')\n"
    ),
    "model.py": (
        "def build_model(state_dict: dict, design_details):\n"
        "    raise RuntimeError('the host build_model (MaPLe-style, with design_details)')\n\n\n"
        "def convert_weights(model):\n    raise RuntimeError('the host convert_weights')\n"
    ),
    "simple_tokenizer.py": (
        "class SimpleTokenizer:\n    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('the host SimpleTokenizer')\n"
    ),
}


def make_host(root, with_plugin):
    os.makedirs(os.path.join(root, "trainers"))
    os.makedirs(os.path.join(root, "datasets"))
    os.makedirs(os.path.join(root, "configs"))
    for package in ("trainers", "datasets"):
        open(os.path.join(root, package, "__init__.py"), "w").close()
    os.makedirs(os.path.join(root, "clip"))
    for name, text in HOST_CLIP.items():
        with open(os.path.join(root, "clip", name), "w") as handle:
            handle.write(text)
    with open(os.path.join(root, "trainers", "coop.py"), "w") as handle:
        handle.write(HOST_COOP)
    with open(os.path.join(root, "datasets", "shapes.py"), "w") as handle:
        handle.write(HOST_DATASET)
    with open(os.path.join(root, "configs", "shapes.yaml"), "w") as handle:
        handle.write('DATASET:\n  NAME: "HostShapes"\n')
    plugin = {"plugin_import": "import rada_plugin", "plugin_extend": "rada_plugin.extend_cfg(cfg)"}
    if not with_plugin:
        plugin = {"plugin_import": "", "plugin_extend": ""}
    with open(os.path.join(root, "train.py"), "w") as handle:
        handle.write(HOST_TRAIN.format(**plugin))


def run_host(host, data_root, clip_path, output_dir):
    command = [
        sys.executable, "train.py", "--root", data_root, "--seed", "1", "--trainer", "RAdaCoOp",
        "--dataset-config-file", "configs/shapes.yaml",
        "--config-file", os.path.join(REPO, "configs", "trainers", "RAdaCoOp", "vit_b16_ep50_ctxv1.yaml"),
        "--output-dir", output_dir, *FAST_OPTIONS, "MODEL.BACKBONE.NAME", str(clip_path),
    ]
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(command, cwd=host, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_two_lines_add_rada_trainers_to_a_coop_checkout(synthetic_data_root, tiny_clip_path, tmp_path):
    host = str(tmp_path / "host")
    make_host(host, with_plugin=True)
    with open(os.path.join(host, "train.py")) as handle:
        added = [line for line in handle if "rada_plugin" in line]
    assert len(added) == 2

    result = run_host(host, synthetic_data_root, tiny_clip_path, str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trainer=RAdaCoOp" in result.stdout and "* accuracy:" in result.stdout
    # Reaching training at all shows the names did not clash: Dassl's registry raises on a duplicate.
    assert os.path.isfile(tmp_path / "out" / "rada_head" / "model.pth.tar-1")
    # The host's clip package was the one `import clip` found, and ours never called into it.
    assert f"clip package: {os.path.join(host, 'clip', '__init__.py')}" in result.stdout
    assert "the host" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_without_the_two_lines_the_host_does_not_know_rada(synthetic_data_root, tiny_clip_path, tmp_path):
    host = str(tmp_path / "host")
    make_host(host, with_plugin=False)
    result = run_host(host, synthetic_data_root, tiny_clip_path, str(tmp_path / "out"))
    assert result.returncode != 0


@pytest.fixture
def plugin_in_this_process():
    """rada_plugin loads our trainers a second time, as `rada_trainers`, and registers them with Dassl:
    undone afterwards, or later tests in this process would build those copies, whose errors are not
    the `trainers` package's UserFacingError that train.py reports."""
    from dassl.engine import TRAINER_REGISTRY

    registered = dict(TRAINER_REGISTRY._obj_map)
    yield
    TRAINER_REGISTRY._obj_map.clear()
    TRAINER_REGISTRY._obj_map.update(registered)
    for name in [name for name in sys.modules if name == "rada_plugin" or name.startswith("rada_trainers")]:
        del sys.modules[name]


def test_host_config_keys_keep_their_values(plugin_in_this_process):
    from yacs.config import CfgNode as CN

    import rada_plugin
    from trainers.config import dassl_nodes

    cfg = dassl_nodes()  # a host's config: Dassl's nodes and its own keys
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 4  # a host default that differs from ours
    cfg.TRAINER.COOP.HOST_ONLY = True
    rada_plugin.extend_cfg(cfg)
    assert cfg.TRAINER.COOP.N_CTX == 4 and cfg.TRAINER.COOP.HOST_ONLY
    assert cfg.TRAINER.COOP.CLASS_TOKEN_POSITION == "end"
    assert cfg.TRAINER.RADA.NUM_HEADS == 8 and cfg.DATASET.SUBSAMPLE_CLASSES == "all"
