"""The backbone interface on open_clip models: tiny CLIP-style and SigLIP-style models built from
custom model configs, written to disk as the hub holds them and loaded through the project's loader."""

import pytest
import torch
from torch.nn import functional as F

from tests import open_clip_models
from tests.conftest import requires_dassl
from tests.train_harness import TrainRun
from trainers.errors import CheckpointError
from trainers.model.backbones import BackboneError, follow_preprocess, load_backbone
from trainers.model.classifier import CLIPClassifier
from trainers.model.finetune import flyp_loss
from trainers.model.maple import MaPLeClassifier, MaPLePromptLearner
from trainers.model.prompts import CoOpPromptLearner, FixedPrompts, fill_template
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import read_checkpoint, write_checkpoint

CLASSES = ["red_circle", "blue square", "golden retriever", "cat"]
TEMPLATE = "a photo of a {}."
STYLES = ["clip", "siglip"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return open_clip_models.save_both_styles(str(tmp_path_factory.mktemp("open_clip")))


@pytest.fixture(scope="module")
def backbones(model_dirs):
    return {style: load_backbone(open_clip_models.backbone_name(folder)) for style, folder in model_dirs.items()}


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(3, 3, open_clip_models.IMAGE_SIZE, open_clip_models.IMAGE_SIZE)


def test_loaded_from_disk_with_the_models_own_layout(backbones):
    clip, siglip = backbones["clip"], backbones["siglip"]
    assert (clip.tokenizer.prefix_length, clip.objective, clip.logit_bias) == (1, "softmax", None)
    assert (siglip.tokenizer.prefix_length, siglip.objective, siglip.logit_bias.item()) == (0, "sigmoid", -10.0)
    assert siglip.text_encoder.attn_mask is None and siglip.text_encoder.pool_type == "last"
    assert (clip.text_width, clip.vision_width, clip.embed_dim) == (64, 64, 32)
    assert (siglip.text_width, siglip.vision_width, siglip.embed_dim) == (40, 48, 32)
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and siglip.preprocess.image_size == 64
    # SigLIP-style sequences: the text first, then </s>, then padding; pooled at the last position.
    tokens = siglip.tokenizer(["a red circle."])[0].tolist()
    assert tokens[:5] == siglip.tokenizer.encode("a red circle.") + [1] and set(tokens[5:]) == {0}


@pytest.mark.parametrize("style", STYLES)
def test_features_are_open_clips_own(backbones, images, style):
    backbone = backbones[style]
    tokens = backbone.tokenizer(fill_template(TEMPLATE, CLASSES))
    with torch.no_grad():
        assert torch.equal(backbone.text_encoder.encode_tokens(tokens), backbone.model.encode_text(tokens))
        assert torch.equal(backbone.image_encoder(images), backbone.model.encode_image(images))


@pytest.mark.parametrize("style", STYLES)
def test_identity_head_gives_the_models_own_zero_shot_logits(backbones, images, style):
    backbone = backbones[style]
    prompts = FixedPrompts(CLASSES, TEMPLATE)
    with torch.no_grad():
        expected, _ = backbone.model.get_logits(images, backbone.tokenizer(fill_template(TEMPLATE, CLASSES)))
        plain = CLIPClassifier(backbone, prompts)(images).logits
        with_head = CLIPClassifier(backbone, prompts, head=RAdaHead(32, num_heads=8))(images).logits
    assert torch.equal(plain, expected) and torch.equal(with_head, expected)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("position", ["end", "front"])
def test_coop_context_from_the_template_words_reproduces_its_zero_shot_features(backbones, style, position):
    backbone = backbones[style]
    learner = CoOpPromptLearner(backbone, CLASSES, ctx_init="a photo of a", position=position)
    fixed = FixedPrompts(CLASSES, TEMPLATE if position == "end" else "{} a photo of a.")
    with torch.no_grad():
        learned = learner(backbone.text_encoder)
        written = fixed(backbone.text_encoder)
    assert torch.allclose(learned, written, atol=1e-6)
    # The context stands where the tokenizer puts the text: after CLIP's start token, first for SigLIP.
    start = backbone.tokenizer.prefix_length
    expected = backbone.text_encoder.token_embedding(backbone.tokenizer("a photo of a"))[0, start : start + 4]
    assert torch.equal(learner.ctx, expected)


def shallow_prompted_image_features(visual, images, prompts):
    """Reference: open_clip's ViT with `prompts` appended after the class and patch tokens."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = torch.cat([x, prompts.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.transformer(visual.ln_pre(x))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


def test_maple_depth_one_is_shallow_prompting(backbones, images):
    backbone = backbones["clip"]
    learner = MaPLePromptLearner(backbone, CLASSES, n_ctx=2, depth=1)
    model = MaPLeClassifier(backbone, learner)
    with torch.no_grad():
        first = learner.proj(learner.ctx)
        expected = shallow_prompted_image_features(backbone.model.visual, images, first)
        assert torch.allclose(model.encode_image(images), expected, atol=1e-6)
        assert torch.allclose(model.text_features(), FixedPrompts(CLASSES, TEMPLATE)(backbone.text_encoder), atol=1e-6)


def test_maple_deep_prompts_run_on_the_siglip_style_towers(backbones, images):
    backbone = backbones["siglip"]
    learner = MaPLePromptLearner(backbone, CLASSES, n_ctx=2, depth=2)
    seen = []
    handle = backbone.text_encoder.transformer.resblocks[1].register_forward_hook(
        lambda module, args, output: seen.append(args[0].detach()))
    try:
        logits = MaPLeClassifier(backbone, learner, head=RAdaHead(32, num_heads=8))(images).logits
    finally:
        handle.remove()
    logits.sum().backward()
    assert logits.shape == (3, len(CLASSES)) and learner.compound_prompts_text[0].grad.abs().sum() > 0
    # No start token: the deep text prompts replace positions 0 .. n-1 of the block's (N, L, W) input.
    assert torch.equal(seen[0][:, :2], learner.compound_prompts_text[0].detach().expand(len(CLASSES), -1, -1))


def test_flyp_on_a_sigmoid_model_uses_the_sigmoid_loss(backbones):
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    expected = -(F.logsigmoid(torch.tensor([2.0, 1.0, -0.5, 3.0]))).sum() / 2
    assert torch.allclose(flyp_loss(logits, objective=backbones["siglip"].objective), expected)
    assert backbones["clip"].objective == "softmax"


def test_preprocessing_follows_the_backbone_unless_set_otherwise(backbones):
    from yacs.config import CfgNode as CN

    cfg = CN()
    cfg.INPUT = CN()
    cfg.INPUT.SIZE = (224, 224)
    cfg.INPUT.PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
    cfg.INPUT.PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.PREPROCESS = "auto"  # the backbone's own for any backbone but OpenAI CLIP
    cfg.MODEL = CN({"BACKBONE": CN({"NAME": "open_clip:ViT-B-16-SigLIP/webli"})})
    followed, changed = follow_preprocess(cfg, backbones["siglip"].preprocess)
    assert followed.INPUT.SIZE == (64, 64) and followed.INPUT.PIXEL_MEAN == [0.5, 0.5, 0.5]
    assert set(changed) == {"SIZE", "PIXEL_MEAN", "PIXEL_STD"} and cfg.INPUT.SIZE == (224, 224)
    cfg.INPUT.PREPROCESS = "config"
    cfg.INPUT.PIXEL_MEAN = [0.4, 0.4, 0.4]  # the user's own choice stays under "config"
    assert follow_preprocess(cfg, backbones["siglip"].preprocess)[0].INPUT.PIXEL_MEAN == [0.4, 0.4, 0.4]


def test_the_resize_mode_is_the_models_own(backbones):
    # SigLIP's open_clip configs squash the whole image; CLIP's resize the shorter side, then crop.
    assert backbones["siglip"].preprocess.resize_mode == "squash"
    assert backbones["clip"].preprocess.resize_mode == "shortest"


@pytest.mark.parametrize("arch, tag, mode", [
    ("ViT-B-16-SigLIP", "webli", "squash"), ("ViT-B-16-SigLIP2", "webli", "squash"),
    ("ViT-B-16", "laion2b_s34b_b88k", "shortest"), ("ViT-B-16", "openai", "shortest"),
])
def test_a_pretrained_tags_resize_mode_reaches_the_backbone(arch, tag, mode):
    """The preprocessing open_clip settles on for a pretrained tag (its defaults under the tag's
    config, as create_model merges them) gives the tag's resize mode; nothing is downloaded."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from trainers.model.backbones.open_clip_backend import _preprocess

    settled = merge_preprocess_dict(asdict(PreprocessCfg()), get_pretrained_cfg(arch, tag))
    assert _preprocess(SimpleNamespace(preprocess_cfg=settled)).resize_mode == mode


def test_a_timm_image_tower_works_without_deep_vision_prompts():
    import open_clip

    from trainers.model.backbones.open_clip_backend import OpenCLIPBackbone

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg={
        "timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear", "image_size": 224,
    }, text_cfg=open_clip_models.CLIP_STYLE["text_cfg"]).eval()
    backbone = OpenCLIPBackbone(model, open_clip.get_tokenizer("ViT-B-16"), "open_clip:tiny-timm", "tiny-timm")
    assert backbone.vision_kind() == "timm:VisionTransformer" and backbone.vision_width == 192
    learner = CoOpPromptLearner(backbone, CLASSES, n_ctx=4)
    with torch.no_grad():
        logits = CLIPClassifier(backbone, learner, head=RAdaHead(32, num_heads=8))(torch.randn(2, 3, 224, 224)).logits
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    with pytest.raises(BackboneError, match="MaPLe needs open_clip's own ViT.*timm"):
        MaPLePromptLearner(backbone, CLASSES)


