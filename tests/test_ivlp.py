"""IVLP, RAdaIVLP and VPT: deep prompts against a block-by-block reference, the exact zero-shot
identities, the spec's parameter counts, the identity head, and training through train.py."""

import os

import pytest
import torch
from clip import clip as clip_api
from clip.model import CLIP
from torch.nn import functional as F

from tests.conftest import requires_dassl, train_only
from trainers.config import check_values, defaults
from trainers.errors import UserFacingError
from trainers.model.classifier import CLIPClassifier
from trainers.model.ivlp import IVLPPromptLearner, VPTPrompts
from trainers.model.prompts import FixedPrompts, fill_template
from trainers.model.rada_head import RAdaHead
from trainers.model.tiny_clip import TINY_EMBED_DIM

CLASSES = ["golden_retriever", "cat", "air plane"]
LAYERS = 3
TEMPLATE = "a photo of a {}."


def three_layer_clip():
    """A random CLIP with three layers per tower (blocks past the prompt depth exist) and a vision
    width unlike the text width, small enough to run in milliseconds."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=LAYERS, vision_width=96, vision_patch_size=32,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                 transformer_layers=LAYERS)
    return model.float().eval()


def scramble(module):
    """Move every learned prompt away from its initial value, as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param))


# ---- the reference: each tower run block by block, prompts put in by hand -------------------------


def reference_text_features(clip_model, learner):
    """Text features with block i (1 <= i < depth) getting text_VPT_shallow[i] at rows 1 .. n."""
    n = learner.n_ctx
    x = (learner.prompt_embeddings() + clip_model.positional_embedding).permute(1, 0, 2)
    for index, block in enumerate(clip_model.transformer.resblocks):
        if str(index) in learner.text_VPT_shallow:
            x = x.clone()
            x[1 : 1 + n] = learner.text_VPT_shallow[str(index)].unsqueeze(1)
        x = block(x)
    x = clip_model.ln_final(x.permute(1, 0, 2))
    eot = learner.tokenized_prompts.argmax(dim=-1)
    return x[torch.arange(x.shape[0]), eot] @ clip_model.text_projection


def reference_image_features(clip_model, images, first=None, deep=None):
    """Image features with `first` (m, W) appended after the class and patch tokens before ln_pre and
    block i getting deep[i] in its last m rows."""
    visual = clip_model.visual
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    if first is not None:
        x = torch.cat([x, first.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    for index, block in enumerate(visual.transformer.resblocks):
        if deep and str(index) in deep:
            prompt = deep[str(index)]
            x = torch.cat([x[: -prompt.shape[0]], prompt.unsqueeze(1).expand(-1, x.shape[1], -1)])
        x = block(x)
    return visual.ln_post(x.permute(1, 0, 2)[:, 0]) @ visual.proj


@pytest.fixture
def small_images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("depth_text,depth_vision", [(LAYERS, LAYERS), (2, 1), (1, 2)])
def test_deep_prompts_equal_the_block_by_block_reference(small_images, depth_text, depth_vision):
    clip_model = three_layer_clip()
    learner = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=2, n_ctx_vision=3,
                                depth_text=depth_text, depth_vision=depth_vision)
    scramble(learner)
    assert sorted(learner.text_VPT_shallow) == [str(i) for i in range(1, depth_text)]
    assert sorted(learner.vision_VPT_shallow) == [str(i) for i in range(1, depth_vision)]
    model = CLIPClassifier(clip_model, learner)
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), reference_text_features(clip_model, learner),
                                   rtol=0, atol=1e-5)
        expected = reference_image_features(clip_model, small_images, learner.VPT, learner.vision_VPT_shallow)
        torch.testing.assert_close(model.encode_image(small_images), expected, rtol=0, atol=1e-5)
    if depth_vision > 1:  # each prompt one block later would change the features: the reference is not blind
        shifted = {str(int(block) + 1): prompt for block, prompt in learner.vision_VPT_shallow.items()}
        with torch.no_grad():
            wrong = reference_image_features(clip_model, small_images, learner.VPT, shifted)
            assert not torch.allclose(model.encode_image(small_images), wrong, atol=1e-3)


def test_depth_one_is_shallow_prompting(small_images):
    clip_model = three_layer_clip()
    learner = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=2, n_ctx_vision=2, depth_text=1, depth_vision=1)
    assert list(learner.state_dict()) == ["ctx", "VPT"]
    model = CLIPClassifier(clip_model, learner)
    with torch.no_grad():
        # The untrained context is the words "a photo": the text side is CLIP's own prompt.
        zero_shot = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE))
        torch.testing.assert_close(model.text_features(), zero_shot.text_features(), rtol=0, atol=1e-5)
        # The vision prompts enter the input and nothing else.
        shallow = reference_image_features(clip_model, small_images, learner.VPT)
        torch.testing.assert_close(model.encode_image(small_images), shallow, rtol=0, atol=1e-5)
        assert not torch.allclose(shallow, clip_model.encode_image(small_images), atol=1e-3)


