import urllib.error
import urllib.request

import pytest
import torch

from trainers.model.backbones import as_backbone
from trainers.model.backbones.openai_loader import (
    CLIPLoadError,
    cached_weights_path,
    clip_signature,
    load_clip,
)
from trainers.model.precision import Precision
from trainers.model.tiny_clip import TINY_EMBED_DIM, build_tiny_clip


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def encode(model, images, tokens):
    model = model.float()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_state_dict_file_loads_into_the_same_model(tiny_clip_path):
    import clip

    loaded = load_clip(str(tiny_clip_path))
    original = build_tiny_clip()
    assert clip_signature(loaded) == {
        "embed_dim": TINY_EMBED_DIM, "text_width": 64, "vision_width": 64, "vision": "ViT", "image_size": 224,
    }
    assert loaded.visual.conv1.weight.dtype == torch.float16  # as clip.load leaves it
    images = torch.randn(2, 3, 224, 224)
    tokens = clip.tokenize(["a photo of a cat.", "a photo of a dog."])
    for ours, theirs in zip(encode(loaded, images, tokens), encode(original, images, tokens), strict=False):
        assert torch.equal(ours, theirs)


def test_torchscript_archive_loads(tiny_clip_path, tiny_clip_torchscript_path):
    from_archive = load_clip(str(tiny_clip_torchscript_path)).float().state_dict()
    from_state_dict = load_clip(str(tiny_clip_path)).float().state_dict()
    assert from_archive.keys() == from_state_dict.keys()
    assert all(torch.equal(from_archive[k], from_state_dict[k]) for k in from_archive)


def test_resnet_clip_loads(tiny_resnet_clip_path):
    model = load_clip(str(tiny_resnet_clip_path))
    assert clip_signature(model)["vision"] == "ResNet"
    with torch.no_grad():
        assert model.float().encode_image(torch.randn(1, 3, 224, 224)).shape == (1, TINY_EMBED_DIM)


def test_missing_named_model_offline_names_the_file_and_the_fix(tmp_path, offline):
    with pytest.raises(CLIPLoadError) as error:
        load_clip("ViT-B/16", cache_dir=str(tmp_path))
    message = str(error.value)
    assert cached_weights_path("ViT-B/16", str(tmp_path)) in message
    assert "ViT-B-16.pt" in message and "CLIP_CACHE_DIR" in message


def test_named_model_without_download(tmp_path):
    with pytest.raises(CLIPLoadError, match="downloading is disabled"):
        load_clip("RN50", cache_dir=str(tmp_path), download=False)


def test_damaged_cached_model_offline_is_reported(tmp_path, offline):
    with open(cached_weights_path("ViT-B/32", str(tmp_path)), "wb") as handle:
        handle.write(b"truncated download")
    with pytest.raises(CLIPLoadError, match="could not be downloaded"):
        load_clip("ViT-B/32", cache_dir=str(tmp_path))


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CLIPLoadError, match="corrupt") as error:
        load_clip(str(path))
    assert str(path) in str(error.value)


def test_state_dict_of_something_else_is_reported(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CLIPLoadError, match="not a CLIP checkpoint"):
        load_clip(str(path))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(CLIPLoadError) as error:
        load_clip("ViT-H/99")
    assert "ViT-B/16" in str(error.value) and "RN50" in str(error.value)


def test_precision_modes_on_cpu(tiny_clip_path):
    model = load_clip(str(tiny_clip_path))
    assert Precision("fp32", "cpu").cast_clip(as_backbone(model)).model.visual.conv1.weight.dtype == torch.float32
    fallback = Precision("fp16", "cpu")
    assert fallback.mode == "fp32" and fallback.clip_dtype == torch.float32
    forced = Precision("fp16", "cpu", half_on_cpu=True)  # gpu_check's CPU run of the half-precision paths
    assert forced.mode == "fp16" and forced.cast_clip(as_backbone(model)).model.visual.conv1.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="fp16, fp32, amp"):
        Precision("int8", "cpu")
