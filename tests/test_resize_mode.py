"""Each backbone's test images are resized its own way (INPUT.RESIZE_MODE): a non-square image goes
through exactly what open_clip's (or the image processor's) own inference transform does, the
OpenAI CLIP path stays Dassl's resize and centre crop, and the user's value wins."""

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from yacs.config import CfgNode as CN

from tests import open_clip_models
from tests.conftest import requires_dassl
from tests.train_harness import FAST_OPTIONS, REPO
from trainers.config import check_values, defaults
from trainers.errors import UserFacingError
from trainers.model.backbones import Preprocess, follow_preprocess
from trainers.model.backbones.openai_clip import OPENAI_MEAN, OPENAI_STD
from trainers.model.image_resize import ResizeToInput, evaluation_resize

OPENAI = OPENAI_MEAN, OPENAI_STD
HALF = (0.5,) * 3, (0.5,) * 3
SIGLIP_NAME = "open_clip:ViT-B-16-SigLIP/webli"


def random_image(width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def open_clip_inference(size, mode, normalisation, interpolation="bicubic"):
    from open_clip.transform import image_transform

    mean, std = normalisation
    return image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode, interpolation=interpolation)


def normalised(image, normalisation):
    return TF.normalize(TF.to_tensor(image), *normalisation)


