import os

import pytest
import torch
from clip import clip as clip_api
from clip.model import CLIP, convert_weights
from torch.nn import functional as F

from tests.conftest import requires_cpu_half, requires_dassl, train_only
from trainers.errors import UserFacingError
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.maple import MaPLeClassifier, MaPLePromptLearner
from trainers.model.prompts import FixedPrompts, fill_template
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import load_weights

CLASSES = ["golden_retriever", "cat", "air plane"]
LAYERS = 4
N_CTX = 2
TEXT_WIDTH, VISION_WIDTH, EMBED_DIM = 64, 128, 32


def deep_clip():
    """A random CLIP with four layers per encoder and a vision width unlike the text width, so
    that layers past the prompt depth exist and a width mix-up cannot go unnoticed."""
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=EMBED_DIM, image_resolution=64, vision_layers=LAYERS, vision_width=VISION_WIDTH,
        vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=TEXT_WIDTH,
        transformer_heads=1, transformer_layers=LAYERS,
    )
    return model.float().eval()


@pytest.fixture
def clip_model():
    return deep_clip()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


class BlockRecorder:
    """Keeps what each block received (after any pre-hook) and returned in its latest call."""

    def __init__(self, blocks):
        self.inputs, self.outputs = {}, {}
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, index):
        def hook(module, args, output):
            self.inputs[index] = args[0].detach().clone()
            self.outputs[index] = output.detach().clone()

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def with_tokens(x, tokens, positions):
    """Reference: x (L, N, W) with rows `positions` set to tokens (n, W) in every sequence."""
    expected = x.clone()
    expected[positions] = tokens.detach().unsqueeze(1).to(x.dtype)
    return expected


def run_and_record(clip_model, model, images):
    text = BlockRecorder(clip_model.transformer.resblocks)
    vision = BlockRecorder(clip_model.visual.transformer.resblocks)
    stem = []  # what ln_pre receives: class + patch tokens (+ prompts)
    handle = clip_model.visual.ln_pre.register_forward_hook(lambda m, args, out: stem.append(args[0].detach()))
    try:
        with torch.no_grad():
            clip_model.encode_image(images)
            plain_stem = stem[-1]
            model(images)
    finally:
        text.remove()
        vision.remove()
        handle.remove()
    return text, vision, plain_stem, stem[-1]


@pytest.mark.parametrize("depth", [1, 3, LAYERS])
def test_prompts_reach_exactly_their_positions_and_layers(clip_model, images, depth):
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, depth=depth)
    model = MaPLeClassifier(clip_model, learner)
    text, vision, plain_stem, prompted_stem = run_and_record(clip_model, model, images)
    text_slots, vision_slots = slice(1, 1 + N_CTX), slice(-N_CTX, None)

    # Layer 0: the text input is the prompt embeddings plus positions; the vision prompts F_0(ctx)
    # follow the class and patch tokens of unprompted CLIP, before ln_pre.
    embedded = learner.prompt_embeddings() + clip_model.positional_embedding
    assert torch.equal(text.inputs[0], embedded.permute(1, 0, 2))
    first_vision = learner.proj(learner.ctx).detach()
    assert torch.equal(prompted_stem, torch.cat([plain_stem, first_vision.expand(len(images), -1, -1)], dim=1))
    assert torch.equal(vision.inputs[0], clip_model.visual.ln_pre(prompted_stem).permute(1, 0, 2))

    # Layers 1 .. depth-1 get their own prompts in place of the previous layer's output there;
    # every other position, and every deeper layer, sees exactly what the previous layer produced.
    for layer in range(1, LAYERS):
        expected_text, expected_vision = text.outputs[layer - 1], vision.outputs[layer - 1]
        if layer < depth:
            text_prompt = learner.compound_prompts_text[layer - 1]
            vision_prompt = learner.compound_prompt_projections[layer - 1](text_prompt)
            expected_text = with_tokens(expected_text, text_prompt, text_slots)
            expected_vision = with_tokens(expected_vision, vision_prompt, vision_slots)
        assert torch.equal(text.inputs[layer], expected_text), f"text layer {layer}"
        assert torch.equal(vision.inputs[layer], expected_vision), f"vision layer {layer}"
    assert len(learner.compound_prompts_text) == depth - 1


def test_depth_one_is_shallow_prompting_with_nothing_but_input_prompts(clip_model, images):
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, depth=1)
    assert list(learner.state_dict()) == ["ctx", "proj.weight", "proj.bias"]
    # The text side is then CoOp-like: with the context still at "a photo", the features are
    # CLIP's own for the written prompt.
    fixed = CLIPClassifier(clip_model, FixedPrompts(CLASSES, "a photo of a {}."))
    model = MaPLeClassifier(clip_model, learner)
    with torch.no_grad():
        assert torch.allclose(model.text_features(), fixed.text_features(), atol=1e-6)
        # Image features differ from CLIP's only through the two appended tokens.
        assert not torch.allclose(model.encode_image(images), clip_model.encode_image(images), atol=1e-3)


