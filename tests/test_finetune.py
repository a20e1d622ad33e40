"""Full fine-tuning (FT, FLYP, RAdaFT): the pure pieces on the tiny CLIP, then train.py end to end."""

import copy
import io
import math
import os

import pytest
import torch
from clip import clip as clip_api
from torch.nn import functional as F

from tests.conftest import requires_dassl
from tests.image_trees import imagenet_a_tree, imagenet_tree
from tests.train_harness import TrainRun
from trainers.model.backbones import as_backbone
from trainers.model.backbones.openai_clip import CheckpointedBlocks, checkpoint_blocks
from trainers.model.backbones.openai_clip import ClipTextEncoder as TextEncoder
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.finetune import (
    LogitScale,
    check_master_weights,
    contrastive_loss,
    finetune_precision,
    flyp_loss,
    parameter_groups,
    restrict_logits,
    split_weight_decay,
    subset_index,
    warmup_cosine_scheduler,
)
from trainers.model.precision import Precision
from trainers.model.prompts import (
    TEMPLATE_SETS,
    FixedPrompts,
    fill_template,
    resolve_templates,
)
from trainers.model.rada_head import RAdaHead, mask_penalty, rada_loss
from trainers.model.tiny_clip import TINY_EMBED_DIM

CLASSES = ["golden_retriever", "cat", "air plane", "sea_lion_pup"]
TEMPLATE = "a photo of a {}."
LABELS = torch.tensor([0, 2, 1])


def names_of(module, params):
    ids = {id(p) for p in params}
    return {name for name, p in module.named_parameters() if id(p) in ids}


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def encode_texts(clip_model, template):
    return clip_model.encode_text(clip_api.tokenize(fill_template(template, CLASSES)))


# ---- parameter groups -----------------------------------------------------------------------------

def test_weight_decay_spares_norms_biases_embeddings_and_the_logit_scale(clip_model):
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=RAdaHead(TINY_EMBED_DIM))
    model.requires_grad_(True)
    for module in (model.image_encoder, model.text_encoder, model.head, LogitScale(model.logit_scale)):
        decayed, exempt = split_weight_decay(module)
        decayed, exempt = names_of(module, decayed), names_of(module, exempt)
        everything = {name for name, _ in module.named_parameters()}
        assert decayed | exempt == everything and not decayed & exempt
        for name in everything:
            norm_or_embedding = "ln_" in name or "embedding" in name or name == "logit_scale"
            is_vector = module.get_parameter(name).ndim < 2
            assert (name in exempt) == (norm_or_embedding or is_vector), name
    visual_decayed = names_of(model.image_encoder, split_weight_decay(model.image_encoder)[0])
    assert {"conv1.weight", "proj", "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.1.mlp.c_proj.weight"} <= visual_decayed
    text_exempt = names_of(model.text_encoder, split_weight_decay(model.text_encoder)[1])
    assert {"positional_embedding", "token_embedding.weight", "ln_final.weight"} <= text_exempt  # 2-D, yet exempt


def test_resnet_batch_norms_and_attention_pool_embedding_are_exempt(tiny_resnet_clip_path):
    visual = load_clip(str(tiny_resnet_clip_path)).float().visual
    decayed, exempt = split_weight_decay(visual)
    exempt = names_of(visual, exempt)
    assert "attnpool.positional_embedding" in exempt and "bn1.weight" in exempt and "layer1.0.bn2.bias" in exempt
    assert "conv1.weight" in names_of(visual, decayed)


def test_groups_carry_their_rate_and_decay_and_skip_frozen_parameters(clip_model):
    head = RAdaHead(TINY_EMBED_DIM)
    head.q_proj1.requires_grad_(False)
    groups = parameter_groups(head, lr=3e-4, weight_decay=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-4, 0.1), (3e-4, 0.0)]
    assert names_of(head, groups[0]["params"]) == {f"{n}.weight" for n in ("q_proj2", "q_proj3", "k_proj", "v_proj", "out_proj")}
    assert names_of(head, groups[1]["params"]) == {f"{n}.bias" for n in ("q_proj2", "q_proj3", "k_proj", "v_proj", "out_proj")}
    optimizer = torch.optim.AdamW(groups + parameter_groups(clip_model.visual, lr=1e-5, weight_decay=0.1), lr=1.0)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-4, 3e-4, 1e-5, 1e-5]


