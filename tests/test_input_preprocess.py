"""INPUT.PREPROCESS: whose image preprocessing a run uses (the backbone's, the config's, or "auto":
the config's for OpenAI CLIP, the backbone's for any other), and the run record that holds the
config a run used, its preprocessing resolved, so that the same command reuses the folder, another
setting is refused, and a record of the previous version (the parsed config) is still accepted."""

import json
import logging
import os
import shutil

import pytest
from yacs.config import CfgNode as CN

from tests import open_clip_models
from tests.conftest import requires_dassl
from tests.train_harness import REPO, TrainRun
from trainers.config import check_values, defaults
from trainers.errors import UserFacingError
from trainers.model.backbones import Preprocess, backbone_input_keys, follow_preprocess, preprocess_source
from trainers.model.backbones.openai_clip import OPENAI_MEAN, OPENAI_STD

OPENAI_STYLE = Preprocess(224, OPENAI_MEAN, OPENAI_STD, "bicubic")
SIGLIP_STYLE = Preprocess(64, (0.5,) * 3, (0.5,) * 3, "bilinear", resize_mode="squash")
SIGLIP_NAME = "open_clip:ViT-B-16-SigLIP/webli"
USERS_MEAN = [0.4, 0.4, 0.4]


def shipped_cfg(backbone, preprocess, mean=OPENAI_MEAN, resize_mode="auto"):
    """A config as the shipped ones have it (OpenAI CLIP's preprocessing), with its switch and backbone."""
    cfg = CN()
    cfg.INPUT = CN({"SIZE": (224, 224), "PIXEL_MEAN": list(mean), "PIXEL_STD": list(OPENAI_STD),
                    "INTERPOLATION": "bicubic", "RESIZE_MODE": resize_mode, "PREPROCESS": preprocess})
    cfg.MODEL = CN({"BACKBONE": CN({"NAME": backbone})})
    return cfg


# ---- the switch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone, source", [
    ("ViT-B/16", "config"), ("RN50", "config"), ("/models/tiny-vit.pt", "config"),
    ("open_clip:ViT-B-16/openai", "backbone"), (SIGLIP_NAME, "backbone"), ("hf:google/siglip-base-patch16-224", "backbone"),
])
def test_auto_is_the_config_for_openai_clip_and_the_backbone_for_any_other(backbone, source):
    assert preprocess_source(shipped_cfg(backbone, "auto")) == source
    for setting in ("backbone", "config"):
        assert preprocess_source(shipped_cfg(backbone, setting)) == setting


@pytest.mark.parametrize("setting", ["auto", "backbone"])
def test_the_backbones_preprocessing_replaces_whatever_the_config_says(setting):
    for mean in (OPENAI_MEAN, USERS_MEAN):
        cfg = shipped_cfg(SIGLIP_NAME, setting, mean=mean)
        followed, changed = follow_preprocess(cfg, SIGLIP_STYLE)
        assert followed.INPUT.SIZE == (64, 64) and followed.INPUT.PIXEL_MEAN == [0.5, 0.5, 0.5]
        assert followed.INPUT.PIXEL_STD == [0.5, 0.5, 0.5] and followed.INPUT.INTERPOLATION == "bilinear"
        assert followed.INPUT.RESIZE_MODE == "squash"
        assert set(changed) == {"SIZE", "PIXEL_MEAN", "PIXEL_STD", "INTERPOLATION", "RESIZE_MODE"}
        assert cfg.INPUT.PIXEL_MEAN == list(mean)  # the given config is left as it is
    # A resize mode the user set stays: only "auto" is the backbone's.
    followed, changed = follow_preprocess(shipped_cfg(SIGLIP_NAME, setting, resize_mode="longest"), SIGLIP_STYLE)
    assert followed.INPUT.RESIZE_MODE == "longest" and "RESIZE_MODE" not in changed


def test_the_configs_preprocessing_is_kept_as_it_is():
    followed, changed = follow_preprocess(shipped_cfg(SIGLIP_NAME, "config", mean=USERS_MEAN), SIGLIP_STYLE)
    assert followed.INPUT.SIZE == (224, 224) and followed.INPUT.PIXEL_MEAN == USERS_MEAN
    assert followed.INPUT.PIXEL_STD == list(OPENAI_STD) and followed.INPUT.INTERPOLATION == "bicubic"
    assert changed == {"RESIZE_MODE": "squash"}  # "auto" is still the backbone's resize mode
    for setting in ("auto", "config"):  # OpenAI CLIP: the shipped configs' values, Dassl's resize and crop
        followed, changed = follow_preprocess(shipped_cfg("ViT-B/16", setting, mean=USERS_MEAN), OPENAI_STYLE)
        assert changed == {"RESIZE_MODE": "shortest"} and followed.INPUT.PIXEL_MEAN == USERS_MEAN


