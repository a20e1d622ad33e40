"""PromptSRC and RAdaPromptSRC: each loss term against its formula, the teacher's text features
against a per-template reference, GPA's weights and running sum, the identity head, and training,
evaluation and a resume through train.py that ends on the uninterrupted run's averaged prompts."""

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from clip import clip as clip_api
from torch.nn import functional as F

from tests.conftest import requires_dassl
from trainers.config import defaults
from trainers.model.backbones import as_backbone
from trainers.model.compositions import COMPOSITIONS, build_classifier
from trainers.model.prompts import TEMPLATE_SETS
from trainers.model.promptsrc import (
    PromptAverage,
    distillation_kl,
    feature_l1,
    gaussian_weights,
    promptsrc_loss,
    teacher_logits,
    teacher_text_features,
)

CLASSES = ["golden_retriever", "cat", "air plane"]


def fixed_tensors():
    torch.manual_seed(0)
    logits, zero_shot = torch.randn(4, 5) * 3, torch.randn(4, 5) * 3
    return logits, zero_shot


def test_kl_is_teacher_to_student_summed_over_batch_times_classes():
    logits, zero_shot = fixed_tensors()
    p, p_zs = logits.softmax(-1), zero_shot.softmax(-1)
    expected = (p_zs * (p_zs.log() - p.log())).sum() / (4 * 5)
    torch.testing.assert_close(distillation_kl(logits, zero_shot), expected)
    assert distillation_kl(zero_shot, zero_shot).abs() < 1e-6


def test_loss_is_ce_plus_kl_plus_weighted_mean_absolute_differences():
    logits, zero_shot = fixed_tensors()
    labels = torch.tensor([0, 4, 2, 1])
    image, image_zs = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    text, text_zs = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    assert feature_l1(text, text_zs) == (text - text_zs).abs().sum() / text.numel()
    p, p_zs = logits.softmax(-1), zero_shot.softmax(-1)
    expected = (-p[torch.arange(4), labels].log().mean() + (p_zs * (p_zs.log() - p.log())).sum() / 20
                + 25 * (text - text_zs).abs().mean() + 10 * (image - image_zs).abs().mean())
    loss = promptsrc_loss(logits, labels, zero_shot, image, image_zs, text, text_zs, 25.0, 10.0)
    torch.testing.assert_close(loss, expected)


def test_teacher_logits_are_scaled_cosines():
    image, text = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(math.log(100.0))
    torch.testing.assert_close(teacher_logits(scale, image, text), 100.0 * image @ text.T)


def test_teacher_text_is_the_normalised_mean_of_unnormalised_template_features(clip_model):
    templates = TEMPLATE_SETS["promptsrc_imagenet"][:3]
    with torch.no_grad():
        per_template = [clip_model.encode_text(clip_api.tokenize([t.format(c.replace("_", " ")) for c in CLASSES]))
                        for t in templates]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    actual = teacher_text_features(as_backbone(clip_model).text_encoder, CLASSES, templates)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_teacher_templates_are_the_authors_sixty():
    templates = TEMPLATE_SETS["promptsrc_imagenet"]
    assert len(set(templates)) == 60 and set(templates) <= set(TEMPLATE_SETS["openai_imagenet"])
    assert (templates[0], templates[-1]) == ("a photo of a {}.", "itap of the {}.")


def test_gpa_weights_are_the_normalised_gaussian():
    weights = gaussian_weights(20, 15, 1)
    assert math.isclose(sum(weights), 1.0)
    assert [round(w, 3) for w in weights[12:17]] == [0.054, 0.242, 0.399, 0.242, 0.054]
    assert all(w < 0.005 for w in weights[:12] + weights[17:])
    pdf = [math.exp(-((a - 6) ** 2) / 200) for a in range(1, 21)]
    assert all(math.isclose(w, p / sum(pdf)) for w, p in zip(gaussian_weights(20, 6, 10), pdf, strict=True))


def test_prompt_average_sums_weighted_epochs_and_its_state_round_trips():
    torch.manual_seed(0)
    epochs = [{"prompt_learner/ctx": torch.randn(2, 3), "rada_head/w": torch.randn(4)} for _ in range(3)]
    weights = gaussian_weights(3, 2, 1)
    whole = PromptAverage(weights)
    for epoch, tensors in enumerate(epochs):
        whole.add(epoch, tensors)
    expected = sum(w * t["prompt_learner/ctx"] for w, t in zip(weights, epochs, strict=True))
    torch.testing.assert_close(whole.total["prompt_learner/ctx"], expected)

    interrupted = PromptAverage(weights)
    interrupted.add(0, epochs[0])
    resumed = PromptAverage([0.0, 0.0, 0.0])
    resumed.load_state_dict(interrupted.state_dict())
    for epoch in (1, 2):
        resumed.add(epoch, epochs[epoch])
    assert resumed.epochs == [0, 1, 2] and resumed.weights == weights
    assert all(torch.equal(resumed.total[name], whole.total[name]) for name in whole.total)
    with pytest.raises(ValueError, match="epoch 3 is in the prompt average already"):
        resumed.add(2, epochs[2])


