"""CoCoOp and RAdaCoCoOp: the meta-net and the per-image prompts against a reference written out by
hand on the tiny CLIP, CoOp and CoCoOp's own results as limits, gradients through the head on
per-image class features, CoCoOp's checkpoint layout, and train.py end to end."""

import os

import pytest
import torch
from clip import clip as clip_api
from clip.model import convert_weights
from torch.nn import functional as F

from tests.conftest import requires_cpu_half, requires_dassl, train_only
from tests.test_rada_head import random_head
from tests.test_train_e2e import assert_clean, assert_evaluates_new_classes
from tests.train_harness import TrainRun
from trainers.model import ttt
from trainers.model.backbones import as_backbone
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.cocoop import CoCoOpPromptLearner, MetaNet
from trainers.model.compositions import build_classifier, composition_of
from trainers.model.prompts import CoOpPromptLearner, fill_template
from trainers.model.rada_head import RAdaHead
from trainers.model.tiny_clip import TINY_EMBED_DIM
from trainers.runs.checkpoint import load_weights

CLASSES = ["golden_retriever", "cat", "air plane"]
CTX_INIT = "a photo of a"
N_CTX = 4  # the words of CTX_INIT
TEXT_WIDTH = 64  # the tiny CLIP's token width


def cocoop(clip_model, classnames=CLASSES, seed=0):
    """CoCoOp's prompt learner with a trained-looking meta-net: every hidden unit alive, a bias of
    the order of the context's own values."""
    learner = CoCoOpPromptLearner(clip_model, classnames, ctx_init=CTX_INIT)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in learner.meta_net.parameters():
            param.normal_(0, 0.5)
    return learner


def encode_prompt_embeddings(clip_model, embeddings, tokens):
    """CLIP's text tower run on given token embeddings (N, L, W), as CLIP's encode_text runs it on
    the embeddings of `tokens`: positions, transformer, final norm, end-token row, projection."""
    x = embeddings + clip_model.positional_embedding
    x = clip_model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = clip_model.ln_final(x)
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip_model.text_projection


def reference_text_features(clip_model, learner, image_features):
    """Per image b and class k, the prompt "a photo of a <class>." with its four context tokens
    replaced by ctx + meta_net(f^_b), written out token by token: (B, K, E)."""
    meta = learner.meta_net
    normalised = image_features / image_features.norm(dim=-1, keepdim=True)
    hidden = torch.relu(normalised @ meta.linear1.weight.t() + meta.linear1.bias)
    bias = hidden @ meta.linear2.weight.t() + meta.linear2.bias
    tokens = clip_api.tokenize(fill_template(CTX_INIT + " {}.", CLASSES))
    per_image = []
    for image_bias in bias:
        embeddings = clip_model.token_embedding(tokens).clone()
        embeddings[:, 1 : 1 + N_CTX] = learner.ctx + image_bias
        per_image.append(encode_prompt_embeddings(clip_model, embeddings, tokens))
    return torch.stack(per_image)


def test_the_hand_written_text_tower_is_clips(clip_model):
    tokens = clip_api.tokenize(fill_template(CTX_INIT + " {}.", CLASSES))
    with torch.no_grad():
        ours = encode_prompt_embeddings(clip_model, clip_model.token_embedding(tokens), tokens)
        assert torch.allclose(ours, clip_model.encode_text(tokens), atol=1e-6)