def test_one_step_updates_the_encoder_and_the_head_not_the_frozen_text_encoder(clip_model, images):
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=RAdaHead(TINY_EMBED_DIM))
    model.requires_grad_(False)
    model.image_encoder.requires_grad_(True)
    model.head.requires_grad_(True)
    before = copy.deepcopy(model.state_dict())
    optimizers = [torch.optim.AdamW(parameter_groups(model.image_encoder, 1e-3, 0.1)),
                  torch.optim.AdamW(parameter_groups(model.head, 1e-2, 0.1))]
    F.cross_entropy(model(images).logits, LABELS).backward()
    for optimizer in optimizers:
        optimizer.step()
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert {"image_encoder.conv1.weight", "image_encoder.ln_post.weight", "head.out_proj.weight"} <= changed
    assert not any(key.startswith("text_encoder.") for key in changed)


# ---- precision ------------------------------------------------------------------------------------

def test_fp16_becomes_amp_with_a_warning(caplog):
    assert finetune_precision("fp16") == "amp"
    assert "fine-tuning uses amp instead" in caplog.text
    caplog.clear()
    assert (finetune_precision("amp"), finetune_precision("fp32")) == ("amp", "fp32")
    assert caplog.text == ""


def test_amp_optimises_float32_master_weights(tiny_clip_path):
    clip_model = load_clip(str(tiny_clip_path))  # fp16 weights, as OpenAI ships them
    assert clip_model.visual.conv1.weight.dtype == torch.float16
    precision = Precision("amp", "cuda")  # the GPU path's decisions, checked without a GPU
    assert precision.mode == "amp" and precision.clip_dtype == torch.float32
    precision.cast_clip(as_backbone(clip_model))
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=RAdaHead(TINY_EMBED_DIM))
    model.requires_grad_(True)
    groups = [g for module in (model.image_encoder, model.text_encoder, model.head) for g in parameter_groups(module, 1e-5, 0.1)]
    check_master_weights(groups)
    optimizer = torch.optim.AdamW(groups)
    assert {p.dtype for g in optimizer.param_groups for p in g["params"]} == {torch.float32}

    half = load_clip(str(tiny_clip_path))
    Precision("fp16", "cuda").cast_clip(as_backbone(half))
    with pytest.raises(ValueError, match="float16; the optimiser needs float32 master weights"):
        check_master_weights(parameter_groups(half.visual.requires_grad_(True), 1e-5, 0.1))


# ---- gradient checkpointing -----------------------------------------------------------------------

def trainable_classifier(clip_model, checkpointed):
    clip_model = copy.deepcopy(clip_model)
    if checkpointed:
        checkpoint_blocks(clip_model.visual.transformer)
        checkpoint_blocks(clip_model.transformer)
    torch.manual_seed(0)  # the same head in both models
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=RAdaHead(TINY_EMBED_DIM))
    with torch.no_grad():  # a non-zero output map, so that gradients reach every head layer
        model.head.out_proj.weight.normal_(0, 0.1)
    return model.requires_grad_(True)


def test_checkpointing_gives_the_same_loss_and_gradients(clip_model, images):
    plain, checkpointed = trainable_classifier(clip_model, False), trainable_classifier(clip_model, True)
    assert isinstance(checkpointed.image_encoder.transformer.resblocks, CheckpointedBlocks)
    # A block's first layer: the recomputation stops early, before the block's own forward returns.
    calls = {name: count_calls(model.image_encoder.transformer.resblocks[0].ln_1)
             for name, model in (("plain", plain), ("checkpointed", checkpointed))}
    losses = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        losses[name] = F.cross_entropy(model(images).logits, LABELS)
        losses[name].backward()
    assert calls == {"plain": [1], "checkpointed": [1, 1]}  # recomputed in the backward pass
    assert torch.equal(losses["plain"], losses["checkpointed"])
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.allclose(param.grad, grads[name].grad, rtol=1e-5, atol=1e-7), name


def test_checkpointing_keeps_checkpoint_keys_and_evaluation(clip_model, images):
    plain, checkpointed = trainable_classifier(clip_model, False), trainable_classifier(clip_model, True)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    calls = count_calls(checkpointed.image_encoder.transformer.resblocks[0])
    with torch.no_grad():
        assert torch.equal(plain(images).logits, checkpointed(images).logits)
    assert calls == [1]


# ---- text features --------------------------------------------------------------------------------