def test_openai_signatures_name_the_model():
    from trainers.model.backbones import same_backbone

    b16 = {"family": "openai", "model": "ViT-B/16", "embed_dim": 512, "text_width": 512, "vision_width": 768,
           "vision": "ViT", "image_size": 224, "patch_size": 16}
    b32 = {**b16, "model": "ViT-B/32", "patch_size": 32}
    written_before = {key: b16[key] for key in ("embed_dim", "text_width", "vision_width", "vision", "image_size")}
    assert not same_backbone(b32, b16) and not same_backbone({**b32, "model": None}, b16)
    assert same_backbone({**b16, "model": None}, b16)  # a local copy of the same weights
    assert same_backbone(written_before, b16) and not same_backbone(written_before, {**b16, "family": "open_clip"})


# ---- bad input -----------------------------------------------------------------------------------


def test_unknown_architecture_lists_close_matches():
    with pytest.raises(BackboneError, match="Unknown open_clip architecture 'ViT-B-61'.*ViT-B-16"):
        load_backbone("open_clip:ViT-B-61/laion2b_s34b_b88k")


def test_unknown_pretrained_tag_lists_close_matches():
    with pytest.raises(BackboneError, match="no pretrained weights 'laion2b_s34b_b89k' for ViT-B-16.*laion2b_s34b_b88k"):
        load_backbone("open_clip:ViT-B-16/laion2b_s34b_b89k")


