"""Test-time training without Dassl: views, confident-view selection, the entropy objective, the
per-image adapt / predict / reset loop, scripts/rada/ttt.sh's command lines and the ttt tables of
scripts/parse_results.py."""

import math

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from tests.fake_repo import make_fake_repo, run_script, train_py
from tests.run_logs import load_parse_results, rada_log
from trainers.model import ttt  # as a module: pytest would try to collect its Test* classes
from trainers.model.classifier import CLIPClassifier
from trainers.model.prompts import CoOpPromptLearner, FixedPrompts
from trainers.model.rada_head import RAdaHead
from trainers.model.tiny_clip import TINY_EMBED_DIM
from trainers.model.ttt import (
    AUGMIX_OPERATIONS,
    augmix,
    marginal_entropy,
    num_confident,
    select_confident_views,
    view_entropy,
)

CLASSES = ["red circle", "blue square", "green star", "yellow triangle", "purple circle"]
N_VIEWS = 16
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def build_classifier(clip_model, context=False, trained_head=False):
    """A classifier with a RAda head; returns it and AdamW optimisers over what test-time training adapts."""
    prompts = CoOpPromptLearner(clip_model, CLASSES, ctx_init="a photo of a") if context \
        else FixedPrompts(CLASSES, "a photo of a {}.")
    head = RAdaHead(TINY_EMBED_DIM, num_heads=8)
    if trained_head:  # a head that is not the identity, as after training
        torch.manual_seed(1)
        nn.init.normal_(head.out_proj.weight, std=0.2)
    classifier = CLIPClassifier(clip_model, prompts, head=head)
    classifier.requires_grad_(False)
    adapted = [classifier.head] + ([classifier.prompts] if context else [])
    for module in adapted:
        module.requires_grad_(True)
    return classifier, [torch.optim.AdamW(module.parameters(), lr=1e-3) for module in adapted]


def views_of(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1 + N_VIEWS, 3, 224, 224, generator=generator)


def warm_up(classifier, optimizers):
    """One training step, so that the optimisers have moments and the head is not the identity."""
    logits = classifier(views_of(99)).logits
    nn.functional.cross_entropy(logits, torch.arange(len(logits)) % len(CLASSES)).backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


def parameters_and_state(optimizers):
    """Copies of every adapted parameter and of every tensor of the optimisers' state."""
    copies = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            copies += [p.detach().clone() for p in group["params"]]
        for state in optimizer.state.values():
            copies += [state[key].clone() for key in sorted(state)]
    return copies


# ---- views ---------------------------------------------------------------------------------------

@pytest.fixture
def photo():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (96, 128, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def original_transform():
    return T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.mark.parametrize("use_augmix", [False, True])
def test_views_start_with_the_original_and_are_random(photo, use_augmix):
    views = ttt.TestTimeViews(original_transform(), (224, 224), n_views=5, augmix=use_augmix, normalize=T.Normalize(MEAN, STD))
    torch.manual_seed(0)
    batch = views(photo)
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.equal(batch[0], original_transform()(photo))
    assert all(not torch.equal(batch[i], batch[j]) for i in range(1, 6) for j in range(i + 1, 6))
    torch.manual_seed(0)
    assert torch.equal(views(photo), batch)  # torch's generator drives every random choice

    # Normalised together, the views are the unnormalised ones with the mean and std applied.
    plain = ttt.TestTimeViews(original_transform(), (224, 224), n_views=5, augmix=use_augmix)
    torch.manual_seed(0)
    unnormalised = plain(photo)[1:]
    assert unnormalised.min() >= 0 and unnormalised.max() <= 1
    assert torch.allclose(T.Normalize(MEAN, STD)(unnormalised), batch[1:], atol=1e-5)


def test_no_views_leaves_the_original_alone(photo):
    assert ttt.TestTimeViews(original_transform(), (224, 224), n_views=0)(photo).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="n_views"):
        ttt.TestTimeViews(original_transform(), (224, 224), n_views=-1)


def test_augmix_mixes_the_image_with_augmented_copies(photo):
    crop = photo.resize((224, 224))
    for operation in AUGMIX_OPERATIONS:
        for strength in (0.1, 1.0):
            changed = operation(crop, strength)
            assert changed.size == crop.size and changed.mode == crop.mode, operation.__name__
    torch.manual_seed(0)
    mixed = augmix(crop)
    assert mixed.shape == (3, 224, 224)
    # A convex combination of images stays in the pixel range but differs from the image.
    assert mixed.min() >= 0 and mixed.max() <= 255
    assert not torch.equal(mixed, T.functional.pil_to_tensor(crop).float())


# ---- objective and selection ----------------------------------------------------------------------