def test_context_of_two_tokens_keeps_the_other_words_fixed(clip_model):
    learner = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=2, depth_text=2, depth_vision=2)
    written = clip_api.tokenize(fill_template(TEMPLATE, CLASSES))
    embedded = clip_model.token_embedding(written)
    assert torch.equal(learner.tokenized_prompts, written)
    with torch.no_grad():
        prompts = learner.prompt_embeddings()
    assert torch.equal(prompts, embedded)  # "a photo" learned from the words, "of a <class>." fixed
    four = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=4, depth_text=1, depth_vision=1)
    assert torch.equal(four.ctx, embedded[0, 1:5])
    random = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=5, depth_text=1, depth_vision=1)
    assert random.tokenized_prompts[0, 1:6].tolist() == clip_api.tokenize("X X X X X")[0, 1:6].tolist()


@pytest.mark.parametrize("n_ctx_vision,depth_vision", [(0, 2), (2, 0)])
def test_without_vision_prompts_and_with_the_words_context_the_logits_are_zero_shot_clips(
    clip_model, images, n_ctx_vision, depth_vision
):
    """Shallow text prompts still holding the words, and no vision prompts (zero tokens, or depth 0):
    exactly zero-shot CLIP with "a photo of a {}."."""
    learner = IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=2, n_ctx_vision=n_ctx_vision, depth_text=1,
                                depth_vision=depth_vision)
    assert learner.VPT is None and len(learner.vision_VPT_shallow) == 0
    with torch.no_grad():
        expected = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE))(images).logits
        torch.testing.assert_close(CLIPClassifier(clip_model, learner)(images).logits, expected, rtol=0, atol=1e-4)


def test_vpt_is_zero_shot_text_with_prompted_images(small_images):
    clip_model = three_layer_clip()
    vpt = VPTPrompts(clip_model, CLASSES, n_ctx_vision=2, depth_vision=2)
    scramble(vpt)
    assert list(vpt.state_dict()) == ["VPT", "vision_VPT_shallow.1"]  # the text features are not saved
    model = CLIPClassifier(clip_model, vpt)
    tokens = clip_api.tokenize(fill_template(TEMPLATE, CLASSES))
    with torch.no_grad():
        text = clip_model.encode_text(tokens)
        image = reference_image_features(clip_model, small_images, vpt.VPT, vpt.vision_VPT_shallow)
        output = model(small_images)
        expected = clip_model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(output.logits, expected, rtol=0, atol=1e-4)


def test_identity_head_gives_ivlps_logits(clip_model, images):
    learner = IVLPPromptLearner(clip_model, CLASSES, depth_text=2, depth_vision=2)
    scramble(learner)
    with torch.no_grad():
        expected = CLIPClassifier(clip_model, learner)(images).logits
        output = CLIPClassifier(clip_model, learner, head=RAdaHead(TINY_EMBED_DIM, num_heads=8))(images)
    assert torch.equal(output.mask, torch.ones_like(output.mask))
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-4)


def test_gradients_reach_every_prompt_and_nothing_of_clip(clip_model, images):
    learner = IVLPPromptLearner(clip_model, CLASSES, depth_text=2, depth_vision=2)
    model = train_only(CLIPClassifier(clip_model, learner), learner)
    F.cross_entropy(model(images).logits, torch.tensor([0, 2, 1])).backward()
    for name, param in learner.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in clip_model.parameters())
    assert all(not module._forward_pre_hooks for module in clip_model.modules())


@pytest.mark.parametrize("maker,expected", [
    (lambda clip: IVLPPromptLearner(clip, CLASSES, 2, 2, depth_text=12, depth_vision=12), 30_720),
    (lambda clip: IVLPPromptLearner(clip, CLASSES, 4, 4, depth_text=9, depth_vision=9), 46_080),
    (lambda clip: VPTPrompts(clip, CLASSES, n_ctx_vision=8, depth_vision=12), 73_728),
])
def test_trainable_parameter_counts_on_vit_b16_shapes(maker, expected):
    """The spec's counts on ViT-B/16's shapes (a CLIP on the meta device: shapes without values)."""
    with torch.device("meta"):
        clip_model = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                          vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                          transformer_heads=8, transformer_layers=12)
        prompts = maker(clip_model)
    assert sum(param.numel() for param in prompts.parameters()) == expected


