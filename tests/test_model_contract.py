"""The model contract that methods build on: per-image class features through the head and the
classifier, the classifier's output, explicit prompt contexts and the deep-prompt hooks."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.dense_rada import dense_reference
from tests.test_rada_fused import gradient_error, requires_cpu_fused, values_and_grads
from tests.test_rada_head import normalized, random_head, relative_error
from trainers.model.adapters import FeatureAdapter
from trainers.model.classifier import ClassifierOutput, CLIPClassifier
from trainers.model.deep_prompts import appended_tokens, deep_prompts, replace_tokens
from trainers.model.prompts import CoOpPromptLearner, FixedPrompts
from trainers.model.rada_head import RAdaHead, clip_logits
from trainers.model.tiny_clip import TINY_EMBED_DIM

CLASSES = ["golden_retriever", "cat", "air plane", "sea_lion_pup"]
TEMPLATE = "a photo of a {}."
IMPLS = ["blocked", pytest.param("fused", marks=requires_cpu_fused)]
PER_IMAGE_CASES = [
    # batch, classes, width, heads, temperature, block elements (small values force many blocks)
    (1, 1, 8, 1, 1.0, None),
    (2, 5, 16, 4, 1.0, 16),
    (3, 17, 32, 8, 0.5, 64),
    (4, 40, 64, 8, 2.0, 300),
]


# ---- the head on per-image class features ------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,classes,dim,heads,temperature,block", PER_IMAGE_CASES)
def test_per_image_text_features_match_dense_reference_in_float64(impl, batch, classes, dim, heads, temperature,
                                                                  block):
    head = random_head(dim, heads, temperature, block_elements=block, attention_impl=impl)
    image = normalized(batch, dim).requires_grad_()
    text = normalized(batch, classes, dim).requires_grad_()
    weights = torch.randn(batch, classes, dtype=torch.float64)
    logits, mask, grads = values_and_grads(RAdaHead.forward, head, image, text, 30.0, weights)
    ref_logits, ref_mask, ref_grads = values_and_grads(dense_reference, head, image, text, 30.0, weights)
    assert logits.shape == (batch, classes) and mask.shape == (batch, classes, dim)
    assert (ref_mask - 1).abs().max() > 0.05  # the weights make the mask depart from 1
    assert relative_error(logits, ref_logits) < 1e-9
    assert relative_error(mask, ref_mask) < 1e-9
    assert grads["text"].shape == (batch, classes, dim)
    for name, ref in ref_grads.items():
        assert gradient_error(grads[name], ref) < 1e-9, name


@pytest.mark.parametrize("impl", IMPLS)
def test_same_class_features_for_every_image_equal_the_shared_call(impl):
    batch = 3
    head = random_head(32, 8, 0.5, block_elements=64, attention_impl=impl)
    image, text = normalized(batch, 32).requires_grad_(), normalized(17, 32).requires_grad_()
    weights = torch.randn(batch, 17, dtype=torch.float64)

    def per_image(head, image, text, scale):
        return head(image, text.expand(batch, -1, -1), scale)

    shared = values_and_grads(RAdaHead.forward, head, image, text, 30.0, weights)
    repeated = values_and_grads(per_image, head, image, text, 30.0, weights)
    assert relative_error(repeated[0], shared[0]) < 1e-12
    assert relative_error(repeated[1], shared[1]) < 1e-12
    for name, grad in shared[2].items():
        assert relative_error(repeated[2][name], grad) < 1e-12, name


@pytest.mark.parametrize("impl", IMPLS)
def test_per_image_gradcheck_small_case(impl):
    head = random_head(8, 2, 0.7, block_elements=6, attention_impl=impl)
    image, text = normalized(2, 8).requires_grad_(), normalized(2, 5, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, t: head(f, t, 10.0), (image, text))


def test_initial_head_on_per_image_features_reproduces_clip_logits_exactly():
    torch.manual_seed(1)
    head = RAdaHead(64, num_heads=8)
    image, text = normalized(6, 64, dtype=torch.float32), normalized(6, 11, 64, dtype=torch.float32)
    scale = torch.tensor(4.6052).exp()
    logits, mask = head(image, text, scale)
    assert torch.equal(logits, clip_logits(scale, image, text))
    assert torch.equal(mask, torch.ones_like(mask))
    for b in range(6):  # CLIP's expression, image by image
        assert torch.allclose(logits[b], (scale * image[b : b + 1] @ text[b].t())[0], rtol=1e-6, atol=1e-5)


def test_per_image_features_for_another_batch_are_refused():
    head = RAdaHead(16, num_heads=4)
    image = normalized(3, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="per-image text features for 2 images"):
        head(image, normalized(2, 5, 16, dtype=torch.float32), 10.0)
    with pytest.raises(ValueError, match=r"\(K, D\) or \(B, K, D\)"):
        head(image, normalized(3, 1, 5, 16, dtype=torch.float32), 10.0)
    with pytest.raises(ValueError, match="width 16"):
        head(image, normalized(3, 5, 8, dtype=torch.float32), 10.0)
    with pytest.raises(ValueError, match="one set of class features per image"):
        clip_logits(10.0, image, normalized(2, 5, 16, dtype=torch.float32))


# ---- the classifier ----------------------------------------------------------------------------


class ImageShiftedPrompts(nn.Module):
    """A conditional prompt source: the fixed prompts' features plus a learned map of each image's
    feature, the same shift for all classes of that image."""

    conditional = True

    def __init__(self, classnames, width):
        super().__init__()
        self.fixed = FixedPrompts(classnames, TEMPLATE)
        torch.manual_seed(2)
        self.shift = nn.Linear(width, width)
        self.calls = 0

    def class_features(self, text_encoder, image_feature):
        """One image's (K, E) features: what the per-image reference loop feeds the (K, E) path."""
        return self.fixed(text_encoder) + self.shift(image_feature)

    def forward(self, text_encoder, image_features):
        self.calls += 1
        return self.fixed(text_encoder).unsqueeze(0) + self.shift(image_features).unsqueeze(1)


