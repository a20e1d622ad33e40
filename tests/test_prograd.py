"""ProGrad and RAdaProGrad: the projection rule, the distillation loss, ProGrad's context
initialisation, the trainers' step (the projected gradient in the context's .grad, the head's plain
one, the optimiser stepping with them; with two processes as with one), the twin with the identity
head, the shipped recipes, and the trainers end to end through train.py, one of them resumed after
a kill."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from clip import clip as clip_api
from torch.nn import functional as F

from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO
from trainers.errors import UserFacingError
from trainers.model.backbones import as_backbone
from trainers.model.compositions import COMPOSITIONS, build_classifier
from trainers.model.guided_prompts import (
    distillation_loss,
    hand_written_features,
    prograd_prompt_learner,
    prograd_template,
    project_conflicting,
    zero_shot_logits,
)
from trainers.model.rada_head import rada_loss

CLASSES = ["golden_retriever", "cat", "air plane"]
LAMBDA = 0.5  # not ProGrad's 1.0, so that a lost factor shows


def reference_projection(g_ce, g_kl, lam):
    """ProGrad's rule as written: g_ce where g_ce . g_kl >= 0, else g_ce - lam (g_ce . g_kl / ||g_kl||^2) g_kl."""
    dot = float((g_ce * g_kl).sum())
    if dot >= 0:
        return g_ce
    return g_ce - lam * dot / float((g_kl * g_kl).sum()) * g_kl


# ---- the pure pieces ------------------------------------------------------------------------------
def test_conflicting_gradients_are_projected_by_the_formula():
    g_ce = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    g_kl = torch.tensor([[-2.0, 0.0], [1.0, 1.0]])  # g_ce . g_kl = -2 - 0.5 = -2.5, ||g_kl||^2 = 6
    expected = g_ce - 0.5 * (-2.5 / 6) * g_kl
    assert torch.allclose(project_conflicting(g_ce, g_kl, 0.5), expected, atol=1e-7)
    assert torch.allclose(project_conflicting(g_ce, g_kl, 0.5), reference_projection(g_ce, g_kl, 0.5))
    # lambda 1 removes the whole component along g_kl; lambda 0 leaves g_ce.
    assert float((project_conflicting(g_ce, g_kl, 1.0) * g_kl).sum()) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(project_conflicting(g_ce, g_kl, 0.0), g_ce)


def test_agreeing_orthogonal_or_zero_guides_leave_the_gradient_as_it_is():
    g_ce = torch.tensor([1.0, 2.0, -1.0])
    assert torch.equal(project_conflicting(g_ce, torch.tensor([1.0, 0.5, 0.5]), 1.0), g_ce)  # dot 1.5 > 0
    assert torch.equal(project_conflicting(g_ce, torch.tensor([2.0, -1.0, 0.0]), 1.0), g_ce)  # dot 0
    assert torch.equal(project_conflicting(g_ce, torch.zeros(3), 1.0), g_ce)  # no 0 / 0


@pytest.mark.parametrize("overflow", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_guide_makes_the_result_non_finite(overflow):
    """So that a GradScaler sees it and skips the step (PREC amp)."""
    projected = project_conflicting(torch.tensor([1.0, 2.0]), torch.tensor([overflow, 1.0]), 1.0)
    assert not torch.isfinite(projected).all()


def test_distillation_loss_is_the_formula_and_has_kls_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=generator, requires_grad=True)
    teacher = 3 * torch.randn(4, 5, generator=generator)
    temperature = 2.0
    loss = distillation_loss(logits, teacher, temperature)
    p = F.softmax(teacher / temperature, dim=-1)
    expected = -(p * F.log_softmax(logits / temperature, dim=-1)).sum(dim=-1).mean() * temperature**2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=-1), p, reduction="batchmean") * temperature**2
    (kl_grad,) = torch.autograd.grad(kl, logits)
    assert torch.allclose(grad, kl_grad, atol=1e-6)


