"""Settings as data: typed defaults, the value rules, the precision-node rule, every shipped config."""

import glob
import os

import pytest

from tests.conftest import requires_dassl
from trainers.config import PREC_NODES, VALUE_RULES, Interval, OneOf, check_values, defaults
from trainers.errors import UserFacingError

# The documented rule (trainers/config.py): each trainer reads the PREC of its family's node.
PREC_NODE_OF = {
    "ZeroshotCLIP": "COOP", "CoOp": "COOP", "RAdaCoOp": "COOP", "RAdaCoOpTTT": "COOP",
    "MaPLe": "MAPLE", "RAdaMaPLe": "MAPLE",
    "IVLP": "IVLP", "RAdaIVLP": "IVLP", "VPT": "VPT", "PromptSRC": "PROMPTSRC", "RAdaPromptSRC": "PROMPTSRC",
    "KgCoOp": "COOP", "RAdaKgCoOp": "COOP", "ProGrad": "COOP", "RAdaProGrad": "COOP",
    "CoCoOp": "COCOOP", "RAdaCoCoOp": "COCOOP",
    "RAda": "RADA", "RAdaTTT": "RADA",
    "CLIPAdapter": "ADAPTER", "RAdaAdapter": "ADAPTER",
    "FT": "FT", "FLYP": "FT", "RAdaFT": "FT",
    "CLIPLoRA": "LORA", "RAdaLoRA": "LORA",
}
CONFIGS = sorted(glob.glob(os.path.join("configs", "trainers", "*", "*.yaml")))


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dassl_cfg(*files, opts=()):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = get_cfg_default()
    extend_cfg(cfg)
    for path in files:
        cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def test_every_key_has_a_typed_default():
    untyped = [key for key, value in leaves(defaults()) if value is None]
    assert untyped == []


def test_rules_accept_every_default_and_name_the_range():
    check_values(defaults())
    assert str(Interval(1, integer=True)) == "a whole number >= 1"
    assert str(Interval(0, 1, low_open=True)) == "a number in (0, 1]"
    assert str(OneOf("ce", "flyp")) == "one of ce, flyp"
    assert not Interval(0).holds(True) and not Interval(1, integer=True).holds(2.0) and Interval(0).holds(3)


def test_every_problem_is_named_in_one_line():
    cfg = defaults()
    cfg.merge_from_list(["TRAINER.RADA.TEMP", "-1.0", "TRAINER.TTT.STEPS", "-2"])
    with pytest.raises(UserFacingError) as refused:
        check_values(cfg)
    message = str(refused.value)
    assert "\n" not in message
    assert "TRAINER.RADA.TEMP is -1.0; it must be a number > 0" in message
    assert "TRAINER.TTT.STEPS is -2; it must be a whole number >= 0" in message


def test_rules_cover_every_prec_node():
    ruled = dict(VALUE_RULES)
    assert all(str(ruled[f"TRAINER.{node}.PREC"]) == "one of fp16, fp32, amp" for node in PREC_NODES)


@pytest.mark.parametrize("node", PREC_NODES)
def test_a_prec_the_trainer_ignores_is_refused_its_own_is_not(node):
    cfg = defaults()
    cfg.TRAINER.NAME = "SomeTrainer"
    default = cfg.TRAINER[node].PREC
    cfg.TRAINER[node].PREC = "fp32" if default != "fp32" else "amp"
    check_values(cfg, prec_node=node)
    for other in PREC_NODES:
        if other != node:
            with pytest.raises(UserFacingError, match=f"from TRAINER.{other}.PREC and would ignore TRAINER.{node}.PREC"):
                check_values(cfg, prec_node=other)


@requires_dassl
def test_every_trainer_reads_the_prec_of_its_family():
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401

    assert {name: TRAINER_REGISTRY.get(name).PREC_NODE for name in PREC_NODE_OF} == PREC_NODE_OF


@requires_dassl
@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_config_is_valid_for_its_trainer(path):
    trainer = os.path.basename(os.path.dirname(path))
    cfg = dassl_cfg(path, opts=("TRAINER.NAME", trainer))
    check_values(cfg, prec_node=PREC_NODE_OF[trainer])


@requires_dassl
@pytest.mark.parametrize("trainer, objective, text, scale", [
    ("FT", "ce", False, False), ("RAdaFT", "ce", False, False), ("FLYP", "flyp", True, True),
])
def test_fine_tuning_configs_say_what_trains(trainer, objective, text, scale):
    for path in glob.glob(os.path.join("configs", "trainers", trainer, "*.yaml")):
        ft = dassl_cfg(path).TRAINER.FT
        assert (ft.OBJECTIVE, ft.TRAIN_TEXT_ENCODER, ft.TRAIN_LOGIT_SCALE) == (objective, text, scale), path


@requires_dassl
def test_rada_config_runs_clip_in_fp32_as_the_authors_trainer():
    assert dassl_cfg("configs/trainers/RAda/vit_b16_ep5.yaml").TRAINER.RADA.PREC == "fp32"


@requires_dassl
@pytest.mark.parametrize("name, source", [("RAdaTTT", "RAda"), ("RAdaCoOpTTT", "RAdaCoOp")])
def test_test_time_trainers_do_not_depend_on_the_order_of_their_bases(name, source):
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401
    from trainers.ttt_trainers import TestTimeTrainer

    registered, classifier = TRAINER_REGISTRY.get(name), TRAINER_REGISTRY.get(source)
    assert registered.__bases__ == (TestTimeTrainer, classifier)
    swapped = type("Swapped", (classifier, TestTimeTrainer), {})
    names = {attr for cls in registered.__mro__ for attr in vars(cls) if not attr.startswith("__")} - {"SOURCE"}
    assert all(getattr(swapped, attr) is getattr(registered, attr) for attr in names)
    assert TestTimeTrainer.evaluate is not classifier.evaluate  # its own loop over the test loader
    assert "model_inference" not in vars(TestTimeTrainer) and "parse_batch_test" not in vars(TestTimeTrainer)


def test_keys_added_or_removed_between_versions_are_not_changed_settings():
    """A run recorded before a key existed (run.json, checkpoint markers) still resumes and is reused."""
    from trainers.runs.results import config_differences, flatten_config

    current = flatten_config(defaults())
    recorded_earlier = {key: value for key, value in current.items()
                        if key not in ("DETERMINISTIC", "INPUT.RESIZE_MODE")}
    recorded_earlier["TRAINER.RADA.OLD_KEY"] = 1
    assert config_differences(recorded_earlier, current) == []
    changed = dict(current, **{"TRAINER.RADA.ALPHA": 0.1})
    assert config_differences(recorded_earlier, changed) == ["TRAINER.RADA.ALPHA: was 0.0, now 0.1"]