def trained_head():
    return random_head(TINY_EMBED_DIM, 8, 1.0, dtype=torch.float32)


def trained_adapter():
    torch.manual_seed(3)
    adapter = FeatureAdapter(TINY_EMBED_DIM)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0, 0.3)
    return adapter


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_conditional_prompts_equal_a_loop_over_images(clip_model, images, with_head, with_adapter):
    prompts = ImageShiftedPrompts(CLASSES, TINY_EMBED_DIM)
    head = trained_head() if with_head else None
    model = CLIPClassifier(clip_model, prompts, head=head, adapter=trained_adapter() if with_adapter else None)
    with torch.no_grad():
        output = model(images)
        image_features = model.encode_image(images)
        expected = []
        for b in range(len(images)):
            image_b, text_b = image_features[b : b + 1], prompts.class_features(model.text_encoder, image_features[b])
            if model.adapter is not None:
                image_b, text_b = model.adapter(image_b, text_b)
            expected.append(model.classify(image_b, text_b))
    batch = len(images)
    assert output.logits.shape == (batch, len(CLASSES))
    assert output.text_features.shape == (batch, len(CLASSES), TINY_EMBED_DIM)
    assert output.image_features.shape == (batch, TINY_EMBED_DIM)
    assert torch.allclose(output.text_features.norm(dim=-1), torch.ones(batch, len(CLASSES)))
    assert torch.allclose(output.logits, torch.cat([e.logits for e in expected]), rtol=1e-5, atol=1e-4)
    if with_head:
        mask = torch.cat([e.mask for e in expected])
        assert (mask - 1).abs().max() > 0.01  # a trained head: the mask departs from 1
        assert torch.allclose(output.mask, mask, rtol=1e-5, atol=1e-5)
    else:
        assert output.mask is None


def test_conditional_prompts_are_never_cached(clip_model, images):
    prompts = ImageShiftedPrompts(CLASSES, TINY_EMBED_DIM)
    model = CLIPClassifier(clip_model, prompts)
    with torch.no_grad():
        first = model(images).logits
        second = model(images.flip(0)).logits
        assert prompts.calls == 2 and model._text_cache is None
        assert torch.allclose(second, first.flip(0), atol=1e-5)
        with pytest.raises(ValueError, match="pass image_features"):
            model.text_features()
    model(images).logits.sum().backward()
    assert prompts.shift.weight.grad.abs().sum() > 0


def test_output_unpacks_as_logits_and_mask_and_holds_the_features(clip_model, images):
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE))
    with torch.no_grad():
        output = model(images)
        with_head = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=trained_head())(images)
    assert isinstance(output, ClassifierOutput)
    logits, mask = output
    assert logits is output.logits and mask is None
    scale = clip_model.logit_scale.exp()
    assert torch.equal(logits, scale * output.image_features @ output.text_features.t())
    assert output.text_features.shape == (len(CLASSES), TINY_EMBED_DIM)
    logits, mask = with_head
    assert mask is with_head.mask and mask.shape == (len(images), len(CLASSES), TINY_EMBED_DIM)
    assert torch.allclose(with_head.image_features.norm(dim=-1), torch.ones(len(images)))