def default_cfg(dataset="OxfordPets", n_ctx=16, from_template=True):
    from trainers.config import defaults

    cfg = defaults()
    cfg.DATASET.NAME = dataset
    cfg.TRAINER.COOP.N_CTX = n_ctx
    cfg.TRAINER.PROGRAD.INIT_FROM_TEMPLATE = from_template
    return cfg


def test_templates_are_prograds():
    assert prograd_template("OxfordPets") == "a type of pet, a photo of a {}."
    assert prograd_template("DescribableTextures") == "a texture of {}."
    assert prograd_template("Food101") == "a type of food, a photo of {}."
    assert prograd_template("ImageNetA") == prograd_template("synthetic_shapes") == "a photo of a {}."


def test_context_from_a_template_with_a_comma_keeps_its_last_token_fixed(clip_model):
    learner = prograd_prompt_learner(default_cfg("OxfordPets"), as_backbone(clip_model), CLASSES)
    words = "a type of pet, a photo of a"  # 8 words, 9 tokens ("pet" ",")
    word_tokens = clip_model.token_embedding(clip_api.tokenize(words))[0, 1:9]
    assert learner.ctx.shape == (16, clip_model.token_embedding.weight.shape[1])
    assert torch.equal(learner.ctx[:8], torch.zeros(8, learner.ctx.shape[1]))
    assert torch.equal(learner.ctx[8:], word_tokens)
    written = clip_api.tokenize([f"{' '.join(['X'] * 8)} {words} {name.replace('_', ' ')}." for name in CLASSES])
    assert torch.equal(learner.tokenized_prompts, written)
    with torch.no_grad():
        prompts = learner.prompt_embeddings()
        embedded = clip_model.token_embedding(written)
    assert torch.equal(prompts[:, 1:17], learner.ctx.detach().expand(3, -1, -1))
    assert torch.equal(prompts[:, 17:], embedded[:, 17:])  # "a <class>." stays written
    assert torch.equal(prompts[:, 17], clip_model.token_embedding(clip_api.tokenize("a"))[0, 1].expand(3, -1))


def test_context_from_a_plain_template_and_without_it(clip_model):
    backbone = as_backbone(clip_model)
    learner = prograd_prompt_learner(default_cfg("Caltech101"), backbone, CLASSES)
    assert torch.equal(learner.ctx[:12], torch.zeros(12, learner.ctx.shape[1]))
    assert torch.equal(learner.ctx[12:], clip_model.token_embedding(clip_api.tokenize("a photo of a"))[0, 1:5])
    assert torch.equal(learner.token_suffix, clip_model.token_embedding(learner.tokenized_prompts)[:, 17:])
    torch.manual_seed(0)
    random = prograd_prompt_learner(default_cfg("Caltech101", from_template=False), backbone, CLASSES)
    assert random.ctx.shape[0] == 16 and 0.01 < random.ctx.std() < 0.03  # CoOp's N(0, 0.02)


def test_too_few_context_tokens_for_the_template_is_one_clear_error(clip_model):
    with pytest.raises(UserFacingError, match=r"N_CTX is 4, fewer than the 8 words of ProGrad's template"):
        prograd_prompt_learner(default_cfg("OxfordPets", n_ctx=4), as_backbone(clip_model), CLASSES)


def test_rada_twin_with_the_identity_head_is_prograd(clip_model, images):
    cfg = default_cfg("Caltech101")
    plain, _ = build_classifier(COMPOSITIONS["ProGrad"], cfg, as_backbone(clip_model), CLASSES)
    twin, trained = build_classifier(COMPOSITIONS["RAdaProGrad"], cfg, as_backbone(clip_model), CLASSES)
    assert list(trained) == ["prompt_learner", "rada_head"]
    with torch.no_grad():
        assert torch.allclose(twin(images).logits, plain(images).logits.float(), atol=1e-5)