def test_context_replaces_the_first_tokens_of_ctx_init(clip_model):
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, ctx_init="a photo of a", depth=2)
    written = clip_api.tokenize(fill_template("a photo of a {}.", CLASSES))
    embedded = clip_model.token_embedding(written)
    with torch.no_grad():
        learner.ctx.add_(1.0)  # a trained context: only positions 1 .. N_CTX may change
        prompts = learner.prompt_embeddings()
    assert torch.equal(prompts[:, 1 : 1 + N_CTX], (embedded[0, 1 : 1 + N_CTX] + 1.0).expand(len(CLASSES), -1, -1))
    assert torch.equal(prompts[:, :1], embedded[:, :1])
    assert torch.equal(prompts[:, 1 + N_CTX :], embedded[:, 1 + N_CTX :])  # "of a <class>." stay fixed
    assert torch.equal(learner.tokenized_prompts, written)


def test_initialisation_follows_maple(clip_model):
    torch.manual_seed(0)
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, ctx_init="", depth=LAYERS)
    assert learner.ctx.shape == (N_CTX, TEXT_WIDTH)
    assert learner.proj.weight.shape == (VISION_WIDTH, TEXT_WIDTH)
    compound = torch.stack(list(learner.compound_prompts_text))
    assert compound.shape == (LAYERS - 1, N_CTX, TEXT_WIDTH)
    assert 0.015 < compound.std() < 0.025 and 0.01 < learner.ctx.std() < 0.03
    # The deep coupling functions start as copies of one layer, yet are separate parameters.
    first, *others = learner.compound_prompt_projections
    for other in others:
        assert torch.equal(other.weight, first.weight) and torch.equal(other.bias, first.bias)
        assert other.weight.data_ptr() != first.weight.data_ptr()
    assert not torch.equal(learner.proj.weight, first.weight)  # the first layer's map is its own


def test_gradients_reach_only_prompts_couplings_and_head(clip_model, images):
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, depth=LAYERS)
    head = RAdaHead(EMBED_DIM, num_heads=8)
    model = MaPLeClassifier(clip_model, learner, head=head)
    train_only(model, learner, head)
    logits, _ = model(images)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    for name, param in learner.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert head.out_proj.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in clip_model.parameters())


def test_any_clip_classifier_encodes_images_through_the_prompt_learner(clip_model, images):
    """MaPLeClassifier adds only a check of its prompt type: a CLIPClassifier with MaPLe's prompts is the same model."""
    learner = MaPLePromptLearner(clip_model, CLASSES, n_ctx=N_CTX, depth=3)
    with torch.no_grad():
        expected = MaPLeClassifier(clip_model, learner)(images).logits
        assert torch.equal(CLIPClassifier(clip_model, learner)(images).logits, expected)
    with pytest.raises(TypeError, match="needs a MaPLePromptLearner"):
        MaPLeClassifier(clip_model, FixedPrompts(CLASSES, "a photo of a {}."))


def test_clip_itself_is_unchanged_outside_prompted_calls(clip_model, images):
    tokens = clip_api.tokenize(fill_template("a photo of a {}.", CLASSES))
    with torch.no_grad():
        image_before, text_before = clip_model.encode_image(images), clip_model.encode_text(tokens)
    model = MaPLeClassifier(clip_model, MaPLePromptLearner(clip_model, CLASSES, depth=3))
    model(images).logits.sum().backward()
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 96, 96))  # fails inside the prompted image encoder
    assert all(not module._forward_pre_hooks for module in clip_model.modules())
    with torch.no_grad():
        assert torch.equal(clip_model.encode_image(images), image_before)
        assert torch.equal(clip_model.encode_text(tokens), text_before)


@requires_cpu_half
def test_half_precision_clip_with_float32_prompts(images):
    clip_model = deep_clip()
    convert_weights(clip_model)
    learner = MaPLePromptLearner(clip_model, CLASSES, depth=3)
    model = MaPLeClassifier(clip_model, learner)
    logits = model(images).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert learner.ctx.dtype == torch.float32 and learner.compound_prompt_projections[1].weight.grad.abs().sum() > 0


def test_weights_trained_on_some_classes_apply_to_others(clip_model, images):
    base = MaPLePromptLearner(clip_model, CLASSES[:2], depth=3)
    new = MaPLePromptLearner(clip_model, CLASSES[2:], depth=3)
    with torch.no_grad():
        for param in base.parameters():
            param.normal_()
    # MaPLe's own checkpoints hold the whole model under "prompt_learner." plus class buffers.
    state = {f"prompt_learner.{key}": value for key, value in base.state_dict().items()}
    state["prompt_learner.token_prefix"] = torch.zeros(2, 1, TEXT_WIDTH)
    state["image_encoder.conv1.weight"] = torch.zeros(1)
    load_weights(new, state, "maple.pth")
    for (name, loaded), trained in zip(new.state_dict().items(), base.state_dict().values(), strict=False):
        assert torch.equal(loaded, trained), name
    with torch.no_grad():
        assert MaPLeClassifier(clip_model, new)(images).logits.shape == (2, 1)