# ---- the resize itself -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["squash", "longest"])
@pytest.mark.parametrize("width, height", [(71, 40), (40, 71), (64, 33), (20, 20)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_to_input_is_open_clips_own_inference_resize(mode, width, height, interpolation):
    image = random_image(width, height)
    ours = normalised(ResizeToInput(mode, (32, 32), interpolation)(image), HALF)
    assert torch.equal(ours, open_clip_inference(32, mode, HALF, interpolation)(image))


def test_squash_is_a_plain_resize_to_the_square_and_longest_pads_with_black():
    image = random_image(71, 40)
    squashed = ResizeToInput("squash", (32, 32))(image)
    assert squashed.size == (32, 32)
    assert torch.equal(TF.pil_to_tensor(squashed),
                       TF.pil_to_tensor(TF.resize(image, [32, 32], InterpolationMode.BICUBIC)))
    padded = TF.pil_to_tensor(ResizeToInput("longest", (32, 32))(image))  # 71x40 -> 32x18, 7 rows above
    assert padded.shape == (3, 32, 32)
    assert padded[:, :7].eq(0).all() and padded[:, 25:].eq(0).all() and padded[:, 7:25].ne(0).any()


def test_shortest_is_left_to_dassl_and_unknown_modes_are_refused():
    assert evaluation_resize("shortest", (224, 224), "bicubic") is None
    assert evaluation_resize("squash", (224, 224), "bicubic").mode == "squash"
    with pytest.raises(ValueError, match="shortest, squash, longest"):
        evaluation_resize("crop", (224, 224), "bicubic")
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocess(224, (0.5,) * 3, (0.5,) * 3, resize_mode="crop")
    assert Preprocess(224, (0.5,) * 3, (0.5,) * 3).resize_mode == "shortest"


# ---- the setting -------------------------------------------------------------------------------

def input_cfg(resize_mode="auto", backbone="ViT-B/16", preprocess="auto"):
    """The INPUT of the shipped configs (OpenAI CLIP's preprocessing), for the backbone named."""
    cfg = CN()
    cfg.INPUT = CN({"SIZE": (224, 224), "PIXEL_MEAN": list(OPENAI_MEAN), "PIXEL_STD": list(OPENAI_STD),
                    "INTERPOLATION": "bicubic", "RESIZE_MODE": resize_mode, "PREPROCESS": preprocess})
    cfg.MODEL = CN({"BACKBONE": CN({"NAME": backbone})})
    return cfg


def test_the_setting_defaults_to_the_backbones_own_and_is_checked():
    assert defaults().INPUT.RESIZE_MODE == "auto"
    cfg = defaults()
    cfg.INPUT.RESIZE_MODE = "crop"
    with pytest.raises(UserFacingError, match="INPUT.RESIZE_MODE is 'crop'; it must be one of auto, shortest, squash"):
        check_values(cfg)


def test_auto_follows_the_backbone_and_a_users_mode_wins():
    siglip = Preprocess(224, (0.5,) * 3, (0.5,) * 3, resize_mode="squash")
    followed, changed = follow_preprocess(input_cfg(backbone=SIGLIP_NAME), siglip)
    assert followed.INPUT.RESIZE_MODE == "squash" and changed["RESIZE_MODE"] == "squash"
    for chosen in ("shortest", "longest"):
        followed, changed = follow_preprocess(input_cfg(chosen, backbone=SIGLIP_NAME), siglip)
        assert followed.INPUT.RESIZE_MODE == chosen and "RESIZE_MODE" not in changed
    # OpenAI CLIP: "auto" is Dassl's own resize and crop; nothing else changes.
    openai = Preprocess(224, *OPENAI, "bicubic")
    followed, changed = follow_preprocess(input_cfg(), openai)
    assert changed == {"RESIZE_MODE": "shortest"} and followed.INPUT.RESIZE_MODE == "shortest"
    followed, changed = follow_preprocess(input_cfg("squash"), openai)
    assert changed == {} and followed.INPUT.RESIZE_MODE == "squash"


# ---- through the trainer's data loaders (Dassl) ---------------------------------------------

def build_trainer(model_name, data_root, output_dir, *options):
    import os

    from dassl.engine import build_trainer as dassl_build_trainer
    from dassl.utils import set_random_seed

    import datasets.dassl_glue  # noqa: F401
    import trainers.register  # noqa: F401
    from train import parse_args, setup_cfg

    args = parse_args([
        "--root", data_root, "--seed", "1", "--trainer", "ZeroshotCLIP", "--output-dir", str(output_dir),
        "--dataset-config-file", os.path.join(REPO, "configs", "datasets", "synthetic_shapes.yaml"),
        "--config-file", os.path.join(REPO, "configs", "trainers", "ZeroshotCLIP", "vit_b16.yaml"),
        *FAST_OPTIONS, "USE_CUDA", "False", "MODEL.BACKBONE.NAME", str(model_name), *options,
    ])
    cfg = setup_cfg(args)
    set_random_seed(cfg.SEED)
    return dassl_build_trainer(cfg)


def evaluation_transforms(trainer):
    loaders = [trainer.test_loader] + ([trainer.val_loader] if trainer.val_loader is not None else [])
    return [loader.dataset.transform for loader in loaders]


def dassl_test_transform(cfg):
    from dassl.data.transforms import build_transform

    return build_transform(cfg, is_train=False)


@pytest.fixture(scope="module")
def open_clip_dirs(tmp_path_factory):
    return open_clip_models.save_both_styles(str(tmp_path_factory.mktemp("open_clip")))


@requires_dassl
def test_a_siglip_models_test_images_are_squashed_as_open_clip_does(open_clip_dirs, synthetic_data_root, tmp_path):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    trainer = build_trainer(open_clip_models.backbone_name(open_clip_dirs["siglip"]), synthetic_data_root, tmp_path)
    assert trainer.cfg.INPUT.RESIZE_MODE == "squash"
    own = image_transform_v2(PreprocessCfg(**trainer.dual_encoder.model.visual.preprocess_cfg), is_train=False)
    size = open_clip_models.IMAGE_SIZE
    for image in (random_image(100, 37), random_image(37, 100, seed=1)):
        direct = normalised(TF.resize(image, [size, size], InterpolationMode.BICUBIC), HALF)
        assert torch.equal(own(image), direct)
        for transform in evaluation_transforms(trainer):
            assert torch.equal(transform(image), direct)
    # Dassl's resize and centre crop leave an image of the input size as it is.
    image = random_image(size, size)
    assert torch.equal(dassl_test_transform(trainer.cfg)(image), normalised(image, HALF))


@requires_dassl
def test_a_users_resize_mode_wins_over_the_models(open_clip_dirs, synthetic_data_root, tmp_path):
    siglip = open_clip_models.backbone_name(open_clip_dirs["siglip"])
    image = random_image(100, 37)
    for mode in ("shortest", "longest"):
        trainer = build_trainer(siglip, synthetic_data_root, tmp_path / mode, "INPUT.RESIZE_MODE", mode)
        assert trainer.cfg.INPUT.RESIZE_MODE == mode
        expected = open_clip_inference(open_clip_models.IMAGE_SIZE, mode, HALF)(image)
        for transform in evaluation_transforms(trainer):
            assert torch.equal(transform(image), expected)


@requires_dassl
def test_clip_style_and_openai_models_keep_dassls_test_transform(open_clip_dirs, synthetic_data_root, tiny_clip_path,
                                                                 tmp_path):
    image = random_image(100, 37)
    clip_style = build_trainer(open_clip_models.backbone_name(open_clip_dirs["clip"]), synthetic_data_root,
                               tmp_path / "clip-style")
    assert clip_style.cfg.INPUT.RESIZE_MODE == "shortest"
    expected = open_clip_inference(open_clip_models.IMAGE_SIZE, "shortest", OPENAI)(image)
    assert all(torch.equal(transform(image), expected) for transform in evaluation_transforms(clip_style))

    openai = build_trainer(tiny_clip_path, synthetic_data_root, tmp_path / "openai")
    assert openai.cfg.INPUT.RESIZE_MODE == "shortest"
    for transform in evaluation_transforms(openai):  # Dassl's own transform, not wrapped
        assert [type(step).__name__ for step in transform.transforms] == ["Resize", "CenterCrop", "ToTensor",
                                                                        "Normalize"]
        assert torch.equal(transform(image), dassl_test_transform(openai.cfg)(image))
    squashed = build_trainer(tiny_clip_path, synthetic_data_root, tmp_path / "openai-squash", "INPUT.RESIZE_MODE",
                             "squash")
    expected = normalised(TF.resize(image, [224, 224], InterpolationMode.BICUBIC), OPENAI)
    assert all(torch.equal(transform(image), expected) for transform in evaluation_transforms(squashed))


@requires_dassl
def test_a_hf_siglip_models_test_images_are_what_its_image_processor_makes(tiny_hf_path, synthetic_data_root,
                                                                             tmp_path):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = tiny_hf_path("siglip")
    trainer = build_trainer("hf:" + folder, synthetic_data_root, tmp_path)
    assert trainer.cfg.INPUT.RESIZE_MODE == "squash"
    processor = SiglipImageProcessorPil.from_pretrained(folder)  # PIL's resampling, as Dassl reads images
    image = random_image(100, 37)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    for transform in evaluation_transforms(trainer):
        torch.testing.assert_close(transform(image), expected, rtol=0, atol=1e-6)