def test_marginal_entropy_is_the_entropy_of_the_averaged_probabilities():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    mean = logits.softmax(dim=-1).mean(dim=0)
    assert torch.allclose(marginal_entropy(logits), -(mean * mean.log()).sum())
    # Not the average of the views' entropies, which is lower here (confident views that disagree).
    assert marginal_entropy(logits) > view_entropy(logits).mean() + 0.1
    assert torch.allclose(marginal_entropy(logits[:1]), view_entropy(logits[:1])[0])
    uniform = torch.zeros(4, 10)
    assert math.isclose(marginal_entropy(uniform).item(), math.log(10), rel_tol=1e-6)

    extreme = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], requires_grad=True)
    marginal_entropy(extreme).backward()
    assert torch.isfinite(extreme.grad).all()


def test_selection_keeps_exactly_the_lowest_entropy_views():
    sharpness = torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0, 8.0, 2.0, 6.0, 4.0, 0.5])
    logits = torch.stack([torch.tensor([s, 0.0, 0.0, 0.0]) for s in sharpness])  # sharper = lower entropy
    assert select_confident_views(logits, 0.3).tolist() == [1, 5, 3]
    assert select_confident_views(logits, 1.0).tolist() == sharpness.argsort(descending=True).tolist()
    assert select_confident_views(logits, 0.01).tolist() == [1]  # at least one view

    tied = torch.stack([torch.tensor([2.0, 0.0])] * 3 + [torch.tensor([5.0, 0.0])] + [torch.tensor([2.0, 0.0])] * 2)
    assert select_confident_views(tied, 0.5).tolist() == [3, 0, 1]  # equal entropies: lower index first
    assert select_confident_views(tied.flip(0), 0.5).tolist() == [2, 0, 1]


def test_number_of_confident_views():
    assert num_confident(64, 0.1) == 6  # TPT's default: 6 of 64
    assert num_confident(10, 0.3) == 3 and num_confident(100, 0.29) == 29
    assert num_confident(1, 0.1) == 1
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            num_confident(64, fraction)


# ---- the per-image loop ----------------------------------------------------------------------------

@pytest.mark.parametrize("context", [False, True], ids=["head", "head+context"])
def test_reset_restores_parameters_and_optimizer_state_bit_for_bit(clip_model, context):
    classifier, optimizers = build_classifier(clip_model, context=context)
    warm_up(classifier, optimizers)  # non-empty optimiser state: moments and step counts
    adapter = ttt.TestTimeAdapter(classifier, optimizers, steps=2)
    before = parameters_and_state(optimizers)

    features = adapter.encode(views_of(0))
    adapter.adapt(features)
    during = parameters_and_state(optimizers)
    assert not all(torch.equal(a, b) for a, b in zip(before, during, strict=False))  # adapting changed something
    adapter.reset()
    after = parameters_and_state(optimizers)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after, strict=False))

    for seed in (1, 2):  # adapt_and_predict resets by itself, every time
        adapter.adapt_and_predict(views_of(seed))
        assert all(torch.equal(a, b) for a, b in zip(before, parameters_and_state(optimizers), strict=False))


@pytest.mark.parametrize("context", [False, True], ids=["head", "head+context"])
def test_every_image_starts_from_the_same_model(clip_model, context):
    classifier, optimizers = build_classifier(clip_model, context=context)
    warm_up(classifier, optimizers)
    adapter = ttt.TestTimeAdapter(classifier, optimizers, steps=2)
    alone = adapter.adapt_and_predict(views_of(1))
    adapter.adapt_and_predict(views_of(2))
    after_another = adapter.adapt_and_predict(views_of(1))
    assert torch.equal(alone.initial, after_another.initial)
    assert torch.equal(alone.adapted, after_another.adapted)


@pytest.mark.parametrize("context", [False, True], ids=["head", "head+context"])
def test_a_step_lowers_the_entropy_of_the_selected_views(clip_model, context):
    classifier, optimizers = build_classifier(clip_model, context=context)
    adapter = ttt.TestTimeAdapter(classifier, optimizers, steps=1)
    features = adapter.encode(views_of(3))
    with torch.no_grad():
        before_logits = adapter.logits(features)
    initial, selected = adapter.adapt(features)
    assert selected.tolist() == select_confident_views(before_logits, 0.1).tolist()  # chosen before the step
    assert len(selected) == num_confident(1 + N_VIEWS, 0.1)
    with torch.no_grad():
        before = marginal_entropy(before_logits[selected])
        after = marginal_entropy(adapter.logits(features[selected]))
    assert after < before - 1e-4
    assert torch.allclose(initial, before_logits[:1], atol=1e-5)