def test_frozen_text_encoder_features_are_cached_until_its_weights_change(clip_model):
    encoder = TextEncoder(clip_model).requires_grad_(False)
    prompts, calls = FixedPrompts(CLASSES, TEMPLATE), count_calls(encoder)
    first = prompts(encoder)
    assert prompts(encoder) is first and not first.requires_grad and len(calls) == 1
    with torch.no_grad():
        encoder.ln_final.bias.add_(0.5)  # what loading fine-tuned weights does
    assert not torch.allclose(prompts(encoder), first) and len(calls) == 2


def test_trained_text_encoder_features_are_recomputed_with_gradients(clip_model):
    encoder = TextEncoder(clip_model).requires_grad_(True)
    prompts, calls = FixedPrompts(CLASSES, TEMPLATE), count_calls(encoder)
    first, second = prompts(encoder), prompts(encoder)
    assert len(calls) == 2 and first.requires_grad and torch.allclose(first, second)
    first.sum().backward()
    assert encoder.text_projection.grad.abs().sum() > 0 and encoder.token_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation while training: encoded once per weight update
        evaluated = prompts(encoder)
        assert prompts(encoder) is evaluated and len(calls) == 3
        encoder.text_projection.mul_(2)
        assert torch.allclose(prompts(encoder), 2 * evaluated, atol=1e-6) and len(calls) == 4


def test_classifier_evaluates_with_the_current_text_encoder(clip_model, images):
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE))
    calls = count_calls(model.text_encoder)
    with torch.no_grad():
        before = model(images).logits
        model(images)
        assert len(calls) == 1
        model.text_encoder.ln_final.weight.mul_(-1)  # a fine-tuning step on the text encoder
        after = model(images).logits
    assert len(calls) == 2 and not torch.allclose(before, after)


def test_template_ensemble_is_the_mean_of_normalised_features(clip_model):
    templates = ["a photo of a {}.", "a sketch of the {}.", "itap of my {}."]
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        per_template = torch.stack([F.normalize(encode_texts(clip_model, t), dim=-1) for t in templates])
        ensemble = FixedPrompts(CLASSES, templates)(encoder)
    assert torch.allclose(ensemble, per_template.mean(dim=0), atol=1e-6)
    encoder.requires_grad_(True)
    torch.manual_seed(0)
    drawn = FixedPrompts(CLASSES, templates)(encoder)  # training: one template per class
    for k in range(len(CLASSES)):
        assert min((drawn[k] - per_template[t, k]).abs().max() for t in range(len(templates))) < 1e-5


def test_captions_follow_the_labels_and_repeats_are_encoded_once(clip_model):
    encoder = TextEncoder(clip_model)
    prompts = FixedPrompts(CLASSES, TEMPLATE)
    encoded_rows = []
    encoder.register_forward_hook(lambda module, args, output: encoded_rows.append(output.shape[0]))
    labels = torch.tensor([2, 0, 2, 3])
    with torch.no_grad():
        captions = prompts.caption_features(encoder, labels)
        assert torch.allclose(captions, encode_texts(clip_model, TEMPLATE)[labels], atol=1e-6)
    assert encoded_rows == [3]


def test_template_values():
    assert resolve_templates("", "OxfordPets") == ["a photo of a {}, a type of pet."]
    imagenet = resolve_templates("openai_imagenet", "ImageNet")
    assert len(imagenet) == len(set(imagenet)) == 80 and all(t.count("{}") == 1 for t in imagenet)
    assert "itap of a {}." in imagenet and "a {} in a video game." in imagenet
    assert resolve_templates("a blurry photo of a {}.", "ImageNet") == ["a blurry photo of a {}."]
    with pytest.raises(ValueError, match="openai_imagenet"):
        resolve_templates("openai", "ImageNet")
    assert TEMPLATE_SETS["openai_imagenet"] == tuple(sorted(TEMPLATE_SETS["openai_imagenet"]))


# ---- losses ---------------------------------------------------------------------------------------

def reference_contrastive(logits):
    n = logits.shape[0]
    by_row = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(n)]
    by_column = [-(logits[j, j] - torch.logsumexp(logits[:, j], 0)) for j in range(n)]
    return (sum(by_row) / n + sum(by_column) / n) / 2


def test_contrastive_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    logits = 20 * torch.randn(6, 6)
    assert torch.allclose(contrastive_loss(logits), reference_contrastive(logits), atol=1e-5)


