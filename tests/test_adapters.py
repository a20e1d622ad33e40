import os
import re

import pytest
import torch
from clip.model import convert_weights
from torch.nn import functional as F

from tests.conftest import requires_cpu_half, requires_dassl
from trainers.model.adapters import Bottleneck, FeatureAdapter
from trainers.model.backbones.openai_loader import load_clip
from trainers.model.classifier import CLIPClassifier
from trainers.model.prompts import FixedPrompts, zero_shot_template
from trainers.model.rada_head import RAdaHead
from trainers.model.tiny_clip import TINY_EMBED_DIM
from trainers.runs.checkpoint import load_weights

CLASSES = ["golden_retriever", "cat", "air plane", "sea_lion_pup"]
TEMPLATE = "a photo of a {}."


def randomised(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
    return module


def adapted_by_hand(bottleneck, x):
    down, up = bottleneck.fc[0].weight, bottleneck.fc[2].weight
    return torch.relu(torch.relu(x @ down.t()) @ up.t())


def test_bottleneck_is_clip_adapters_mlp():
    adapter = Bottleneck(32, reduction=4)
    assert [tuple(p.shape) for p in adapter.parameters()] == [(8, 32), (32, 8)]  # no biases
    x = torch.randn(5, 32)
    assert torch.equal(adapter(x), adapted_by_hand(adapter, x))
    with pytest.raises(ValueError, match="reduction 64"):
        Bottleneck(32, reduction=64)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_features_blend_with_the_residual_ratio(ratio):
    adapter = randomised(FeatureAdapter(32, ratio=ratio))
    image, text = torch.randn(3, 32), torch.randn(4, 32)
    adapted_image, adapted_text = adapter(image, text)
    expected_image = (1 - ratio) * image + ratio * adapted_by_hand(adapter.adapter_image, image)
    expected_text = (1 - ratio) * text + ratio * adapted_by_hand(adapter.adapter_text, text)
    assert torch.allclose(adapted_image, expected_image, atol=1e-6)
    assert torch.allclose(adapted_text, expected_text, atol=1e-6)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            FeatureAdapter(32, ratio=bad)


def test_image_only_adapter_and_half_precision_features():
    adapter = randomised(FeatureAdapter(32, adapt_text=False))
    assert adapter.adapter_text is None
    image, text = torch.randn(3, 32).half(), torch.randn(4, 32).half()
    adapted_image, adapted_text = adapter(image, text)
    assert adapted_image.dtype == adapted_text.dtype == torch.float32
    assert torch.equal(adapted_text, text.float())
    assert not torch.allclose(adapted_image, image.float(), atol=1e-3)


@pytest.mark.parametrize("half", [False, pytest.param(True, marks=requires_cpu_half)])
def test_zeroed_adapters_with_the_head_equal_the_rada_classifier_exactly(tiny_clip_path, images, half):
    clip_model = load_clip(str(tiny_clip_path))
    if not half:
        clip_model.float()
    else:
        convert_weights(clip_model)
    prompts = FixedPrompts(CLASSES, TEMPLATE)
    head = randomised(RAdaHead(TINY_EMBED_DIM, num_heads=8))  # a trained head: the mask matters
    rada = CLIPClassifier(clip_model, prompts, head=head)
    # RAdaAdapter's adapters (ratio 0.5, image and text) with zeroed output layers.
    adapter = randomised(FeatureAdapter(TINY_EMBED_DIM, ratio=0.5))
    adapted = CLIPClassifier(clip_model, prompts, head=head, adapter=adapter)
    with torch.no_grad():
        for bottleneck in (adapter.adapter_image, adapter.adapter_text):
            bottleneck.fc[2].weight.zero_()
        expected, got = rada(images), adapted(images)
    assert (expected.mask - 1).abs().max() > 0.01
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.mask, expected.mask)