@pytest.mark.parametrize("context", [False, True], ids=["head", "head+context"])
def test_zero_shot_prediction_is_the_unadapted_classifiers(clip_model, context):
    classifier, optimizers = build_classifier(clip_model, context=context, trained_head=True)
    views = views_of(4)
    with torch.no_grad():
        expected = classifier(views[:1]).logits
    prediction = ttt.TestTimeAdapter(classifier, optimizers, steps=1).adapt_and_predict(views)
    assert torch.allclose(prediction.initial, expected, atol=1e-5)
    assert torch.equal(prediction.initial.argmax(dim=-1), expected.argmax(dim=-1))
    assert not torch.allclose(prediction.adapted, expected, atol=1e-5)  # test-time training did something


def test_identity_head_without_steps_predicts_zero_shot_clip(clip_model):
    classifier, optimizers = build_classifier(clip_model)
    views = views_of(5)
    clip = CLIPClassifier(clip_model, classifier.prompts)
    with torch.no_grad():  # CLIP on the same features: the views are encoded together, the original classified alone
        clip_logits = clip.classify(clip.encode_image(views)[:1], clip.text_features()).logits
    prediction = ttt.TestTimeAdapter(classifier, optimizers, steps=0).adapt_and_predict(views)
    assert torch.equal(prediction.adapted, clip_logits) and torch.equal(prediction.initial, clip_logits)


def test_frozen_context_is_neither_adapted_nor_differentiated(clip_model):
    classifier, optimizers = build_classifier(clip_model, context=True)
    classifier.prompts.requires_grad_(False)
    context = classifier.prompts.ctx.detach().clone()
    adapter = ttt.TestTimeAdapter(classifier, optimizers[:1], steps=2)
    assert not adapter.adapts_prompts
    adapter.adapt(adapter.encode(views_of(6)))
    assert torch.equal(classifier.prompts.ctx, context) and classifier.prompts.ctx.grad is None


def test_bad_settings_are_refused(clip_model):
    classifier, optimizers = build_classifier(clip_model)
    with pytest.raises(ValueError, match="steps"):
        ttt.TestTimeAdapter(classifier, optimizers, steps=-1)
    with pytest.raises(ValueError, match="fraction"):
        ttt.TestTimeAdapter(classifier, optimizers, confident_fraction=0)


def test_tally_counts_both_predictions_and_reports_progress():
    tally = ttt.TestTimeTally(total=8)
    labels = torch.tensor([0, 1, 2, 0])
    initial = nn.functional.one_hot(torch.tensor([0, 0, 0, 0]), 3).float()  # 2 of 4 right
    adapted = nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()  # 3 of 4 right
    tally.update(initial, adapted, labels)
    assert tally.seen == 4 and tally.zero_shot_accuracy == 50.0 and tally.accuracy == 75.0
    line = tally.progress()
    assert line.startswith("test-time training [4/8] acc 75.00% (zero-shot 50.00%)") and " eta " in line


# ---- scripts/rada/ttt.sh -------------------------------------------------------------------------

TTT_CONFIGS = ("vit_b16_imagenet", "vit_b16_finegrained")


@pytest.fixture
def repo(tmp_path):
    trainers = {"RAdaTTT": TTT_CONFIGS, "RAdaCoOpTTT": TTT_CONFIGS, "RAda": ("vit_b16_ep5",),
                "RAdaCoOp": ("vit_b16_ep50_ctxv1",)}
    return make_fake_repo(tmp_path, ("imagenet", "imagenet_a", "imagenetv2", "dtd"), trainers,
                          config_text="TRAINER:\n  TTT:\n    STEPS: 1\n")


def run_ttt(repo, *args, **env):
    return run_script(repo, "ttt.sh", *args, **env)


def eval_py(seed, trainer, dataset, cfg, output_dir):
    return train_py(seed, trainer, dataset, cfg, output_dir) + ["--eval-only"]


def test_script_picks_tpts_config_per_dataset_and_starts_from_the_identity_head(repo):
    result, argv = run_ttt(repo, "imagenet_a", 1, "TRAINER.TTT.STEPS", 2)
    assert result.returncode == 0, result.stderr
    assert argv == eval_py(1, "RAdaTTT", "imagenet_a", "vit_b16_imagenet",
                            "./output/ttt/imagenet_a/shots_0/RAdaTTT/vit_b16_imagenet/seed1") + ["TRAINER.TTT.STEPS", "2"]
    _, argv = run_ttt(repo, "dtd", 2, TRAINER="RAdaCoOpTTT")
    assert argv == eval_py(2, "RAdaCoOpTTT", "dtd", "vit_b16_finegrained",
                            "./output/ttt/dtd/shots_0/RAdaCoOpTTT/vit_b16_finegrained/seed2")
    _, argv = run_ttt(repo, "imagenet_a", 1, CFG="vit_b16_finegrained")  # AugMix on ImageNet-A, as an ablation
    assert argv[argv.index("--config-file") + 1] == "configs/trainers/RAdaTTT/vit_b16_finegrained.yaml"


