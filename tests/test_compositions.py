"""The trainers' declarations (trainers/model/compositions.py): the one list of trainers that the
scripts, the README and the Dassl registry must agree with, and the models built from them."""

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_dassl
from trainers.model.backbones import as_backbone
from trainers.model.classifier import CLIPClassifier
from trainers.model.compositions import COMPOSITIONS, build_classifier, composition_of
from trainers.model.prompts import FixedPrompts
from trainers.model.rada_head import RAdaHead

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "car"]


def scripts_table_trainers():
    """Trainers of common.sh's TRAINER_CONFIGS table and of ttt.sh's check."""
    common = (REPO / "scripts" / "rada" / "common.sh").read_text()
    table = re.search(r'TRAINER_CONFIGS="\n(.*?)\n"', common, re.S).group(1)
    trainers = {line.split()[0] for line in table.splitlines() if line.strip()}
    ttt = re.search(r"TRAINER must be (.*?), got", (REPO / "scripts" / "rada" / "ttt.sh").read_text()).group(1)
    return trainers | set(re.findall(r"\w+", ttt)) - {"or"}


def readme_trainers():
    """The first column of the README's trainer table (section "Trainers")."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Trainers", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.M))


def test_the_scripts_and_the_readme_name_exactly_the_declared_trainers():
    assert scripts_table_trainers() == set(COMPOSITIONS)
    assert readme_trainers() == set(COMPOSITIONS)


@requires_dassl
def test_every_declared_trainer_is_registered_with_its_declaration():
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401

    for name, declared in COMPOSITIONS.items():
        trainer = TRAINER_REGISTRY.get(name)
        assert trainer.composition is declared and trainer.PREC_NODE == declared.prec_node


def test_rada_is_zero_shot_clip_with_the_head_and_trains_only_the_head(clip_model, images, caplog):
    cfg = default_cfg()
    model, trained = build_classifier(composition_of("RAda"), cfg, as_backbone(clip_model), CLASSES)
    assert set(trained) == {"rada_head"} and trained["rada_head"] is model.head
    assert isinstance(model.head, RAdaHead)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {f"head.{name}" for name, _ in model.head.named_parameters()}
    plain = CLIPClassifier(clip_model, FixedPrompts(CLASSES, cfg.TRAINER.RADA.TEMPLATE))
    with torch.no_grad():
        assert torch.equal(model(images).logits, plain(images).logits.float())


def test_fine_tuning_trains_what_trainer_ft_says_in_the_registered_order(clip_model):
    cfg = default_cfg()
    cfg.TRAINER.FT.TRAIN_TEXT_ENCODER = True
    cfg.TRAINER.FT.TRAIN_LOGIT_SCALE = True
    _, trained = build_classifier(composition_of("RAdaFT"), cfg, as_backbone(clip_model), CLASSES)
    assert list(trained) == ["image_encoder", "text_encoder", "logit_scale", "rada_head"]
    cfg.TRAINER.FT.PREC = "fp16"
    assert composition_of("RAdaFT").precision(cfg) == "amp" and composition_of("RAda").precision(cfg) == "fp16"


def test_an_undeclared_trainer_is_one_clear_error():
    from trainers.errors import UserFacingError

    with pytest.raises(UserFacingError, match="No composition is declared for trainer 'NoSuchTrainer'; declared: "):
        composition_of("NoSuchTrainer")


def default_cfg():
    from trainers.config import defaults

    cfg = defaults()
    cfg.DATASET.NAME = "Caltech101"
    return cfg