def test_resnet_backbone_is_refused_with_a_clear_message(tiny_resnet_clip_path):
    clip_model = load_clip(str(tiny_resnet_clip_path)).float()
    with pytest.raises(UserFacingError, match="needs a ViT image encoder.*ResNet.*MODEL.BACKBONE.NAME"):
        MaPLePromptLearner(clip_model, CLASSES)


def test_bad_depth_and_context_length_are_explained(clip_model):
    with pytest.raises(UserFacingError, match=f"PROMPT_DEPTH is 9.*between 1 .* and {LAYERS}"):
        MaPLePromptLearner(clip_model, CLASSES, depth=9)
    with pytest.raises(UserFacingError, match="PROMPT_DEPTH is 0"):
        MaPLePromptLearner(clip_model, CLASSES, depth=0)
    with pytest.raises(UserFacingError, match="N_CTX is 5 but CTX_INIT 'a photo of a' has only 4 tokens"):
        MaPLePromptLearner(clip_model, CLASSES, n_ctx=5, depth=2)
    assert MaPLePromptLearner(clip_model, CLASSES, n_ctx=5, ctx_init="", depth=2).ctx.shape == (5, TEXT_WIDTH)


def test_tiny_vit_clip_from_disk(tiny_clip_path, images):
    """The shipped test CLIP (2 layers, 224 px): full depth works, one more is refused."""
    clip_model = load_clip(str(tiny_clip_path)).float()
    model = MaPLeClassifier(clip_model, MaPLePromptLearner(clip_model, CLASSES, depth=2))
    with torch.no_grad():
        assert model(F.interpolate(images, size=224)).logits.shape == (2, len(CLASSES))
    with pytest.raises(UserFacingError):
        MaPLePromptLearner(clip_model, CLASSES, depth=3)


# ---- Dassl glue --------------------------------------------------------------------------------


@requires_dassl
@pytest.mark.parametrize("trainer", ["MaPLe", "RAdaMaPLe"])
@pytest.mark.parametrize("name,lr,epochs,depth", [
    ("vit_b16_c2_ep5_batch4_2ctx", 0.0035, 5, 9),
    ("vit_b16_c2_ep5_batch4_2ctx_cross_datasets", 0.0026, 2, 3),
])
def test_shipped_configs_carry_maples_settings(trainer, name, lr, epochs, depth):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = extend_cfg(get_cfg_default())
    cfg.merge_from_file(f"configs/trainers/{trainer}/{name}.yaml")
    maple, optim = cfg.TRAINER.MAPLE, cfg.OPTIM
    assert (maple.N_CTX, maple.CTX_INIT, maple.PREC, maple.PROMPT_DEPTH) == (2, "a photo of a", "fp16", depth)
    assert (optim.NAME, optim.LR, optim.MAX_EPOCH, optim.LR_SCHEDULER) == ("sgd", lr, epochs, "cosine")
    assert (optim.WARMUP_EPOCH, optim.WARMUP_TYPE, optim.WARMUP_CONS_LR) == (1, "constant", 1e-5)
    assert (cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.MODEL.BACKBONE.NAME) == (4, "ViT-B/16")


MAPLE_CFG = "vit_b16_c2_ep5_batch4_2ctx"
TINY_DEPTH = ("TRAINER.MAPLE.PROMPT_DEPTH", "2")  # the tiny CLIP has two layers per encoder


def assert_clean(result):
    assert result.returncode == 0, result.output[-3000:]
    assert "Traceback" not in result.output


@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,modules", [
    ("MaPLe", ["prompt_learner"]),
    ("RAdaMaPLe", ["prompt_learner", "rada_head"]),
])
def test_train_one_epoch_then_evaluate_new_classes(trainer, modules, synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, MAPLE_CFG, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train(*TINY_DEPTH)
    assert_clean(trained)
    assert "epoch [1/1]" in trained.log and trained.accuracy is not None
    learned = {"ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
               "compound_prompt_projections.0.weight", "compound_prompt_projections.0.bias"}
    for module in modules:
        checkpoint = torch.load(os.path.join(run.train_dir, module, "model.pth.tar-1"), weights_only=True)
        if module == "prompt_learner":
            assert set(checkpoint["state_dict"]) == learned
        else:
            assert "out_proj.weight" in checkpoint["state_dict"]

    evaluated = run.evaluate(*TINY_DEPTH)
    assert_clean(evaluated)
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None


@requires_dassl
def test_unsuitable_backbones_end_in_a_clear_message(
    synthetic_data_root, tiny_clip_path, tiny_resnet_clip_path, tmp_path
):
    from tests.train_harness import TrainRun

    resnet = TrainRun("MaPLe", MAPLE_CFG, synthetic_data_root, tiny_resnet_clip_path, tmp_path / "rn",
                      in_process=True).train()
    too_deep = TrainRun("RAdaMaPLe", MAPLE_CFG, synthetic_data_root, tiny_clip_path, tmp_path / "vit",
                        in_process=True).train()
    for result, phrase in ((resnet, "needs a ViT"), (too_deep, "PROMPT_DEPTH is 9")):
        assert result.returncode == 2 and "Traceback" not in result.output, result.output[-3000:]
        assert phrase in result.output