@pytest.mark.parametrize("trainer,source", [("RAdaTTT", "RAda/vit_b16_ep5"), ("RAdaCoOpTTT", "RAdaCoOp/vit_b16_ep50_ctxv1")])
def test_script_starts_from_the_imagenet_model_of_xd_train(repo, trainer, source):
    model_dir = f"./output/xd/train/imagenet/shots_16/{source}/seed3"
    missing, argv = run_ttt(repo, "imagenetv2", 3, TRAINER=trainer, PRETRAINED="1")
    assert missing.returncode == 1 and argv is None
    source_trainer, source_cfg = source.split("/")
    assert f"no trained model: {model_dir} does not exist" in missing.stderr
    assert f"TRAINER={source_trainer} CFG={source_cfg} SHOTS=16 bash scripts/rada/xd_train.sh 3" in missing.stderr

    (repo / model_dir).mkdir(parents=True)
    (repo / model_dir / "log.txt").write_text(rada_log(70.0, subsample="all", seed=3, trainer=source_trainer))
    result, argv = run_ttt(repo, "imagenetv2", 3, TRAINER=trainer, PRETRAINED="1", LOADEP="5")
    assert result.returncode == 0, result.stderr
    assert argv == eval_py(3, trainer, "imagenetv2", "vit_b16_imagenet",
                            f"./output/ttt/imagenetv2/shots_16/{trainer}/vit_b16_imagenet/seed3") + [
        "--model-dir", model_dir, "--load-epoch", "5"]


def test_script_starts_from_any_model_dir_and_refuses_bad_settings(repo, tmp_path):
    _, argv = run_ttt(repo, "dtd", 1, MODEL_DIR=str(tmp_path), SHOTS="4")
    assert argv[argv.index("--model-dir") + 1] == str(tmp_path)
    assert argv[argv.index("--output-dir") + 1] == "./output/ttt/dtd/shots_4/RAdaTTT/vit_b16_finegrained/seed1"

    for env, message in [
        ({"MODEL_DIR": str(tmp_path / "nowhere")}, "does not exist"),
        ({"TRAINER": "RAda"}, "TRAINER must be RAdaTTT or RAdaCoOpTTT"),
        ({"PRETRAINED": "yes"}, "PRETRAINED must be 0 or 1"),
        ({"CFG": "vit_b16_typo"}, "Available for RAdaTTT: vit_b16_finegrained vit_b16_imagenet"),
    ]:
        result, argv = run_ttt(repo, "dtd", 1, **env)
        assert result.returncode == 1 and argv is None and message in result.stderr, (env, result.stderr)


def test_script_skips_a_finished_run(repo):
    run_dir = repo / "output/ttt/dtd/shots_0/RAdaTTT/vit_b16_finegrained/seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "log.txt").write_text(rada_log(60.0, subsample="all", trainer="RAdaTTT", train=False))
    result, argv = run_ttt(repo, "dtd", 1)
    assert result.returncode == 0 and argv is None and "Skipping" in result.stdout


# ---- scripts/parse_results.py ----------------------------------------------------------------------

def test_results_table_groups_ttt_runs_by_starting_point(tmp_path, capsys):
    parse_results = load_parse_results()
    runs = {("shots_0", "vit_b16_imagenet"): {"imagenet_a": 50.0, "imagenetv2": 60.0, "imagenet_r": 77.0},
            ("shots_16", "vit_b16_imagenet"): {"imagenet_a": 52.0, "imagenetv2": 62.0, "imagenet_r": 78.0,
                                               "imagenet_sketch": 49.0}}
    for (start, cfg), accuracies in runs.items():
        for dataset, accuracy in accuracies.items():
            run_dir = tmp_path / "ttt" / dataset / start / "RAdaTTT" / cfg / "seed1"
            run_dir.mkdir(parents=True)
            (run_dir / "log.txt").write_text(rada_log(accuracy, subsample="all", trainer="RAdaTTT", train=False))
    assert parse_results.main([str(tmp_path), "--protocol", "ttt", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    identity, pretrained = out.split("== ttt")[1:]
    assert "from the identity head" in identity and "from a model trained on 16 shots" in pretrained
    assert "| ImageNet-A " in identity and "| 50.00 " in identity
    assert "Domain generalisation average of the targets present (3 of 4)" in identity and "62.33" in identity
    assert "Not run: imagenet_sketch" in identity and "caltech101" not in identity
    assert "Domain generalisation average (4 targets)" in pretrained and "60.25" in pretrained

    assert parse_results.main([str(tmp_path), "--protocol", "ttt", "--seeds", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "OUTPUT=" in out and "TRAINER=RAdaTTT CFG=vit_b16_imagenet bash scripts/rada/ttt.sh imagenet_a 2" in out
    assert "CFG=vit_b16_imagenet PRETRAINED=1 SHOTS=16 bash scripts/rada/ttt.sh imagenet_a 2" in out