def test_openai_clip_under_backbone_takes_its_own_values():
    followed, changed = follow_preprocess(shipped_cfg("ViT-B/16", "backbone", mean=USERS_MEAN), OPENAI_STYLE)
    assert followed.INPUT.PIXEL_MEAN == list(OPENAI_MEAN)
    assert changed == {"PIXEL_MEAN": list(OPENAI_MEAN), "RESIZE_MODE": "shortest"}  # the rest already held it


def test_the_log_names_what_changed_and_how_to_keep_the_configs_values(caplog):
    with caplog.at_level(logging.INFO, logger="trainers.model.backbones"):
        follow_preprocess(shipped_cfg(SIGLIP_NAME, "auto"), SIGLIP_STYLE)
        follow_preprocess(shipped_cfg("ViT-B/16", "auto"), OPENAI_STYLE)
    backbone, config = caplog.messages
    assert backbone.startswith(f"Input preprocessing of {SIGLIP_NAME}: the backbone's own (INPUT.PREPROCESS auto): "
                               "INPUT.SIZE (64, 64), INPUT.PIXEL_MEAN [0.5, 0.5, 0.5]")
    assert backbone.endswith("INPUT.RESIZE_MODE squash; INPUT.PREPROCESS config keeps the config's values.")
    assert config == ("Input preprocessing of ViT-B/16: the config's INPUT values (INPUT.PREPROCESS auto); "
                      "INPUT.RESIZE_MODE auto: the backbone's shortest.")


def test_the_keys_the_backbone_sets_are_known_before_it_is_loaded():
    assert backbone_input_keys(shipped_cfg(SIGLIP_NAME, "auto")) == (
        "SIZE", "PIXEL_MEAN", "PIXEL_STD", "INTERPOLATION", "RESIZE_MODE")
    assert backbone_input_keys(shipped_cfg("ViT-B/16", "auto")) == ("RESIZE_MODE",)
    assert backbone_input_keys(shipped_cfg(SIGLIP_NAME, "config", resize_mode="squash")) == ()


def test_the_switch_has_a_typed_default_and_a_bad_value_is_one_clear_error():
    assert defaults().INPUT.PREPROCESS == "auto"
    cfg = defaults()
    cfg.INPUT.PREPROCESS = "model"
    with pytest.raises(UserFacingError) as refused:
        check_values(cfg)
    assert str(refused.value) == "INPUT.PREPROCESS is 'model'; it must be one of auto, backbone, config."


# ---- the run record (train.py) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def siglip_name(tmp_path_factory):
    return open_clip_models.backbone_name(open_clip_models.save_siglip_style(str(tmp_path_factory.mktemp("siglip"))))


def build_only(run, *options):
    """train.py into the run's folder with --no-train: the trainer is built and the run recorded."""
    return run.run(run.command(run.train_dir, "--no-train", options=options), run.train_dir)


def refusal(result):
    assert result.returncode == 2 and "Traceback" not in result.output, result.output[-3000:]
    assert "holds a run made with other settings" in result.output
    return result.output


def recorded_config(run_dir):
    with open(os.path.join(run_dir, "run.json")) as handle:
        return json.load(handle)["config"]


def rewrite_record(run_dir, **config):
    path = os.path.join(run_dir, "run.json")
    with open(path) as handle:
        record = json.load(handle)
    record["config"].update(config)
    with open(path, "w") as handle:
        json.dump(record, handle)


@pytest.fixture
def siglip_run(siglip_name, synthetic_data_root, tmp_path):
    return TrainRun("ZeroshotCLIP", "vit_b16", synthetic_data_root, siglip_name, tmp_path, in_process=True)