def promptsrc_config():
    cfg = defaults()
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT = 2
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION = 2
    cfg.TRAINER.RADA.NUM_HEADS = 8
    return cfg


def test_identity_head_gives_promptsrcs_logits(clip_model, images):
    backbone, cfg = as_backbone(clip_model), promptsrc_config()
    plain, trained = build_classifier(COMPOSITIONS["PromptSRC"], cfg, backbone, CLASSES)
    assert list(trained) == ["prompt_learner"]
    assert {name for name, _ in trained["prompt_learner"].named_parameters()} == {
        "ctx", "text_VPT_shallow.1", "VPT", "vision_VPT_shallow.1"}
    with torch.no_grad():
        for param in plain.prompts.parameters():
            param.add_(torch.randn_like(param))
    headed, trained = build_classifier(COMPOSITIONS["RAdaPromptSRC"], cfg, backbone, CLASSES)
    assert list(trained) == ["prompt_learner", "rada_head"]
    headed.prompts.load_state_dict(plain.prompts.state_dict())
    with torch.no_grad():
        expected, output = plain(images), headed(images)
    assert torch.equal(output.mask, torch.ones_like(output.mask))
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-4)


# ---- end to end ------------------------------------------------------------------------------------

# Depth 2 for the tiny CLIP; 2 epochs whose GPA weights are both large (0.5 each: mean 1.5).
E2E_OPTIONS = ("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT", "2", "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION", "2",
               "TRAINER.PROMPTSRC.GPA_MEAN", "1.5", "TRAINER.PROMPTSRC.GPA_STD", "1", "OPTIM.MAX_EPOCH", "2",
               "TRAIN.CHECKPOINT_FREQ", "1")


def saved(run_dir, module, epoch):
    return torch.load(Path(run_dir) / module / f"model.pth.tar-{epoch}", weights_only=True)["state_dict"]


def assert_clean(result):
    assert result.returncode == 0 and "Traceback" not in result.output, result.output[-3000:]


@pytest.mark.e2e
@requires_dassl
def test_train_average_evaluate_and_resume_to_the_same_prompts(synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun("PromptSRC", "vit_b16_c2_ep20_batch4_4ctx", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*E2E_OPTIONS)
    assert_clean(trained)
    assert "epoch [2/2]" in trained.log and trained.accuracy is not None
    assert "GPA: the weighted average of epochs 1..2 replaces the trained tensors" in trained.log

    # The last checkpoint holds the GPA sum, which the checkpoint set keeps: 0.5 x epoch 1 + 0.5 x epoch 2.
    first, last = saved(run.train_dir, "prompt_learner", 1), saved(run.train_dir, "prompt_learner", 2)
    marker = torch.load(Path(run.train_dir) / "checkpoint_set.pth.tar-2", weights_only=True)
    average = marker["method_states"]["prompt_average"]
    assert average["epochs"] == [0, 1]
    assert set(first) == {"ctx", "text_VPT_shallow.1", "VPT", "vision_VPT_shallow.1"}
    for key in first:
        assert torch.equal(last[key], average["total"][f"prompt_learner/{key}"])
        assert not torch.equal(last[key], first[key])

    evaluated = run.evaluate(*E2E_OPTIONS)
    assert_clean(evaluated)
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None

    # Killed after epoch 1: its set 2 never written; the resumed run ends on the same averaged prompts.
    resumed_dir = Path(tmp_path) / "resumed"
    shutil.copytree(run.train_dir, resumed_dir)
    for stale in (resumed_dir / "checkpoint_set.pth.tar-2", *resumed_dir.glob("*/model.pth.tar-2")):
        stale.unlink()
    (resumed_dir / "prompt_learner" / "checkpoint").write_text("model.pth.tar-1\n")
    resumed = run.run(run.command(str(resumed_dir), options=("DATASET.SUBSAMPLE_CLASSES", "base", *E2E_OPTIONS)),
                      str(resumed_dir))
    assert_clean(resumed)
    assert "Resumed the checkpoint set of epoch 1 (next epoch: 2)" in resumed.output
    again = saved(resumed_dir, "prompt_learner", 2)
    assert all(torch.equal(again[key], last[key]) for key in last)
    assert resumed.accuracy == trained.accuracy
    assert os.path.isfile(resumed_dir / "checkpoint_set.pth.tar-2")


@pytest.mark.e2e
@requires_dassl
def test_rada_promptsrc_averages_the_head_with_the_prompts(synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun("RAdaPromptSRC", "vit_b16_c2_ep20_batch4_4ctx", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*E2E_OPTIONS, "TRAINER.RADA.NUM_HEADS", "8")
    assert_clean(trained)
    total = torch.load(Path(run.train_dir) / "checkpoint_set.pth.tar-2",
                       weights_only=True)["method_states"]["prompt_average"]["total"]
    for module in ("prompt_learner", "rada_head"):
        last = saved(run.train_dir, module, 2)
        floating = [key for key in last if last[key].is_floating_point()]
        assert floating and all(torch.equal(last[key], total[f"{module}/{key}"]) for key in floating)