def test_same_class_captions_are_negatives_as_in_flyp():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(4, 8), dim=-1)
    captions = F.normalize(torch.randn(4, 8), dim=-1)  # images 1 and 2: one class, captions of two templates
    logits = 100 * images @ captions.t()
    loss = contrastive_loss(logits)
    assert torch.allclose(loss, reference_contrastive(logits), atol=1e-5)
    same_class = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1.0]])
    label_aware = (F.cross_entropy(logits, same_class) + F.cross_entropy(logits.t(), same_class)) / 2
    assert not torch.allclose(loss, label_aware)


def test_flyp_loss_adds_the_mask_regulariser():
    torch.manual_seed(2)
    logits, mask = torch.randn(3, 3), 1 + 0.1 * torch.randn(3, 3, 8)
    assert torch.equal(flyp_loss(logits), contrastive_loss(logits))
    expected = contrastive_loss(logits) + 0.5 * (mask - 1).abs().flatten(1).amax(1).mean()
    assert torch.allclose(flyp_loss(logits, mask, alpha=0.5), expected)


def test_flyp_and_rada_losses_add_the_same_mask_penalty():
    torch.manual_seed(3)
    logits, mask, labels = torch.randn(3, 3), 1 + 0.1 * torch.randn(3, 3, 8), torch.tensor([0, 2, 1])
    penalty = mask_penalty(mask, 0.5)
    assert torch.equal(flyp_loss(logits, mask, 0.5), contrastive_loss(logits) + penalty)
    assert torch.equal(rada_loss(logits, mask, labels, 0.5), F.cross_entropy(logits, labels) + penalty)
    assert mask_penalty(None, 0.5) == 0.0 and mask_penalty(mask, 0.0) == 0.0


# ---- schedule -------------------------------------------------------------------------------------

def test_warmup_then_cosine_per_step_and_resumable():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 1e-5}, {"params": params[1:], "lr": 1e-4}])
    scheduler = warmup_cosine_scheduler(optimizer, warmup_steps=3, total_steps=10)
    seen = []
    for step in range(10):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
        if step == 4:
            saved = io.BytesIO()
            torch.save(scheduler.state_dict(), saved)
    for step, rates in enumerate(seen):
        factor = (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * (step - 3) / 7))
        assert rates == pytest.approx([1e-5 * factor, 1e-4 * factor]), step
    saved.seek(0)
    resumed = warmup_cosine_scheduler(optimizer, warmup_steps=3, total_steps=10)
    resumed.load_state_dict(torch.load(saved, weights_only=True))  # plain data
    assert resumed.get_last_lr() == pytest.approx(seen[5])


# ---- class subsets --------------------------------------------------------------------------------

def test_restricted_logits_select_or_merge_imagenet_classes():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0, 9.0, 3.0], [7.0, 1.0, 4.0, 0.0, 2.0, 8.0]])
    index = subset_index([(4,), (1, 3), (0, 2, 5)])
    assert torch.equal(restrict_logits(logits, index), torch.tensor([[9.0, 5.0, 3.0], [2.0, 1.0, 8.0]]))
    with pytest.raises(ValueError, match="at least one ImageNet label"):
        subset_index([(1,), ()])


# ---- train.py end to end --------------------------------------------------------------------------

CONFIG = "vit_b16_ep10"


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


def saved_weights(run_dir, module):
    return torch.load(os.path.join(run_dir, module, "model.pth.tar-1"), weights_only=True)


def changed_keys(original, checkpoint):
    return {key for key, value in checkpoint["state_dict"].items() if not torch.equal(value, original[key].float())}