def test_missing_weights_offline_name_the_model_the_file_and_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneError) as error:
        load_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k", cache_dir=str(tmp_path))
    message = str(error.value)
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in message and "could not be downloaded" in message
    assert "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "MODEL.BACKBONE.WEIGHTS" in message
    with pytest.raises(BackboneError, match="downloading is disabled"):
        load_backbone("open_clip:ViT-B-32/laion2b_s34b_b79k", cache_dir=str(tmp_path), download=False)


def test_architecture_without_weights_or_with_a_missing_file_is_explained(tmp_path):
    with pytest.raises(BackboneError, match="without weights.*laion2b_s34b_b88k"):
        load_backbone("open_clip:ViT-B-16")
    with pytest.raises(BackboneError, match="is not a file"):
        load_backbone("open_clip:ViT-B-16", weights=str(tmp_path / "missing.safetensors"))


def test_checkpoint_of_another_backbone_is_refused(backbones, tmp_path):
    path = write_checkpoint({"state_dict": {}, "backbone": backbones["clip"].signature()}, str(tmp_path), "model.pth.tar-1")
    assert read_checkpoint(path, backbones["clip"].signature())["state_dict"] == {}
    with pytest.raises(CheckpointError, match="another backbone"):
        read_checkpoint(path, backbones["siglip"].signature())