def test_zero_shot_logits_are_clips_with_the_hand_written_prompt(clip_model, images):
    template = prograd_template("DescribableTextures")
    reference = hand_written_features(as_backbone(clip_model).text_encoder, CLASSES, template)
    with torch.no_grad():
        image_features = F.normalize(clip_model.encode_image(images), dim=-1)
        logits = zero_shot_logits(clip_model.logit_scale, image_features, reference)
        texts = [template.format(name.replace("_", " ")) for name in CLASSES]
        written = clip_model.encode_text(clip_api.tokenize(texts))
        expected = clip_model.logit_scale.exp() * image_features @ F.normalize(written, dim=-1).t()
    assert template == "a texture of {}." and torch.allclose(logits, expected, atol=1e-4)


# ---- the trainers' step ---------------------------------------------------------------------------
STEP_OPTIONS = ["TRAINER.PROGRAD.LAMBDA", str(LAMBDA), "TRAINER.RADA.ALPHA", "0.1", "OPTIM.WARMUP_EPOCH", "0",
                "OPTIM.LR", "0.5"]
BATCH = 8


def build_trainer(trainer_name, data_root, clip_path, output_dir):
    from dassl.engine import build_trainer as dassl_build_trainer
    from dassl.utils import set_random_seed

    import datasets.dassl_glue  # noqa: F401
    import trainers.register  # noqa: F401
    from train import parse_args, setup_cfg

    args = parse_args([
        "--root", data_root, "--seed", "1", "--trainer", trainer_name, "--output-dir", output_dir,
        "--dataset-config-file", os.path.join(REPO, "configs", "datasets", "synthetic_shapes.yaml"),
        "--config-file", os.path.join(REPO, "configs", "trainers", trainer_name, "vit_b16_ep100.yaml"),
        *FAST_OPTIONS, "MODEL.BACKBONE.NAME", str(clip_path), "DATASET.SUBSAMPLE_CLASSES", "base", *STEP_OPTIONS,
    ])
    cfg = setup_cfg(args)
    set_random_seed(cfg.SEED)
    trainer = dassl_build_trainer(cfg)
    trainer.set_model_mode("train")
    trainer.epoch, trainer.batch_idx, trainer.num_batches = 0, 0, 2
    return trainer


def fixed_images():
    return torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def labels_against_zero_shot(trainer, images, agreeing):
    """Each image's most likely class for zero-shot CLIP (agreeing) or its least likely one."""
    with torch.no_grad():
        output = trainer.model(images)
        teacher = zero_shot_logits(trainer.model.logit_scale, output.image_features, trainer.reference_features)
    return teacher.argmax(dim=-1) if agreeing else teacher.argmin(dim=-1)


def trained_parameters(trainer):
    return {f"{module_name}.{name}": parameter for module_name, module in trainer._models.items()
            for name, parameter in module.named_parameters() if parameter.requires_grad}


