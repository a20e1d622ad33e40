import pytest
import torch
from clip import clip as clip_api
from torch.nn import functional as F

from tests.conftest import train_only
from trainers.model.classifier import CLIPClassifier
from trainers.model.prompts import CoOpPromptLearner, FixedPrompts, fill_template
from trainers.model.rada_head import RAdaHead
from trainers.model.tiny_clip import TINY_EMBED_DIM

CLASSES = ["golden_retriever", "cat", "air plane", "sea_lion_pup"]


def test_zero_shot_logits_are_clips_own(clip_model, images):
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, "a photo of a {}."))
    with torch.no_grad():
        logits, mask = model(images)
        image = clip_model.encode_image(images)
        text = clip_model.encode_text(clip_api.tokenize(fill_template("a photo of a {}.", CLASSES)))
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        expected = clip_model.logit_scale.exp() * image @ text.t()
    assert mask is None
    assert torch.equal(logits, expected)


def test_initial_head_leaves_the_logits_unchanged(clip_model, images):
    prompts = FixedPrompts(CLASSES, "a photo of a {}.")
    plain = CLIPClassifier(clip_model, prompts)
    with_head = CLIPClassifier(clip_model, prompts, head=RAdaHead(TINY_EMBED_DIM, num_heads=8))
    with torch.no_grad():
        assert torch.equal(with_head(images).logits, plain(images).logits)
        assert torch.equal(with_head(images).mask, torch.ones(3, len(CLASSES), TINY_EMBED_DIM))


def test_coop_context_initialised_from_words_equals_the_written_prompt(clip_model, images):
    learner = CoOpPromptLearner(clip_model, CLASSES, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    fixed = CLIPClassifier(clip_model, FixedPrompts(CLASSES, "a photo of a {}."))
    learned = CLIPClassifier(clip_model, learner)
    with torch.no_grad():
        assert torch.allclose(learned(images).logits, fixed(images).logits, atol=1e-5)
        expected = clip_model.token_embedding(clip_api.tokenize(fill_template("a photo of a {}.", CLASSES)))
        assert torch.equal(learner.prompt_embeddings(), expected)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_positions(clip_model, position):
    n_ctx = 4
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=n_ctx, class_specific=True, position=position)
    with torch.no_grad():
        learner.ctx.copy_(torch.arange(learner.ctx.numel(), dtype=torch.float32).reshape(learner.ctx.shape))
    prompts = learner.prompt_embeddings()
    embedding = clip_model.token_embedding
    for i, name in enumerate(CLASSES):
        name_ids = clip_api.tokenize(name.replace("_", " "))[0]
        name_len = int((name_ids > 0).sum()) - 2  # without SOS and EOS
        name_vectors = embedding(name_ids[1 : 1 + name_len])
        ctx = learner.ctx[i]
        if position == "end":
            layout = [(1, ctx), (1 + n_ctx, name_vectors)]
        elif position == "front":
            layout = [(1, name_vectors), (1 + name_len, ctx)]
        else:
            layout = [(1, ctx[:2]), (3, name_vectors), (3 + name_len, ctx[2:])]
        for start, block in layout:
            assert torch.equal(prompts[i, start : start + len(block)], block), (name, start)
        full = clip_api.tokenize(f"X X X X {name.replace('_', ' ')}.")[0]
        assert torch.equal(prompts[i, 0], embedding(full[:1])[0])  # SOS
        end = 1 + n_ctx + name_len
        assert torch.equal(prompts[i, end:], embedding(full[end:]))  # '.', EOS, padding


def test_checkpoints_hold_only_learned_tensors(clip_model):
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=4)
    assert list(learner.state_dict()) == ["ctx"]
    assert list(FixedPrompts(CLASSES, "a photo of a {}.").state_dict()) == []


def test_context_trained_on_some_classes_applies_to_others(clip_model, images):
    base = CoOpPromptLearner(clip_model, CLASSES[:2], n_ctx=4)
    new = CoOpPromptLearner(clip_model, CLASSES[2:], n_ctx=4)
    new.load_state_dict(base.state_dict())
    assert torch.equal(new.ctx, base.ctx)
    with torch.no_grad():
        assert CLIPClassifier(clip_model, new)(images).logits.shape == (3, 2)


def test_text_features_are_cached_only_while_prompts_are_unchanged(clip_model, images):
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=4)
    model = CLIPClassifier(clip_model, learner)
    calls = []
    learner.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = model(images).logits
        model(images)
        assert len(calls) == 1
        learner.ctx.add_(torch.randn_like(learner.ctx))  # what an optimiser step does
        changed = model(images).logits
    assert len(calls) == 2
    assert not torch.allclose(first, changed)
    model(images)  # with gradients on, always recomputed
    assert len(calls) == 3


def test_gradients_reach_only_prompts_and_head(clip_model, images):
    learner = CoOpPromptLearner(clip_model, CLASSES, n_ctx=4)
    head = RAdaHead(TINY_EMBED_DIM, num_heads=8)
    model = CLIPClassifier(clip_model, learner, head=head)
    train_only(model, learner, head)
    logits, mask = model(images)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert head.out_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip_model.parameters())