def test_bad_depths_and_lengths_are_explained(clip_model):
    with pytest.raises(UserFacingError, match=r"TRAINER.IVLP.PROMPT_DEPTH_TEXT is 3; .*between 1 .* and 2"):
        IVLPPromptLearner(clip_model, CLASSES, depth_text=3, depth_vision=2)
    with pytest.raises(UserFacingError, match=r"TRAINER.IVLP.PROMPT_DEPTH_TEXT is 0"):
        IVLPPromptLearner(clip_model, CLASSES, depth_text=0, depth_vision=2)
    with pytest.raises(UserFacingError, match=r"TRAINER.IVLP.PROMPT_DEPTH_VISION is 9; .*between 0 .* and 2"):
        IVLPPromptLearner(clip_model, CLASSES, depth_text=2, depth_vision=9)
    with pytest.raises(UserFacingError, match=r"TRAINER.VPT.PROMPT_DEPTH_VISION is 12; .*between 1 .* and 2"):
        VPTPrompts(clip_model, CLASSES, depth_vision=12)
    with pytest.raises(UserFacingError, match="N_CTX_TEXT is 3 but CTX_INIT 'a photo' has only 2 tokens"):
        IVLPPromptLearner(clip_model, CLASSES, n_ctx_text=3, ctx_init="a photo", depth_text=1, depth_vision=1)
    cfg = defaults()
    cfg.TRAINER.IVLP.PROMPT_DEPTH_TEXT = 0
    cfg.TRAINER.VPT.PROMPT_DEPTH_VISION = 0
    with pytest.raises(UserFacingError, match="PROMPT_DEPTH_TEXT is 0.*PROMPT_DEPTH_VISION is 0"):
        check_values(cfg)


# ---- Dassl glue --------------------------------------------------------------------------------


@requires_dassl
@pytest.mark.parametrize("trainer,name,ctx,depth,lr,epochs", [
    ("IVLP", "vit_b16_c2_ep5_batch4_2ctx", 2, 12, 0.0035, 5),
    ("RAdaIVLP", "vit_b16_c2_ep5_batch4_2ctx", 2, 12, 0.0035, 5),
    ("IVLP", "vit_b16_c2_ep20_batch4_4ctx", 4, 9, 0.0025, 20),
    ("RAdaIVLP", "vit_b16_c2_ep20_batch4_4ctx", 4, 9, 0.0025, 20),
])
def test_shipped_ivlp_configs_carry_the_authors_settings(trainer, name, ctx, depth, lr, epochs):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_file(f"configs/trainers/{trainer}/{name}.yaml")
    ivlp, optim = cfg.TRAINER.IVLP, cfg.OPTIM
    assert (ivlp.N_CTX_TEXT, ivlp.N_CTX_VISION, ivlp.CTX_INIT, ivlp.PREC) == (ctx, ctx, "a photo of a", "fp16")
    assert (ivlp.PROMPT_DEPTH_TEXT, ivlp.PROMPT_DEPTH_VISION) == (depth, depth)
    assert (optim.NAME, optim.LR, optim.MAX_EPOCH, optim.WARMUP_EPOCH, optim.WARMUP_CONS_LR) == (
        "sgd", lr, epochs, 1, 1e-5)
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.MODEL.BACKBONE.NAME) == (4, "ViT-B/16")


@requires_dassl
def test_shipped_vpt_config_carries_the_authors_settings():
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_file("configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml")
    vpt, optim = cfg.TRAINER.VPT, cfg.OPTIM
    assert (vpt.N_CTX_VISION, vpt.PROMPT_DEPTH_VISION, vpt.PREC) == (8, 12, "fp32")
    assert (optim.NAME, optim.LR, optim.MAX_EPOCH, cfg.DATALOADER.TRAIN_X.BATCH_SIZE) == ("sgd", 0.0025, 5, 4)


IVLP_TINY = ("TRAINER.IVLP.PROMPT_DEPTH_TEXT", "2", "TRAINER.IVLP.PROMPT_DEPTH_VISION", "2")


@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,config,overrides,learned", [
    ("IVLP", "vit_b16_c2_ep5_batch4_2ctx", IVLP_TINY, {"ctx", "text_VPT_shallow.1", "VPT", "vision_VPT_shallow.1"}),
    ("RAdaIVLP", "vit_b16_c2_ep5_batch4_2ctx", IVLP_TINY,
     {"ctx", "text_VPT_shallow.1", "VPT", "vision_VPT_shallow.1"}),
    ("VPT", "vit_b16_c2_ep5_batch4_4", ("TRAINER.VPT.PROMPT_DEPTH_VISION", "2"), {"VPT", "vision_VPT_shallow.1"}),
])
def test_train_one_epoch_then_evaluate_new_classes(trainer, config, overrides, learned, synthetic_data_root,
                                                   tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, config, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*overrides)
    assert trained.returncode == 0 and "Traceback" not in trained.output, trained.output[-3000:]
    assert "epoch [1/1]" in trained.log and trained.accuracy is not None
    modules = ["prompt_learner", "rada_head"] if trainer.startswith("RAda") else ["prompt_learner"]
    checkpoint = torch.load(os.path.join(run.train_dir, "prompt_learner", "model.pth.tar-1"), weights_only=True)
    assert set(checkpoint["state_dict"]) == learned

    evaluated = run.evaluate(*overrides)
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.output, evaluated.output[-3000:]
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None