@requires_dassl
@pytest.mark.parametrize("trainer_name", ["ProGrad", "RAdaProGrad"])
@pytest.mark.parametrize("agreeing", [False, True], ids=["conflicting", "agreeing"])
def test_a_step_writes_the_projected_gradient_and_the_optimiser_steps_with_it(
    trainer_name, agreeing, synthetic_data_root, tiny_clip_path, tmp_path
):
    trainer = build_trainer(trainer_name, synthetic_data_root, tiny_clip_path, str(tmp_path))
    model, images = trainer.model, fixed_images()
    labels = labels_against_zero_shot(trainer, images, agreeing)
    params = trained_parameters(trainer)

    # The two gradients, computed here on their own.
    output = model(images)
    teacher = zero_shot_logits(model.logit_scale, output.image_features, trainer.reference_features)
    ce_loss = rada_loss(output.logits, output.mask, labels, alpha=0.1)
    kl_loss = distillation_loss(output.logits, teacher, temperature=1.0)
    g_ce = dict(zip(params, torch.autograd.grad(ce_loss, list(params.values()), retain_graph=True), strict=True))
    (g_kl,) = torch.autograd.grad(kl_loss, model.prompts.ctx)
    ctx_grad = g_ce["prompt_learner.ctx"]
    assert (float((ctx_grad * g_kl).sum()) >= 0) == agreeing  # the labels give the case this test is about

    expected = dict(g_ce, **{"prompt_learner.ctx": reference_projection(ctx_grad, g_kl, LAMBDA)})
    before = {name: param.detach().clone() for name, param in params.items()}
    lrs = {name: trainer._optims[name].param_groups[0]["lr"] for name in trainer._models}
    summary = trainer.forward_backward({"img": images, "label": labels})

    assert summary["conflicts"] == (0.0 if agreeing else 1.0) and summary["kl"] == pytest.approx(kl_loss.item())
    weight_decay = trainer.cfg.OPTIM.WEIGHT_DECAY
    for name, param in params.items():
        scale = expected[name].abs().max()
        assert torch.allclose(param.grad, expected[name], rtol=0, atol=1e-5 * scale), name
        # SGD's first step (momentum buffer = gradient + weight decay) with that gradient.
        step = lrs[name.split(".")[0]] * (expected[name] + weight_decay * before[name])
        assert torch.allclose(param.detach(), before[name] - step, rtol=0, atol=1e-5 * step.abs().max()), name
    if trainer_name == "RAdaProGrad":  # the head's gradient is its plain one, and not zero
        assert any(g_ce[name].abs().max() > 0 for name in params if name.startswith("rada_head."))


# ---- two processes --------------------------------------------------------------------------------
WORLD = 2


def one_step(trainer, rank=0, world=1):
    images = fixed_images()
    labels = labels_against_zero_shot(trainer, images, agreeing=False)  # so that the projection acts
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    trainer.wrap_data_parallel()
    params = trained_parameters(trainer)
    before = {name: param.detach().clone() for name, param in params.items()}
    summary = trainer.forward_backward({"img": images[share], "label": labels[share]})
    return {"conflicts": summary["conflicts"],
            "grads": {name: param.grad.detach().clone() for name, param in params.items()},
            "steps": {name: param.detach() - before[name] for name, param in params.items()}}


def _worker(rank, port, data_root, clip_path, workdir):
    from trainers.runs import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RADA_DIST_TIMEOUT_S="120")
    torch.set_num_threads(1)
    distributed.join_process_group(use_cuda=False)
    trainer = build_trainer("RAdaProGrad", data_root, clip_path, os.path.join(workdir, f"rank{rank}"))
    torch.save(one_step(trainer, rank, WORLD), os.path.join(workdir, f"rank{rank}.pt"))