def test_ratio_one_half_is_the_rada_authors_f_plus_a_of_f(clip_model, images):
    prompts = FixedPrompts(CLASSES, TEMPLATE)
    head = randomised(RAdaHead(TINY_EMBED_DIM, num_heads=8))
    adapter = randomised(FeatureAdapter(TINY_EMBED_DIM, ratio=0.5), seed=1)
    model = CLIPClassifier(clip_model, prompts, head=head, adapter=adapter)
    with torch.no_grad():
        image, text = model.encode(images)
        image = image + adapter.adapter_image(image)
        text = text + adapter.adapter_text(text)
        expected = model.classify(image, text).logits
        assert torch.equal(model(images).logits, expected)
        assert not torch.allclose(expected, CLIPClassifier(clip_model, prompts, head=head)(images).logits, atol=1e-3)


@pytest.mark.parametrize("adapt_text", [False, True])
def test_clip_adapter_with_zeroed_adapters_is_zero_shot_clip(clip_model, images, adapt_text):
    prompts = FixedPrompts(CLASSES, zero_shot_template("OxfordPets"))
    adapter = randomised(FeatureAdapter(TINY_EMBED_DIM, ratio=0.2, adapt_text=adapt_text))
    model = CLIPClassifier(clip_model, prompts, adapter=adapter)
    zero_shot = CLIPClassifier(clip_model, prompts)
    with torch.no_grad():
        assert not torch.allclose(model(images).logits, zero_shot(images).logits, atol=1e-3)
        for bottleneck in filter(None, (adapter.adapter_image, adapter.adapter_text)):
            bottleneck.fc[2].weight.zero_()
        assert torch.allclose(model(images).logits, zero_shot(images).logits, atol=1e-5)


def test_gradients_reach_only_adapters_and_head(clip_model, images):
    adapter = FeatureAdapter(TINY_EMBED_DIM, ratio=0.5)  # as built: every layer must learn from the start
    head = RAdaHead(TINY_EMBED_DIM, num_heads=8)
    model = CLIPClassifier(clip_model, FixedPrompts(CLASSES, TEMPLATE), head=head, adapter=adapter)
    model.requires_grad_(False)
    adapter.requires_grad_(True)
    head.requires_grad_(True)
    logits, _ = model(images)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert head.out_proj.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in clip_model.parameters())


def test_checkpoints_hold_the_adapters_under_the_authors_names(tmp_path):
    adapter = FeatureAdapter(TINY_EMBED_DIM)
    assert list(adapter.state_dict()) == [
        "adapter_image.fc.0.weight", "adapter_image.fc.2.weight",
        "adapter_text.fc.0.weight", "adapter_text.fc.2.weight",
    ]
    # The RAda authors save their whole model: adapters and head side by side.
    trained = randomised(FeatureAdapter(TINY_EMBED_DIM))
    state = dict(trained.state_dict())
    state["mha.q_proj1.weight"] = torch.zeros(TINY_EMBED_DIM, TINY_EMBED_DIM)
    load_weights(adapter, state, "authors.pth")
    for key, value in trained.state_dict().items():
        assert torch.equal(adapter.state_dict()[key], value)


# ---- Dassl glue --------------------------------------------------------------------------------


def merged_cfg(path):
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg

    cfg = get_cfg_default()
    extend_cfg(cfg)
    cfg.merge_from_file(path)
    return cfg


@requires_dassl
def test_each_trainer_has_its_values_in_its_config():
    cfg = merged_cfg("configs/trainers/RAda/vit_b16_ep5.yaml")  # says nothing about adapters: the defaults
    assert (cfg.TRAINER.ADAPTER.RATIO, cfg.TRAINER.ADAPTER.TEXT) == (0.2, False)  # CLIP-Adapter's
    rada_adapter = merged_cfg("configs/trainers/RAdaAdapter/vit_b16_ep5.yaml")
    assert (rada_adapter.TRAINER.ADAPTER.RATIO, rada_adapter.TRAINER.ADAPTER.TEXT) == (0.5, True)
    cfg.merge_from_list(["TRAINER.ADAPTER.RATIO", "0.3", "TRAINER.ADAPTER.TEXT", "True"])
    assert (cfg.TRAINER.ADAPTER.RATIO, cfg.TRAINER.ADAPTER.TEXT) == (0.3, True)