@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer, options, modules", [
    ("FT", ("TRAINER.FT.PREC", "fp16"), ["image_encoder"]),
    ("FLYP", (), ["image_encoder", "text_encoder", "logit_scale"]),
    ("RAdaFT", (), ["image_encoder", "rada_head"]),
])
def test_train_one_epoch_then_evaluate_new_classes(trainer, options, modules, synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun(trainer, CONFIG, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*options)
    assert_clean(trained)
    assert "epoch [1/1] batch [2/2]" in trained.log and trained.accuracy is not None
    assert sorted(n for n in os.listdir(run.train_dir) if os.path.isdir(os.path.join(run.train_dir, n))
                  and n != "tensorboard") == sorted(modules)
    clip_weights = torch.load(str(tiny_clip_path), weights_only=True)
    image_encoder = saved_weights(run.train_dir, "image_encoder")
    visual = {key[len("visual."):]: value for key, value in clip_weights.items() if key.startswith("visual.")}
    assert {"conv1.weight", "transformer.resblocks.1.mlp.c_fc.weight"} <= changed_keys(visual, image_encoder)
    assert all(value.dtype == torch.float32 for value in image_encoder["state_dict"].values())
    groups = image_encoder["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(1e-5, 0.1), (1e-5, 0.0)]
    if trainer == "FT":
        assert "fine-tuning uses amp instead" in trained.log
    if "text_encoder" in modules:
        text = {key: value for key, value in clip_weights.items() if not key.startswith("visual.")}
        assert "transformer.resblocks.0.attn.in_proj_weight" in changed_keys(text, saved_weights(run.train_dir, "text_encoder"))
        scale = saved_weights(run.train_dir, "logit_scale")
        assert scale["state_dict"]["logit_scale"] != clip_weights["logit_scale"].float()
    if "rada_head" in modules:
        head_groups = saved_weights(run.train_dir, "rada_head")["optimizer"]["param_groups"]
        assert [g["initial_lr"] for g in head_groups] == [1e-4, 1e-4]

    evaluated = run.evaluate()
    assert_clean(evaluated)
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and "# classes  5" in evaluated.log and evaluated.accuracy is not None


@pytest.mark.e2e
@requires_dassl
def test_rada_head_trains_with_flyps_objective_and_checkpointed_encoders(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaFT", CONFIG, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train("TRAINER.FT.OBJECTIVE", "flyp", "TRAINER.FT.TRAIN_TEXT_ENCODER", "True",
                        "TRAINER.FT.TRAIN_LOGIT_SCALE", "True", "TRAINER.FT.GRAD_CHECKPOINTING", "True",
                        "TRAINER.FT.TEMPLATES", "openai_imagenet")
    assert_clean(trained)
    assert "Fine-tuning with the flyp objective: image encoder trained, text encoder trained, logit scale trained, RAda head" in trained.log
    assert "Prompts (5 classes x 80 templates)" in trained.log
    for module in ("image_encoder", "text_encoder", "logit_scale", "rada_head"):
        assert saved_weights(run.train_dir, module)["epoch"] == 1


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    imagenet_tree(root)
    imagenet_a_tree(root)
    return str(root)


@pytest.mark.e2e
@requires_dassl
def test_imagenet_fine_tuning_evaluates_on_a_class_subset(imagenet_root, tiny_clip_path, tmp_path):
    trained_run = TrainRun("FT", CONFIG, imagenet_root, tiny_clip_path, tmp_path, dataset="imagenet")
    assert_clean(trained_run.train("DATASET.NUM_SHOTS", "-1", subsample="all"))
    # Its own folders: train_base holds the ImageNet run, which a run of other settings may not reuse.
    shifted = TrainRun("FT", CONFIG, imagenet_root, tiny_clip_path, tmp_path / "shifted", dataset="imagenet_a")
    evaluated = shifted.evaluate(subsample="all", model_dir=trained_run.train_dir)
    assert_clean(evaluated)
    assert "ImageNetA covers 5 of the 8 ImageNet classes of its classnames.txt" in evaluated.log
    assert "Prompts (8 classes x 1 template)" in evaluated.log
    assert f"Load {os.path.join(trained_run.train_dir, 'image_encoder', 'model.pth.tar-1')}" in evaluated.log
    assert "# classes  5" in evaluated.log and evaluated.accuracy is not None
    refused = shifted.train(subsample="all")
    assert refused.returncode == 2 and "Traceback" not in refused.output
    assert "ImageNetA is a test set of some of ImageNet's classes" in refused.output


@requires_dassl
@pytest.mark.parametrize("options, message", [
    (("OPTIM.WARMUP_EPOCH", "1"), "warms up per step (TRAINER.FT.WARMUP_STEPS)"),
    (("TRAINER.FT.OBJECTIVE", "xent"), "TRAINER.FT.OBJECTIVE is 'xent'; it must be one of ce, flyp"),
    (("TRAINER.FT.TEMPLATES", "openai"), "TRAINER.FT.TEMPLATES: 'openai' is neither a template"),
])
def test_bad_fine_tuning_settings_are_named(options, message, synthetic_data_root, tiny_clip_path, tmp_path):
    result = TrainRun("FT", CONFIG, synthetic_data_root, tiny_clip_path, tmp_path, in_process=True).train(*options)
    assert result.returncode == 2 and "Traceback" not in result.output
    assert message in result.output