@pytest.mark.e2e
@requires_dassl
def test_two_processes_project_the_gradients_of_the_global_batch(synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.test_distributed import assert_same_tensors, free_port

    single = one_step(build_trainer("RAdaProGrad", synthetic_data_root, tiny_clip_path, str(tmp_path / "single")))
    mp.spawn(_worker, args=(free_port(), synthetic_data_root, str(tiny_clip_path), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["conflicts"] == single["conflicts"] == 1.0
        assert_same_tensors(result["grads"], single["grads"])
        assert_same_tensors(result["steps"], single["steps"])


# ---- configs and bad input ------------------------------------------------------------------------
@requires_dassl
@pytest.mark.parametrize("trainer", ["ProGrad", "RAdaProGrad"])
@pytest.mark.parametrize("config,epochs,backbone", [
    ("rn50_ep50", 50, "RN50"), ("rn50_ep100", 100, "RN50"), ("rn50", 200, "RN50"), ("vit_b16_ep100", 100, "ViT-B/16"),
])
def test_shipped_configs_are_prograds_recipes(trainer, config, epochs, backbone):
    from tests.test_config import dassl_cfg

    cfg = dassl_cfg(f"configs/trainers/{trainer}/{config}.yaml")
    prograd, coop, optim = cfg.TRAINER.PROGRAD, cfg.TRAINER.COOP, cfg.OPTIM
    assert (prograd.LAMBDA, prograd.T, prograd.INIT_FROM_TEMPLATE) == (1.0, 1.0, True)
    assert (coop.N_CTX, coop.CTX_INIT, coop.CSC, coop.CLASS_TOKEN_POSITION) == (16, "", False, "end")
    assert (optim.NAME, optim.LR, optim.MAX_EPOCH, optim.LR_SCHEDULER, optim.WARMUP_EPOCH) == ("sgd", 0.002, epochs,
                                                                                                "cosine", 1)
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and cfg.MODEL.BACKBONE.NAME == backbone


@pytest.mark.parametrize("key,value,message", [
    ("TRAINER.PROGRAD.LAMBDA", 1.5, "TRAINER.PROGRAD.LAMBDA is 1.5; it must be a number in [0, 1]"),
    ("TRAINER.PROGRAD.T", 0.0, "TRAINER.PROGRAD.T is 0.0; it must be a number > 0"),
])
def test_bad_values_are_refused(key, value, message):
    from trainers.config import check_values

    cfg = default_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(UserFacingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_values(cfg)


@requires_dassl
def test_context_words_and_the_template_initialisation_together_are_refused():
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401
    from tests.test_config import dassl_cfg

    cfg = dassl_cfg("configs/trainers/ProGrad/vit_b16_ep100.yaml",
                    opts=("TRAINER.NAME", "ProGrad", "TRAINER.COOP.CTX_INIT", "a photo of a"))
    trainer = TRAINER_REGISTRY.get("ProGrad")
    with pytest.raises(UserFacingError, match="set one of the two only"):
        trainer.__new__(trainer).check_cfg(cfg)  # Dassl calls it first thing in the constructor


# ---- end to end -----------------------------------------------------------------------------------
@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,modules", [("ProGrad", ["prompt_learner"]),
                                             ("RAdaProGrad", ["prompt_learner", "rada_head"])])
def test_train_one_epoch_then_evaluate_new_classes(trainer, modules, synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, "vit_b16_ep100", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train()
    assert trained.returncode == 0 and "Traceback" not in trained.output, trained.output[-3000:]
    assert "epoch [1/1]" in trained.log and " kl " in trained.log and " conflicts " in trained.log
    assert trained.accuracy is not None
    context = torch.load(os.path.join(run.train_dir, "prompt_learner", "model.pth.tar-1"), weights_only=True)
    assert list(context["state_dict"]) == ["ctx"] and context["state_dict"]["ctx"].shape[0] == 16

    evaluated = run.evaluate()
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.output, evaluated.output[-3000:]
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None


@pytest.mark.e2e
@requires_dassl
def test_killed_mid_epoch_then_resumed_gives_the_uninterrupted_weights(synthetic_data_root, tiny_clip_path, tmp_path):
    from tests.test_resume import MODULES, SCHEDULE, assert_clean, final_weights, start_and_kill
    from tests.train_harness import TrainRun

    run = TrainRun("RAdaProGrad", "vit_b16_ep100", synthetic_data_root, tiny_clip_path, tmp_path)
    uninterrupted = run.train(*SCHEDULE)
    assert_clean(uninterrupted)
    killed_dir = str(tmp_path / "killed")
    start_and_kill(run, killed_dir)
    resumed = run.run(run.command(killed_dir, options=("DATASET.SUBSAMPLE_CLASSES", "base", *SCHEDULE)), killed_dir)
    assert_clean(resumed)
    assert "Resumed the checkpoint set of epoch 1" in resumed.output
    expected, actual = final_weights(run.train_dir), final_weights(killed_dir)
    for name in MODULES:
        for key, tensor in expected[name].items():
            assert torch.equal(tensor, actual[name][key]), f"{name}.{key} differs from the uninterrupted run"
    assert resumed.accuracy == uninterrupted.accuracy
