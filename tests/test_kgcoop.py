"""KgCoOp and RAdaKgCoOp: the knowledge-guided loss, its hand-written reference, the twin with the
identity head, the shipped recipe, and both trainers end to end through train.py."""

import os

import pytest
import torch
from clip import clip as clip_api
from torch.nn import functional as F

from tests.conftest import requires_dassl
from trainers.model.backbones import as_backbone
from trainers.model.classifier import ClassifierOutput
from trainers.model.compositions import COMPOSITIONS, build_classifier
from trainers.model.guided_prompts import hand_written_features, kgcoop_loss, kgcoop_template, knowledge_gap
from trainers.model.prompts import fill_template

CLASSES = ["golden_retriever", "cat", "air plane"]


def default_cfg(dataset="OxfordPets"):
    from trainers.config import defaults

    cfg = defaults()
    cfg.DATASET.NAME = dataset
    cfg.TRAINER.COOP.N_CTX = 4
    return cfg


def build(trainer, clip_model, cfg=None, seed=0):
    torch.manual_seed(seed)  # the same random context for every trainer built with the same seed
    return build_classifier(COMPOSITIONS[trainer], cfg or default_cfg(), as_backbone(clip_model), CLASSES)


def test_loss_is_the_formula_on_fixed_tensors():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    text = torch.randn(3, 5, generator=generator)  # not normalised: the cosine normalises
    reference = torch.randn(3, 5, generator=generator)
    mask = 1 + 0.1 * torch.randn(4, 3, 5, generator=generator)
    cosines = [(text[k] @ reference[k]) / (text[k].norm() * reference[k].norm()) for k in range(3)]
    gap = 1 - sum(cosines) / 3
    assert knowledge_gap(text, reference) == pytest.approx(gap.item(), abs=1e-6)

    expected = F.cross_entropy(logits, labels) + 8.0 * gap
    loss = kgcoop_loss(ClassifierOutput(logits, None, None, text), labels, reference, weight=8.0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # With a head: its mask penalty (alpha x mean over images of max |M - 1|) is kept.
    penalty = torch.stack([(mask[b] - 1).abs().max() for b in range(4)]).mean()
    loss = kgcoop_loss(ClassifierOutput(logits, mask, None, text), labels, reference, weight=8.0, alpha=0.3)
    assert loss.item() == pytest.approx((expected + 0.3 * penalty).item(), abs=1e-5)


def test_a_perfect_match_costs_nothing_and_the_gap_averages_over_every_class():
    features = torch.randn(3, 5)
    assert knowledge_gap(features, 2 * features).item() == pytest.approx(0.0, abs=1e-6)
    opposite_one = features.clone()
    opposite_one[1] = -features[1]
    assert knowledge_gap(opposite_one, features).item() == pytest.approx(2 / 3, abs=1e-6)


def test_with_zero_weight_the_loss_and_gradient_are_coops(clip_model, images):
    coop, _ = build("CoOp", clip_model)
    kgcoop, _ = build("KgCoOp", clip_model)
    labels = torch.tensor([0, 2, 1])
    reference = hand_written_features(kgcoop.text_encoder, CLASSES, kgcoop_template("OxfordPets"))
    coop_output, kgcoop_output = coop(images), kgcoop(images)
    assert torch.equal(kgcoop_output.logits, coop_output.logits)
    coop_loss = F.cross_entropy(coop_output.logits, labels)
    loss = kgcoop_loss(kgcoop_output, labels, reference, weight=0.0)
    assert torch.equal(loss, coop_loss)
    coop_loss.backward()
    loss.backward()
    assert torch.equal(kgcoop.prompts.ctx.grad, coop.prompts.ctx.grad)


def test_reference_is_kgcoops_hand_written_prompt_encoded_once_without_gradients(clip_model):
    assert kgcoop_template("DescribableTextures") == "a photo of a {}, a type of texture."  # not CoOp's "{} texture."
    assert kgcoop_template("OxfordPets") == "a photo of a {}, a type of pet."
    assert kgcoop_template("EuroSAT") == "a centered satellite photo of {}."
    assert kgcoop_template("ImageNetR") == kgcoop_template("synthetic_shapes") == "a photo of a {}."
    backbone = as_backbone(clip_model)
    backbone.text_encoder.requires_grad_(True)  # even so: no graph is kept
    reference = hand_written_features(backbone.text_encoder, CLASSES, kgcoop_template("UCF101"))
    with torch.no_grad():
        written = clip_model.encode_text(clip_api.tokenize(fill_template("a photo of a person doing {}.", CLASSES)))
    assert not reference.requires_grad and reference.dtype == torch.float32
    assert torch.allclose(reference, F.normalize(written, dim=-1), atol=1e-6)


def test_the_knowledge_gap_falls_when_descended(clip_model):
    model, trained = build("KgCoOp", clip_model)
    reference = hand_written_features(model.text_encoder, CLASSES, kgcoop_template("OxfordPets"))
    optimizer = torch.optim.SGD(trained["prompt_learner"].parameters(), lr=1.0)
    gaps = []
    for _ in range(5):
        gap = knowledge_gap(F.normalize(model.text_features(), dim=-1), reference)
        optimizer.zero_grad()
        gap.backward()
        optimizer.step()
        gaps.append(gap.item())
    assert gaps[-1] < gaps[0] and all(later <= earlier + 1e-6 for earlier, later in zip(gaps, gaps[1:], strict=False))


def test_rada_twin_with_the_identity_head_is_kgcoop(clip_model, images):
    plain, _ = build("KgCoOp", clip_model)
    twin, trained = build("RAdaKgCoOp", clip_model)
    assert list(trained) == ["prompt_learner", "rada_head"]
    reference = hand_written_features(plain.text_encoder, CLASSES, kgcoop_template("OxfordPets"))
    labels = torch.tensor([1, 0, 2])
    with torch.no_grad():
        expected, output = plain(images), twin(images)
        assert torch.allclose(output.logits, expected.logits.float(), atol=1e-5)
        # The head's mask is all ones and the class features are the same: the same objective.
        assert torch.equal(output.mask, torch.ones_like(output.mask))
        assert torch.allclose(kgcoop_loss(output, labels, reference, 8.0, alpha=0.5),
                              kgcoop_loss(expected, labels, reference, 8.0), atol=1e-5)


@requires_dassl
@pytest.mark.parametrize("trainer", ["KgCoOp", "RAdaKgCoOp"])
def test_shipped_config_is_kgcoops_base_to_new_recipe(trainer, clip_model):
    from tests.test_config import dassl_cfg

    cfg = dassl_cfg(f"configs/trainers/{trainer}/vit_b16_ep100_ctxv1.yaml")
    assert cfg.TRAINER.KGCOOP.W == 8.0
    coop = cfg.TRAINER.COOP
    assert (coop.N_CTX, coop.CTX_INIT, coop.CSC, coop.CLASS_TOKEN_POSITION) == (4, "a photo of a", False, "end")
    optim = cfg.OPTIM
    assert (optim.NAME, optim.LR, optim.MAX_EPOCH, optim.WARMUP_EPOCH, optim.WARMUP_CONS_LR) == ("sgd", 0.002, 100, 1,
                                                                                                   1e-5)
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 128 and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    # KgCoOp's prompt: "a photo of a <class>." with the four words learned.
    model, _ = build_classifier(COMPOSITIONS[trainer], cfg, as_backbone(clip_model), CLASSES)
    embedded = clip_model.token_embedding(clip_api.tokenize(fill_template("a photo of a {}.", CLASSES)))
    assert torch.equal(model.prompts.prompt_embeddings(), embedded)


def test_negative_weight_is_refused():
    from trainers.config import check_values
    from trainers.errors import UserFacingError

    cfg = default_cfg()
    cfg.TRAINER.KGCOOP.W = -1.0
    with pytest.raises(UserFacingError, match=r"TRAINER.KGCOOP.W is -1.0; it must be a number >= 0"):
        check_values(cfg)


@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,modules", [("KgCoOp", ["prompt_learner"]),
                                             ("RAdaKgCoOp", ["prompt_learner", "rada_head"])])
def test_train_one_epoch_then_evaluate_new_classes(trainer, modules, synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, "vit_b16_ep100_ctxv1", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train()
    assert trained.returncode == 0 and "Traceback" not in trained.output, trained.output[-3000:]
    assert "epoch [1/1]" in trained.log and " knowledge_gap " in trained.log and trained.accuracy is not None
    assert "Zero-shot reference prompts: 'a photo of a {}.'" in trained.log
    context = torch.load(os.path.join(run.train_dir, "prompt_learner", "model.pth.tar-1"), weights_only=True)
    assert list(context["state_dict"]) == ["ctx"] and context["state_dict"]["ctx"].shape[0] == 4

    evaluated = run.evaluate()
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.output, evaluated.output[-3000:]
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None