# ---- explicit prompt contexts ------------------------------------------------------------------


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("position", CoOpPromptLearner.POSITIONS)
def test_prompts_from_a_given_context(clip_model, position, class_specific):
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=4, class_specific=class_specific, position=position)
    learned = learner.prompt_embeddings()
    assert torch.equal(learner.prompt_embeddings(learner.ctx), learned)
    other = (torch.randn_like(learner.ctx) + 5.0).requires_grad_()
    prompts = learner.prompt_embeddings(other)
    replaced = copy.deepcopy(learner)
    with torch.no_grad():
        replaced.ctx.copy_(other)
    assert torch.equal(prompts, replaced.prompt_embeddings())
    changed = (prompts != learned).any(dim=-1)  # (K, L): the rows that differ are the context's
    assert changed.sum(dim=1).tolist() == [4] * len(CLASSES)
    prompts.sum().backward()
    assert other.grad is not None and learner.ctx.grad is None


def test_a_per_class_context_fills_a_shared_context_learner(clip_model):
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=4)
    ctx = torch.randn(len(CLASSES), 4, learner.ctx.shape[-1])
    prompts = learner.prompt_embeddings(ctx)
    assert torch.equal(prompts[:, 1:5], ctx)
    assert torch.equal(prompts[:, :1], learner.token_prefix) and torch.equal(prompts[:, 5:], learner.token_suffix)
    with pytest.raises(ValueError, match="got \\(3, 4"):
        learner.prompt_embeddings(ctx[:3])
    with pytest.raises(ValueError, match="got \\(5,"):
        learner.prompt_embeddings(torch.randn(5, learner.ctx.shape[-1]))


# ---- deep-prompt hooks -------------------------------------------------------------------------


class Recorder(nn.Module):
    """Returns its input and keeps a copy of it."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x):
        self.seen = x.clone()
        return x


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("start", [1, -2])
def test_replace_tokens_overwrites_exactly_the_given_positions(batch_first, start):
    x = torch.randn(2, 7, 4) if batch_first else torch.randn(7, 2, 4)
    tokens = torch.randn(2, 4, dtype=torch.float64)
    expected = x.clone()
    rows = slice(start, start + 2) if start >= 0 else slice(start, None)
    if batch_first:
        expected[:, rows] = tokens.float()
    else:
        expected[rows] = tokens.float().unsqueeze(1)
    result = replace_tokens(x, tokens, start, batch_first)
    assert result.dtype == x.dtype and torch.equal(result, expected)


def test_deep_prompts_reach_the_blocks_after_the_first_and_leave_no_hooks():
    blocks = [Recorder() for _ in range(4)]
    prompts = [torch.full((1, 3), float(i + 1)) for i in range(2)]
    x = torch.zeros(5, 2, 3)
    with deep_prompts(blocks, prompts, start=1):
        for block in blocks:
            block(x)
    assert torch.equal(blocks[0].seen, x) and torch.equal(blocks[3].seen, x)
    for i in (1, 2):
        assert torch.equal(blocks[i].seen, replace_tokens(x, prompts[i - 1], 1))
    assert all(not block._forward_pre_hooks for block in blocks)
    with pytest.raises(ValueError, match="4 deep prompts for a transformer of 4 blocks"):
        with deep_prompts(blocks, prompts * 2, start=1):
            pass


def test_appended_tokens_are_removed_even_when_the_call_fails():
    stem = Recorder()
    tokens = torch.randn(2, 3)
    x = torch.randn(4, 5, 3)
    with appended_tokens(stem, tokens):
        stem(x)
    assert torch.equal(stem.seen, torch.cat([x, tokens.expand(4, -1, -1)], dim=1))
    with pytest.raises(RuntimeError), appended_tokens(stem, tokens):
        stem(torch.randn(4, 5, 2))  # a width mismatch fails inside the hook
    assert not stem._forward_pre_hooks
    assert torch.equal(stem(x), x)


def test_conditional_head_logits_use_the_normalised_features(clip_model, images):
    """With the head, the output's features are those the head received (float32, normalised)."""
    model = CLIPClassifier(clip_model, ImageShiftedPrompts(CLASSES, TINY_EMBED_DIM), head=trained_head())
    with torch.no_grad():
        output = model(images)
        logits, mask = model.head(output.image_features, output.text_features, model.logit_scale.exp().float())
    assert torch.equal(output.logits, logits) and torch.equal(output.mask, mask)
    assert torch.allclose(output.image_features, F.normalize(model.encode_image(images).float(), dim=-1))