# ---- train.py end to end -------------------------------------------------------------------------
# train.py's main() runs in this process (the command line of tests/train_harness.py): importing
# torch, Dassl and open_clip once instead of once per run keeps the 18 runs fast.

FAST = {
    "MaPLe": ("TRAINER.MAPLE.PROMPT_DEPTH", "2"),
    "RAdaMaPLe": ("TRAINER.MAPLE.PROMPT_DEPTH", "2"),
    "RAdaTTT": ("TRAINER.TTT.N_VIEWS", "3", "DATALOADER.TEST.BATCH_SIZE", "4"),
    "RAdaCoOpTTT": ("TRAINER.TTT.N_VIEWS", "3", "DATALOADER.TEST.BATCH_SIZE", "4"),
    "FT": ("TRAINER.FT.WARMUP_STEPS", "1"),
    "FLYP": ("TRAINER.FT.WARMUP_STEPS", "1"),
    "RAdaFT": ("TRAINER.FT.WARMUP_STEPS", "1"),
}
TRAINERS = [
    ("ZeroshotCLIP", "vit_b16"), ("CoOp", "vit_b16_ep50_ctxv1"), ("RAda", "vit_b16_ep5"),
    ("RAdaCoOp", "vit_b16_ep50_ctxv1"), ("CLIPAdapter", "vit_b16_ep5"), ("RAdaAdapter", "vit_b16_ep5"),
    ("MaPLe", "vit_b16_c2_ep5_batch4_2ctx"), ("RAdaMaPLe", "vit_b16_c2_ep5_batch4_2ctx"), ("FT", "vit_b16_ep10"),
    ("FLYP", "vit_b16_ep10"), ("RAdaFT", "vit_b16_ep10"), ("RAdaTTT", "vit_b16_imagenet"),
    ("RAdaCoOpTTT", "vit_b16_imagenet"),
]
# The head-only trainers, and FLYP for its sigmoid objective.
SIGLIP_TRAINERS = ["ZeroshotCLIP", "RAda", "RAdaTTT", "RAdaFT", "FLYP"]


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


def train_and_evaluate(trainer, config, data_root, folder, workdir):
    run = TrainRun(trainer, config, data_root, open_clip_models.backbone_name(folder), workdir, in_process=True)
    if trainer.endswith("TTT"):  # test-time trainers train nothing: one evaluation, from the identity head
        options = ("DATASET.SUBSAMPLE_CLASSES", "new", *FAST[trainer])
        evaluated = run.run(run.command(run.test_dir, "--eval-only", options=options), run.test_dir)
        assert_clean(evaluated)
        assert evaluated.accuracy is not None and "INPUT.SIZE (64, 64)" in evaluated.output
        return run
    trained = run.train(*FAST.get(trainer, ()))
    assert_clean(trained)
    assert trained.accuracy is not None and "INPUT.SIZE (64, 64)" in trained.output
    evaluated = run.evaluate(*FAST.get(trainer, ()))
    assert_clean(evaluated)
    assert evaluated.accuracy is not None
    return run


@requires_dassl
@pytest.mark.parametrize("trainer,config", TRAINERS)
def test_every_trainer_on_the_clip_style_model(trainer, config, model_dirs, synthetic_data_root, tmp_path):
    train_and_evaluate(trainer, config, synthetic_data_root, model_dirs["clip"], tmp_path)


@requires_dassl
@pytest.mark.parametrize("trainer,config", [(t, c) for t, c in TRAINERS if t in SIGLIP_TRAINERS])
def test_head_only_trainers_on_the_siglip_style_model(
    trainer, config, model_dirs, synthetic_data_root, tmp_path
):
    run = train_and_evaluate(trainer, config, synthetic_data_root, model_dirs["siglip"], tmp_path)
    if trainer == "RAda":  # a head trained on one backbone never loads into another
        other = TrainRun("RAda", config, synthetic_data_root,
                             open_clip_models.backbone_name(model_dirs["clip"]), tmp_path / "other", in_process=True)
        refused = other.evaluate(model_dir=run.train_dir)
        assert refused.returncode == 2 and "another backbone" in refused.output
