"""CLIP-LoRA (trainers/model/lora.py, trainers/lora_trainers.py): the split attention is the fused
one, the updates sit where CLIP-LoRA puts them with its scaling, the adapted model starts as the
frozen one on every backend, only the LoRA matrices (and the head) train, merging changes nothing
but rounding, checkpoints hold only the matrices, and both trainers run end to end."""

import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests import open_clip_models
from tests.conftest import requires_cpu_half, requires_dassl
from trainers.config import LORA_POSITIONS, check_values, defaults
from trainers.errors import UserFacingError
from trainers.model.backbones import as_backbone, load_backbone
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.compositions import build_classifier, composition_of
from trainers.model.lora import POSITION_SHARES, LowRankUpdates, SplitAttention, add_lora, selected_blocks
from trainers.model.prompts import FixedPrompts

CLASSES = ["red circle", "blue square", "star"]
TEMPLATE = "a photo of a {}."


def lora_cfg(**values):
    cfg = defaults()
    cfg.DATASET.NAME = "Caltech101"
    for key, value in values.items():
        cfg.TRAINER.LORA[key] = value
    return cfg


def randomise_updates(updates, seed=0):
    """Non-zero B (and A): a trained update, so that the update shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in updates.parameters():
            param.normal_(0, 0.3)


def images_for(backbone, count=3):
    size = backbone.preprocess.image_size
    torch.manual_seed(0)
    return torch.randn(count, 3, size, size)


# ---- the split attention -----------------------------------------------------------------------


def causal_mask(length):
    return torch.full((length, length), float("-inf")).triu(1)


def padding_mask(lengths, heads, length):
    """open_clip's pad mask: (N * heads, L, L), additive, keys past each sequence's length masked."""
    keys = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    additive = torch.zeros(len(lengths), length, length).masked_fill(keys[:, None, :], float("-inf"))
    return additive.repeat_interleave(heads, dim=0)


@pytest.mark.parametrize("batch_first", [False, True])  # OpenAI CLIP's blocks; open_clip's
@pytest.mark.parametrize("mask", ["none", "causal", "causal_bool", "padding"])
@pytest.mark.parametrize("grad", [False, True])
def test_split_attention_is_the_fused_attention(batch_first, mask, grad):
    torch.manual_seed(0)
    heads, width, batch, length = 4, 32, 3, 7
    fused = nn.MultiheadAttention(width, heads, batch_first=batch_first).eval()
    with torch.no_grad():  # its own initial weights; biases that are not zero
        fused.in_proj_bias.normal_(0, 0.02)
        fused.out_proj.bias.normal_(0, 0.02)
    x = torch.randn(batch, length, width) if batch_first else torch.randn(length, batch, width)
    attn_mask = {"none": None, "causal": causal_mask(length), "causal_bool": causal_mask(length).isinf(),
                 "padding": padding_mask([7, 4, 1], heads, length)}[mask]
    split = SplitAttention(fused)
    with torch.set_grad_enabled(grad):
        expected, _ = fused(x, x, x, need_weights=False, attn_mask=attn_mask)
        got, weights = split(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None and got.shape == expected.shape
    # bit for bit, except by a rounding step against the fused inference kernel (batch_first, no gradients)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()
    assert torch.equal(split.q_proj.weight, fused.in_proj_weight[:width])
    assert torch.equal(split.v_proj.bias, fused.in_proj_bias[2 * width:])
    assert torch.equal(split.out_proj.weight, fused.out_proj.weight)


def test_split_attention_refuses_to_return_weights():
    split = SplitAttention(nn.MultiheadAttention(8, 2))
    x = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="need_weights=False"):
        split(x, x, x, need_weights=True)


# ---- where the updates go, and their scaling -----------------------------------------------------


def test_positions_are_clip_loras_block_indices():
    assert set(LORA_POSITIONS) == {"top3", *POSITION_SHARES}
    twelve = {position: list(selected_blocks(position, 12)) for position in LORA_POSITIONS}
    assert twelve == {  # CLIP-LoRA's INDEX_POSITIONS_TEXT and those of ViT-B/16's vision tower
        "all": list(range(12)), "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
        "half-bottom": [0, 1, 2, 3, 4, 5], "half-up": [6, 7, 8, 9, 10, 11], "top3": [9, 10, 11],
    }
    # ViT-L/14's 24 vision blocks: CLIP-LoRA's halves and all
    assert list(selected_blocks("half-up", 24)) == list(range(12, 24))
    assert list(selected_blocks("half-bottom", 24)) == list(range(12))
    assert list(selected_blocks("all", 24)) == list(range(24))


def test_vit_b16_gets_clip_loras_184320_values():
    from clip.model import CLIP

    with torch.device("meta"):  # the architecture without weights
        model = CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12)
    updates = add_lora(as_backbone(model))
    assert sum(param.numel() for param in updates.parameters()) == 184_320
    assert len(updates.state_dict()) == 2 * 12 * 3 * 2  # towers x blocks x (q, k, v) x (A, B)


def test_the_update_is_alpha_over_sqrt_r_times_b_a_x(clip_model):
    rank, alpha = 4, 3.0
    updates = add_lora(as_backbone(clip_model), rank=rank, alpha=alpha, dropout=0.0)
    layer = clip_model.transformer.resblocks[1].attn.k_proj
    torch.manual_seed(1)
    a, b, x = torch.randn(rank, 64), torch.randn(64, rank), torch.randn(5, 64)
    with torch.no_grad():
        updates.text["1"]["k_proj"].lora_A.weight.copy_(a)
        updates.text["1"]["k_proj"].lora_B.weight.copy_(b)
        update = layer(x) - layer.base_layer(x)
    expected = alpha / math.sqrt(rank) * x @ a.t() @ b.t()  # CLIP-LoRA's scaling
    assert torch.allclose(update, expected, atol=1e-5)
    assert not torch.allclose(update, alpha / rank * x @ a.t() @ b.t(), atol=1e-2)  # peft's default alpha / r


def test_encoder_position_and_params_choose_the_adapted_projections(clip_model):
    updates = add_lora(as_backbone(clip_model), position="top3", encoder="text", params=("q", "o"))
    assert list(updates.state_dict()) == [
        f"text.{block}.{projection}.{matrix}.weight"
        for block in (0, 1) for projection in ("q_proj", "out_proj") for matrix in ("lora_A", "lora_B")
    ]
    attention = clip_model.transformer.resblocks[0].attn
    assert isinstance(attention, SplitAttention) and type(attention.k_proj) is nn.Linear
    assert hasattr(attention.q_proj, "lora_A") and hasattr(attention.out_proj, "lora_A")
    # the image tower's blocks have the same names under visual.: untouched
    assert all(isinstance(block.attn, nn.MultiheadAttention) for block in clip_model.visual.transformer.resblocks)


def test_a_tower_without_attention_blocks_is_named_with_the_fix(tiny_resnet_clip_path):
    backbone = as_backbone(load_clip(str(tiny_resnet_clip_path)).float())
    with pytest.raises(UserFacingError, match="image tower has no attention blocks.*TRAINER.LORA.ENCODER text"):
        add_lora(backbone)
    assert list(add_lora(backbone, encoder="text").state_dict())[0] == "text.0.q_proj.lora_A.weight"


def test_bad_lora_settings_are_refused():
    for key, value, message in [("R", 0, "TRAINER.LORA.R is 0"), ("PARAMS", ["q", "x"], "TRAINER.LORA.PARAMS"),
                                ("PARAMS", ["q", "q"], "distinct"), ("POSITION", "top", "POSITION is 'top'"),
                                ("DROPOUT", 1.0, "DROPOUT is 1.0"), ("ENCODER", "image", "ENCODER is 'image'")]:
        with pytest.raises(UserFacingError, match=message):
            check_values(lora_cfg(**{key: value}))


# ---- exact at initialisation on every backend ------------------------------------------------------


def frozen_and_adapted_logits(backbone):
    """Logits of the frozen model, then of the same backbone with CLIPLoRA's updates built in, and
    the trained modules."""
    images = images_for(backbone)
    with torch.no_grad():
        frozen = CLIPClassifier(backbone, FixedPrompts(CLASSES, TEMPLATE))(images).logits
        model, trained = build_classifier(composition_of("CLIPLoRA"), lora_cfg(), backbone, CLASSES)
        trained["lora"].eval()
        return frozen, model(images).logits, trained


def test_zero_updates_at_initialisation_give_the_frozen_openai_clip_exactly(clip_model):
    frozen, adapted, _ = frozen_and_adapted_logits(as_backbone(clip_model))
    assert torch.equal(adapted, frozen)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_updates_at_initialisation_give_the_frozen_hf_model_exactly(family, tiny_hf_path):
    frozen, adapted, _ = frozen_and_adapted_logits(load_backbone("hf:" + tiny_hf_path(family)))
    assert torch.equal(adapted, frozen)


@pytest.mark.parametrize("style", ["clip", "siglip"])
def test_zero_updates_at_initialisation_give_the_frozen_open_clip_model(style, tmp_path):
    save = {"clip": open_clip_models.save_clip_style, "siglip": open_clip_models.save_siglip_style}[style]
    folder = save(str(tmp_path / style))
    backbone = load_backbone(open_clip_models.backbone_name(folder))
    frozen, adapted, _ = frozen_and_adapted_logits(backbone)
    # MultiheadAttention's fused inference kernel rounds differently from the split projections
    assert torch.allclose(adapted, frozen, rtol=0, atol=1e-5)
    assert all(isinstance(block.attn, SplitAttention) for block in backbone.text_encoder.transformer.resblocks)


@requires_cpu_half
def test_on_half_precision_clip_the_updates_are_float32_and_start_at_zero(tiny_clip_path):
    from clip.model import convert_weights

    clip_model = load_clip(str(tiny_clip_path))
    convert_weights(clip_model)
    frozen, adapted, trained = frozen_and_adapted_logits(as_backbone(clip_model))
    assert adapted.dtype == torch.float16 and torch.equal(adapted, frozen)
    assert {param.dtype for param in trained["lora"].parameters()} == {torch.float32}


# ---- training, merging, checkpoints ---------------------------------------------------------------


def test_an_optimiser_step_changes_only_the_lora_matrices_and_the_head(clip_model, images):
    model, trained = build_classifier(composition_of("RAdaLoRA"), lora_cfg(), as_backbone(clip_model), CLASSES)
    assert list(trained) == ["lora", "rada_head"] and isinstance(trained["lora"], LowRankUpdates)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trained_ids = {id(param) for module in trained.values() for param in module.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trained_ids
    optimizer = torch.optim.AdamW([p for module in trained.values() for p in module.parameters()], lr=1e-2)
    for _ in range(2):  # B starts at zero, so A gets its first gradient in the second step
        optimizer.zero_grad()
        F.cross_entropy(model(images).logits, torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    lora_names = {name for name in before if ".lora_A." in name or ".lora_B." in name}
    head_names = {name for name in before if name.startswith("head.")}
    assert changed and changed <= lora_names | head_names
    assert lora_names <= changed and changed & head_names


def test_merged_updates_give_the_unmerged_logits_and_unmerge_restores_the_weights(clip_model, images):
    backbone = as_backbone(clip_model)
    model, trained = build_classifier(composition_of("CLIPLoRA"), lora_cfg(MERGE_FOR_EVAL=False), backbone, CLASSES)
    updates = trained["lora"]
    randomise_updates(updates)
    weights = {name: value.clone() for name, value in clip_model.state_dict().items() if "base_layer" in name}
    q_weight = clip_model.transformer.resblocks[0].attn.q_proj.base_layer.weight
    q_original = weights["transformer.resblocks.0.attn.q_proj.base_layer.weight"]
    updates.eval()  # MERGE_FOR_EVAL False: the low-rank branch stays apart
    with torch.no_grad():
        unmerged = model(images).logits
        assert not updates.merged and torch.equal(q_weight, q_original)
        updates.merge()
        assert updates.merged and not torch.equal(q_weight, q_original)
        merged = model(images).logits
        updates.unmerge()
    assert not updates.merged
    assert torch.allclose(merged, unmerged, rtol=0, atol=1e-4), (merged - unmerged).abs().max()
    for name, value in weights.items():
        assert torch.allclose(clip_model.state_dict()[name], value, rtol=0, atol=1e-6), name


def test_eval_mode_merges_and_train_mode_unmerges_as_clip_lora(clip_model):
    _, trained = build_classifier(composition_of("CLIPLoRA"), lora_cfg(), as_backbone(clip_model), CLASSES)
    updates = trained["lora"]
    dropouts = [module for module in updates.modules() if isinstance(module, nn.Dropout)]
    assert len(dropouts) == 12 and all(d.p == 0.25 for d in dropouts)
    updates.eval()
    assert updates.merged and not any(d.training for d in dropouts)
    updates.train()
    assert not updates.merged and all(d.training for d in dropouts)


def test_loading_while_merged_keeps_the_frozen_weights(clip_model):
    _, trained = build_classifier(composition_of("CLIPLoRA"), lora_cfg(), as_backbone(clip_model), CLASSES)
    updates = trained["lora"]
    weight = clip_model.visual.transformer.resblocks[1].attn.v_proj.base_layer.weight
    original = weight.detach().clone()
    randomise_updates(updates, seed=1)
    updates.eval()  # merged: the weights hold these updates
    other = {name: torch.randn_like(value) for name, value in updates.state_dict().items()}
    updates.load_state_dict(other)
    assert updates.merged
    updates.train()
    assert torch.allclose(weight, original, rtol=0, atol=1e-6)
    assert all(torch.equal(updates.state_dict()[name], value) for name, value in other.items())


def test_checkpoints_hold_only_the_lora_matrices_and_load_into_a_fresh_model(tiny_clip_path, images):
    def fresh():
        return build_classifier(composition_of("CLIPLoRA"), lora_cfg(),
                                as_backbone(load_clip(str(tiny_clip_path)).float()), CLASSES)

    model, trained = fresh()
    randomise_updates(trained["lora"])
    saved = trained["lora"].state_dict()
    # 2 towers x 2 blocks x (q, k, v) x (A: r x 64 and B: 64 x r) with r = 2
    assert all(".lora_A." in key or ".lora_B." in key for key in saved)
    assert sum(value.numel() for value in saved.values()) == 2 * 2 * 3 * 2 * 2 * 64
    loaded_model, loaded = fresh()
    loaded["lora"].load_state_dict(saved)
    trained["lora"].eval()
    loaded["lora"].eval()
    with torch.no_grad():
        assert torch.equal(loaded_model(images).logits, model(images).logits)


def test_rada_lora_with_the_identity_head_gives_clip_loras_logits(tiny_clip_path, images):
    def build(trainer):
        return build_classifier(composition_of(trainer), lora_cfg(),
                                as_backbone(load_clip(str(tiny_clip_path)).float()), CLASSES)

    clip_lora, clip_trained = build("CLIPLoRA")
    rada_lora, rada_trained = build("RAdaLoRA")
    randomise_updates(clip_trained["lora"])
    rada_trained["lora"].load_state_dict(clip_trained["lora"].state_dict())
    for module in (clip_trained["lora"], rada_trained["lora"], rada_trained["rada_head"]):
        module.eval()
    with torch.no_grad():
        expected, got = clip_lora(images), rada_lora(images)
    assert torch.equal(got.mask, torch.ones_like(got.mask))
    assert torch.allclose(got.logits, expected.logits.float(), rtol=0, atol=1e-5)
    frozen = CLIPClassifier(as_backbone(load_clip(str(tiny_clip_path)).float()), FixedPrompts(CLASSES, TEMPLATE))
    with torch.no_grad():
        assert not torch.allclose(frozen(images).logits, expected.logits, atol=1e-2)  # the updates matter


def test_hf_attention_without_separate_projections_is_named(tiny_hf_path):
    backbone = load_backbone("hf:" + tiny_hf_path("blip"))
    with pytest.raises(UserFacingError, match=r"BlipAttention\) has no separate q_proj, k_proj, v_proj, out_proj"):
        add_lora(backbone, encoder="vision")


# ---- the Dassl trainers ------------------------------------------------------------------------------


def merged_cfg(trainer):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.merge_from_file(f"configs/trainers/{trainer}/vit_b16_iters500_batch32.yaml")
    return cfg


@requires_dassl
@pytest.mark.parametrize("trainer", ["CLIPLoRA", "RAdaLoRA"])
def test_shipped_configs_are_clip_loras_recipe(trainer):
    cfg = merged_cfg(trainer)
    lora, optim = cfg.TRAINER.LORA, cfg.OPTIM
    assert (lora.R, lora.ALPHA, lora.DROPOUT, lora.POSITION, lora.ENCODER, list(lora.PARAMS)) == (
        2, 1.0, 0.25, "all", "both", ["q", "k", "v"])
    assert (lora.N_ITERS, lora.MIN_LR, lora.TEMPLATE, lora.PREC) == (500, 1e-6, "a photo of a {}.", "amp")
    assert (optim.NAME, optim.LR, optim.WEIGHT_DECAY, optim.ADAM_BETA1, optim.ADAM_BETA2) == (
        "adamw", 2e-4, 1e-2, 0.9, 0.999)
    assert (optim.LR_SCHEDULER, optim.WARMUP_EPOCH, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == ("cosine", 0, 32)
    assert tuple(cfg.INPUT.RRCROP_SCALE) == (0.08, 1.0) and "random_flip" in cfg.INPUT.TRANSFORMS
    check_values(cfg, prec_node="LORA")


@requires_dassl
@pytest.mark.parametrize("options,message", [
    (["OPTIM.WARMUP_EPOCH", "1"], "OPTIM.WARMUP_EPOCH 0"),
    (["DATASET.NUM_SHOTS", "-1"], "set TRAINER.LORA.N_ITERS 0 and OPTIM.MAX_EPOCH"),
])
def test_a_schedule_it_cannot_follow_is_refused_before_anything_is_built(options, message):
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401

    cfg = merged_cfg("CLIPLoRA")
    cfg.merge_from_list(options)
    trainer = TRAINER_REGISTRY.get("CLIPLoRA")
    with pytest.raises(UserFacingError, match=message):
        trainer.__new__(trainer).check_cfg(cfg)


def assert_clean(result):
    assert result.returncode == 0 and "Traceback" not in result.output, result.output[-3000:]


@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,options,epochs,modules", [
    # 1 step per shot x 4 shots = 4 steps: 2 epochs of the 2 batches of 5 base classes x 4 shots
    ("CLIPLoRA", ("TRAINER.LORA.N_ITERS", "1"), 2, ["lora"]),
    ("RAdaLoRA", ("TRAINER.LORA.N_ITERS", "0"), 1, ["lora", "rada_head"]),
])
def test_train_on_base_classes_then_evaluate_new_classes(
    trainer, options, epochs, modules, synthetic_data_root, tiny_clip_path, tmp_path
):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, "vit_b16_iters500_batch32", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*options)
    assert_clean(trained)
    assert f"epoch [{epochs}/{epochs}] batch [2/2]" in trained.log and trained.accuracy is not None
    assert "CLIP-LoRA: rank 2, alpha 1 (scaling alpha / sqrt(r) = 0.7071), dropout 0.25 on q, k, v" in trained.log
    assert trained.log.count("lr 1.0000e-06") == 1  # the last step: the cosine over the steps ends at MIN_LR
    lora = torch.load(os.path.join(run.train_dir, "lora", f"model.pth.tar-{epochs}"), weights_only=True)
    assert set(lora["state_dict"]) == {f"{tower}.{block}.{projection}.{matrix}.weight" for tower in ("text", "image")
                                       for block in (0, 1) for projection in ("q_proj", "k_proj", "v_proj")
                                       for matrix in ("lora_A", "lora_B")}
    assert any(value.abs().sum() > 0 for key, value in lora["state_dict"].items() if ".lora_B." in key)

    evaluated = run.evaluate()
    assert_clean(evaluated)
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, f'model.pth.tar-{epochs}')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None