@requires_dassl
@pytest.mark.parametrize("key,value,message", [
    ("TRAINER.ADAPTER.RATIO", "0.0", "RATIO is 0.0"),
    ("TRAINER.ADAPTER.RATIO", "1.5", "RATIO is 1.5"),
    ("TRAINER.ADAPTER.REDUCTION", "0", "REDUCTION is 0"),
])
def test_bad_adapter_settings_are_refused_before_anything_is_built(key, value, message):
    from dassl.engine import TRAINER_REGISTRY

    import trainers.register  # noqa: F401
    from trainers.errors import UserFacingError

    cfg = merged_cfg("configs/trainers/RAdaAdapter/vit_b16_ep5.yaml")
    cfg.merge_from_list([key, value])
    trainer = TRAINER_REGISTRY.get("RAdaAdapter")
    with pytest.raises(UserFacingError, match=message):
        trainer.__new__(trainer).check_cfg(cfg)  # Dassl calls it first thing in the constructor


@requires_dassl
@pytest.mark.parametrize("key,value,message", [
    ("TRAINER.ADAPTER.RATIO", "half", "TRAINER.ADAPTER.RATIO is half (a str); it must be a number in (0, 1]"),
    ("TRAINER.ADAPTER.TEXT", "yes", "TRAINER.ADAPTER.TEXT is yes (a str); it must be a bool"),
])
def test_values_of_another_type_are_refused_by_yacs_with_the_key(key, value, message):
    import train
    from trainers.errors import UserFacingError

    args = train.parse_args(["--config-file", "configs/trainers/RAdaAdapter/vit_b16_ep5.yaml", key, value])
    with pytest.raises(UserFacingError, match=re.escape(message)):
        train.setup_cfg(args)


@requires_dassl
@pytest.mark.parametrize("trainer,ratio,text", [("CLIPAdapter", 0.2, False), ("RAdaAdapter", 0.5, True)])
def test_shipped_configs(trainer, ratio, text):
    cfg = merged_cfg(f"configs/trainers/{trainer}/vit_b16_ep5.yaml")
    adapter = cfg.TRAINER.ADAPTER
    assert (adapter.RATIO, adapter.TEXT, adapter.REDUCTION) == (ratio, text, 4)
    assert (cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.MODEL.BACKBONE.NAME) == ("adam", 5e-5, 5, "ViT-B/16")



@pytest.mark.e2e
@requires_dassl
@pytest.mark.parametrize("trainer,modules,sides", [
    ("CLIPAdapter", ["adapter"], ["image"]),
    ("RAdaAdapter", ["adapter", "rada_head"], ["image", "text"]),
])
def test_train_one_epoch_then_evaluate_new_classes(
    trainer, modules, sides, synthetic_data_root, tiny_clip_path, tmp_path
):
    from tests.train_harness import TrainRun

    run = TrainRun(trainer, "vit_b16_ep5", synthetic_data_root, tiny_clip_path, tmp_path)
    trained = run.train()
    assert trained.returncode == 0 and "Traceback" not in trained.output, trained.output[-3000:]
    assert "epoch [1/1]" in trained.log and trained.accuracy is not None
    adapter = torch.load(os.path.join(run.train_dir, "adapter", "model.pth.tar-1"), weights_only=True)["state_dict"]
    assert set(adapter) == {f"adapter_{side}.fc.{i}.weight" for side in sides for i in (0, 2)}

    evaluated = run.evaluate()
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.output, evaluated.output[-3000:]
    for module in modules:
        assert f"Load {os.path.join(run.train_dir, module, 'model.pth.tar-1')} to {module}" in evaluated.log
    assert "subsample=new" in evaluated.log and evaluated.accuracy is not None