def test_per_image_prompts_and_logits_equal_the_reference(clip_model, images):
    learner = cocoop(clip_model)
    model = CLIPClassifier(clip_model, learner)
    with torch.no_grad():
        image_features = clip_model.encode_image(images)
        expected = reference_text_features(clip_model, learner, image_features)
        text_features = model.text_features(image_features)
        assert text_features.shape == (len(images), len(CLASSES), TINY_EMBED_DIM)
        torch.testing.assert_close(text_features, expected, rtol=1e-5, atol=1e-5)
        # The images' prompts differ: the meta-net's bias is not negligible.
        assert (expected[0] - expected[1]).abs().max() > 1e-2
        output = model(images)
        f = F.normalize(image_features, dim=-1)
        t = F.normalize(expected, dim=-1)
        logits = clip_model.logit_scale.exp() * torch.einsum("be,bke->bk", f, t)
        torch.testing.assert_close(output.logits, logits, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(output.text_features, t, rtol=1e-5, atol=1e-5)


def test_context_is_coops_from_the_words_and_the_meta_net_is_cocoops(clip_model):
    learner = CoCoOpPromptLearner(clip_model, CLASSES, n_ctx=16, ctx_init=CTX_INIT)
    words = clip_model.token_embedding(clip_api.tokenize(CTX_INIT))[0, 1 : 1 + N_CTX]
    assert learner.n_ctx == N_CTX and torch.equal(learner.ctx, words)  # the words set the length
    assert learner.ctx.dtype == torch.float32
    assert list(learner.state_dict()) == [
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias",
    ]
    assert learner.meta_net.linear1.weight.shape == (TINY_EMBED_DIM // 16, TINY_EMBED_DIM)
    assert learner.meta_net.linear2.weight.shape == (TEXT_WIDTH, TINY_EMBED_DIM // 16)
    random = CoCoOpPromptLearner(clip_model, CLASSES, n_ctx=6, ctx_init="")
    assert random.ctx.shape == (6, TEXT_WIDTH) and 0.01 < random.ctx.std() < 0.03
    # ViT-B/16's sizes give CoCoOp's 35,360 trainable parameters (context 4 x 512 and the meta-net).
    assert N_CTX * 512 + sum(param.numel() for param in MetaNet(512, 512).parameters()) == 35360


def test_zero_meta_net_output_is_coop_with_the_same_context(clip_model, images):
    learner = cocoop(clip_model)
    with torch.no_grad():
        learner.ctx.add_(0.1 * torch.randn_like(learner.ctx))  # a trained context
        learner.meta_net.linear2.weight.zero_()
        learner.meta_net.linear2.bias.zero_()
    coop = CoOpPromptLearner(clip_model, CLASSES, ctx_init=CTX_INIT)
    with torch.no_grad():
        coop.ctx.copy_(learner.ctx)
        expected = CLIPClassifier(clip_model, coop)(images).logits
        logits = CLIPClassifier(clip_model, learner)(images).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def test_identity_head_gives_cocoops_logits(clip_model, images):
    learner = cocoop(clip_model)
    with torch.no_grad():
        expected = CLIPClassifier(clip_model, learner)(images).logits
        output = CLIPClassifier(clip_model, learner, head=RAdaHead(TINY_EMBED_DIM, num_heads=8))(images)
    assert torch.equal(output.mask, torch.ones_like(output.mask))
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-4)


def test_the_head_on_per_image_features_trains_the_meta_net_and_the_context(clip_model, images):
    learner = cocoop(clip_model)
    head = random_head(TINY_EMBED_DIM, 8, 1.0, dtype=torch.float32)
    model = train_only(CLIPClassifier(clip_model, learner, head=head), learner, head)
    output = model(images)
    assert output.text_features.shape == (len(images), len(CLASSES), TINY_EMBED_DIM)
    assert output.mask.shape == (len(images), len(CLASSES), TINY_EMBED_DIM)
    F.cross_entropy(output.logits, torch.tensor([0, 2, 1])).backward()
    for name, param in [*learner.named_parameters(), *head.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in clip_model.parameters())


def test_compositions_train_what_cocoop_trains(clip_model):
    from trainers.config import defaults

    cfg = defaults()
    cfg.TRAINER.COCOOP.CTX_INIT = CTX_INIT
    backbone = as_backbone(clip_model)
    model, trained = build_classifier(composition_of("CoCoOp"), cfg, backbone, CLASSES)
    assert isinstance(model.prompts, CoCoOpPromptLearner) and list(trained) == ["prompt_learner"]
    assert model.prompts.n_ctx == N_CTX and model.head is None
    model, trained = build_classifier(composition_of("RAdaCoCoOp"), cfg, backbone, CLASSES)
    assert list(trained) == ["prompt_learner", "rada_head"] and isinstance(model.head, RAdaHead)
    trainable = {name.split(".")[0] for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"prompts", "head"}
    assert composition_of("CoCoOp").precision(cfg) == cfg.TRAINER.COCOOP.PREC == "fp16"


def test_cocoops_checkpoint_layout_loads(clip_model, images):
    """CoCoOp saves its prompt learner in fp16 under PREC fp16, with the class-name buffers."""
    trained = cocoop(clip_model, classnames=CLASSES[:2], seed=5)
    state = {key: value.half() for key, value in trained.state_dict().items()}
    state["token_prefix"] = torch.zeros(2, 1, TEXT_WIDTH, dtype=torch.half)
    state["token_suffix"] = torch.zeros(2, 77 - 1 - N_CTX, TEXT_WIDTH, dtype=torch.half)
    new = CoCoOpPromptLearner(clip_model, CLASSES[2:], ctx_init=CTX_INIT)
    load_weights(new, state, "cocoop/prompt_learner/model.pth.tar-10")
    for key, value in new.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float()), key
    with torch.no_grad():
        assert CLIPClassifier(clip_model, new)(images).logits.shape == (len(images), 1)


@requires_cpu_half
def test_half_precision_clip_with_float32_prompts(tiny_clip_path, images):
    clip_model = load_clip(str(tiny_clip_path))
    convert_weights(clip_model)
    learner = cocoop(clip_model)
    model = CLIPClassifier(clip_model, learner)
    image_features = model.encode_image(images)
    assert image_features.dtype == torch.float16
    # The meta-net computes in the image features' precision, as CoCoOp's fp16 meta-net does.
    assert learner.meta_net(image_features).dtype == torch.float16
    logits = model(images).logits
    assert torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(param.dtype == torch.float32 for param in learner.parameters())
    assert learner.meta_net.linear1.weight.grad.abs().sum() > 0 and learner.ctx.grad.abs().sum() > 0


def test_test_time_training_refuses_image_conditioned_prompts(clip_model):
    model = CLIPClassifier(clip_model, cocoop(clip_model), head=RAdaHead(TINY_EMBED_DIM, num_heads=8))
    optimizer = torch.optim.AdamW(model.head.parameters())
    with pytest.raises(ValueError, match="image-conditioned prompts .*CoCoOpPromptLearner.* not supported"):
        ttt.TestTimeAdapter(model, [optimizer])


# ---- train.py end to end ---------------------------------------------------------------------------

CONFIG = "vit_b16_c4_ep10_batch1_ctxv1"


@requires_dassl
@pytest.mark.e2e
@pytest.mark.parametrize("trainer,modules", [("CoCoOp", ["prompt_learner"]),
                                             ("RAdaCoCoOp", ["prompt_learner", "rada_head"])])
def test_train_on_base_classes_then_evaluate_new_classes(trainer, modules, synthetic_data_root, tiny_clip_path,
                                                         tmp_path):
    run = TrainRun(trainer, CONFIG, synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train()
    assert_clean(trained)
    assert "epoch [1/1] batch [2/2]" in trained.log and "subsample=base" in trained.log
    assert "CoCoOp context: 4 tokens, initialised as 'a photo of a'" in trained.output
    assert trained.accuracy is not None
    for module in modules:
        checkpoint = torch.load(os.path.join(run.train_dir, module, "model.pth.tar-1"), weights_only=True)
        assert checkpoint["epoch"] == 1
        assert not any("token_prefix" in key for key in checkpoint["state_dict"])
    assert "meta_net.linear2.weight" in torch.load(
        os.path.join(run.train_dir, "prompt_learner", "model.pth.tar-1"), weights_only=True)["state_dict"]

    assert_evaluates_new_classes(run, modules)


@requires_dassl
@pytest.mark.e2e
def test_an_interrupted_run_resumes(synthetic_data_root, tiny_clip_path, tmp_path):
    run = TrainRun("RAdaCoCoOp", CONFIG, synthetic_data_root, tiny_clip_path, tmp_path)
    options = ("OPTIM.MAX_EPOCH", "2", "TRAIN.CHECKPOINT_FREQ", "1")
    assert_clean(run.train(*options))
    finished = {module: torch.load(os.path.join(run.train_dir, module, "model.pth.tar-2"), weights_only=True)
                for module in ("prompt_learner", "rada_head")}
    # Make the folder look like a run stopped during epoch 2: only epoch 1 was saved.
    os.remove(os.path.join(run.train_dir, "checkpoint_set.pth.tar-2"))
    for module in finished:
        os.remove(os.path.join(run.train_dir, module, "model.pth.tar-2"))
        with open(os.path.join(run.train_dir, module, "checkpoint"), "w") as pointer:
            pointer.write("model.pth.tar-1\n")
    resumed = run.train(*options)
    assert_clean(resumed)
    assert "will resume training" in resumed.output
    assert "epoch [1/2]" not in resumed.output and "epoch [2/2] batch [2/2]" in resumed.output
    for module, before in finished.items():
        after = torch.load(os.path.join(run.train_dir, module, "model.pth.tar-2"), weights_only=True)
        for key, value in before["state_dict"].items():
            assert torch.equal(after["state_dict"][key], value), (module, key)


@requires_dassl
@pytest.mark.e2e
def test_a_run_of_cocoops_own_code_evaluates(synthetic_data_root, tiny_clip_path, tmp_path):
    """CoCoOp's trainer saves its prompt learner with Dassl's save_checkpoint (fp16 under PREC
    fp16, class-name buffers included) in <run>/prompt_learner/."""
    from dassl.utils import save_checkpoint

    clip_model = load_clip(str(tiny_clip_path)).float()
    learner = cocoop(clip_model, classnames=["red circle", "blue square"], seed=7)
    state = {key: value.half() for key, value in learner.state_dict().items()}
    state["token_prefix"] = torch.zeros(2, 1, TEXT_WIDTH, dtype=torch.half)
    cocoop_dir = str(tmp_path / "cocoop_run")
    save_checkpoint({"state_dict": state, "epoch": 10, "optimizer": None, "scheduler": None},
                    save_dir=os.path.join(cocoop_dir, "prompt_learner"), model_name="model.pth.tar-10")
    run = TrainRun("CoCoOp", CONFIG, synthetic_data_root, tiny_clip_path, tmp_path, in_process=True)
    evaluated = run.evaluate(model_dir=cocoop_dir)
    assert_clean(evaluated)
    assert f"Load {os.path.join(cocoop_dir, 'prompt_learner', 'model.pth.tar-10')} to prompt_learner" in evaluated.log
    assert evaluated.accuracy is not None