@pytest.mark.e2e  # builds trainers through train.py
@requires_dassl
def test_run_json_holds_the_config_the_run_used_and_the_same_command_reuses_the_folder(siglip_run):
    first = build_only(siglip_run)
    assert first.returncode == 0, first.output[-3000:]
    assert "the backbone's own (INPUT.PREPROCESS auto): INPUT.SIZE (64, 64)" in first.output
    config = recorded_config(siglip_run.train_dir)
    assert config["INPUT.SIZE"] == [64, 64] and config["INPUT.PIXEL_MEAN"] == [0.5, 0.5, 0.5]
    assert config["INPUT.RESIZE_MODE"] == "squash" and config["INPUT.PREPROCESS"] == "auto"

    assert build_only(siglip_run).returncode == 0
    # A mean the backbone replaces anyway is no other setting.
    assert build_only(siglip_run, "INPUT.PIXEL_MEAN", "(0.4, 0.4, 0.4)").returncode == 0
    assert recorded_config(siglip_run.train_dir)["INPUT.PIXEL_MEAN"] == [0.5, 0.5, 0.5]

    assert "INPUT.RESIZE_MODE: was squash, now longest" in refusal(build_only(siglip_run, "INPUT.RESIZE_MODE", "longest"))
    assert "INPUT.PREPROCESS: was auto, now config" in refusal(build_only(siglip_run, "INPUT.PREPROCESS", "config"))


@pytest.mark.e2e  # builds trainers through train.py
@requires_dassl
def test_the_trainers_config_is_compared_in_full_once_built(siglip_run):
    assert build_only(siglip_run).returncode == 0
    # As if the model's own preprocessing had been another when the folder's run was made.
    rewrite_record(siglip_run.train_dir, **{"INPUT.PIXEL_MEAN": [0.4, 0.4, 0.4]})
    output = refusal(build_only(siglip_run))
    assert "INPUT.PIXEL_MEAN: was [0.4, 0.4, 0.4], now [0.5, 0.5, 0.5]" in output
    assert "Loading CLIP" in output  # refused once the backbone said its values


def write_old_record(run, *options):
    """run.json as the previous version wrote it: the config as parsed, without INPUT.PREPROCESS."""
    from train import parse_args, setup_cfg
    from trainers.runs.results import flatten_config, write_run_record

    argv = [*run.command(run.train_dir, "--no-train", options=options)[2:], "USE_CUDA", "False"]  # as run in-process
    config = flatten_config(setup_cfg(parse_args(argv)))
    del config["INPUT.PREPROCESS"]
    os.makedirs(run.train_dir, exist_ok=True)
    write_run_record(run.train_dir, argv, config)
    return config


@pytest.mark.e2e  # builds trainers through train.py
@requires_dassl
def test_a_run_json_of_the_previous_version_is_accepted(siglip_run):
    old = write_old_record(siglip_run)
    assert old["INPUT.SIZE"] == [224, 224] and old["INPUT.RESIZE_MODE"] == "auto"
    again = build_only(siglip_run)
    assert again.returncode == 0, again.output[-3000:]
    config = recorded_config(siglip_run.train_dir)  # rewritten as the run used it
    assert config["INPUT.SIZE"] == [64, 64] and config["INPUT.PREPROCESS"] == "auto"

    write_old_record(siglip_run)
    rewrite_record(siglip_run.train_dir, **{"OPTIM.MAX_EPOCH": 3})
    assert "OPTIM.MAX_EPOCH: was 3, now 1" in refusal(build_only(siglip_run))
    write_old_record(siglip_run, "INPUT.RESIZE_MODE", "longest")  # a mode the user set, so the one it used
    assert "INPUT.RESIZE_MODE: was longest, now squash" in refusal(build_only(siglip_run))


@pytest.mark.e2e  # builds trainers through train.py
@requires_dassl
def test_a_committed_run_of_the_previous_version_is_accepted(synthetic_data_root, tiny_clip_path, tmp_path):
    """The OpenAI CLIP run of tests/fixtures/run_077bb5f (see its README.txt), its run.json as written."""
    # A subprocess, as that run was made: in-process runs set USE_CUDA False, which it did not.
    run = TrainRun("RAdaCoOp", "vit_b16_ep50_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "run_077bb5f"), run.train_dir)
    rewrite_record(run.train_dir, **{"MODEL.BACKBONE.NAME": str(tiny_clip_path)})
    assert "INPUT.PREPROCESS" not in recorded_config(run.train_dir)
    options = ("OPTIM.MAX_EPOCH", "2", "DATASET.SUBSAMPLE_CLASSES", "base", "TRAIN.CHECKPOINT_FREQ", "1")
    result = build_only(run, *options)
    assert result.returncode == 0, result.output[-3000:]
    config = recorded_config(run.train_dir)
    assert config["INPUT.RESIZE_MODE"] == "shortest" and config["INPUT.SIZE"] == [224, 224]
