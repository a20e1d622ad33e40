"""Hugging Face dual encoders behind the Backbone interface: tiny random models of each family,
saved with save_pretrained and loaded through the project's loader, give exactly the features
transformers itself gives; preprocessing comes from the model's image processor; bad names and
missing models end in clear messages."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from tests.tiny_hf import FAMILIES, IMAGE_SIZE
from trainers.errors import CheckpointError
from trainers.model.backbones import BackboneError, load_backbone
from trainers.model.classifier import CLIPClassifier
from trainers.model.prompts import FixedPrompts
from trainers.model.rada_head import RAdaHead
from trainers.runs.checkpoint import read_checkpoint, write_checkpoint

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a red circle.", "a photo of a star.", "a centered satellite photo of a blue square."]


@pytest.fixture(scope="module")
def loaded(tiny_hf_path):
    """family -> (the project's backbone, transformers' own model, its tokenizer), same weights."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = tiny_hf_path(family)
            backbone = load_backbone("hf:" + folder)
            reference = getattr(transformers, backbone.architecture).from_pretrained(folder).eval()
            cache[family] = backbone, reference, transformers.AutoTokenizer.from_pretrained(folder)
        return cache[family]

    return get


def reference_features(family, model, tokenizer, pixels):
    """Image and text features as transformers' documentation computes them."""
    if family == "blip":
        return None
    # SigLIP was trained on sequences padded to their full length, without an attention mask.
    if family == "siglip":
        text_inputs = {"input_ids": tokenizer(TEXTS, padding="max_length", return_tensors="pt")["input_ids"]}
    else:
        text_inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    return (model.get_image_features(pixel_values=pixels).pooler_output,
            model.get_text_features(**text_inputs).pooler_output, text_inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_the_transformers_models_own(family, loaded):
    backbone, model, tokenizer = loaded(family)
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        image = backbone.image_encoder(pixels)
        text = backbone.text_encoder.encode_tokens(backbone.tokenizer(TEXTS))
        assert image.shape == (2, backbone.embed_dim) and text.shape == (len(TEXTS), backbone.embed_dim)
        if family == "blip":
            # BLIP's contrastive retrieval score: cosine of the projected first tokens.
            inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
            score = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels,
                          use_itm_head=False).itm_score
            assert torch.equal(F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t(), score)
            return
        expected_image, expected_text, _ = reference_features(family, model, tokenizer, pixels)
    assert torch.equal(image, expected_image)
    assert torch.equal(text, expected_text)


@pytest.mark.parametrize("family", ["clip", "siglip", "align"])
def test_logit_scale_and_bias_give_the_models_own_logits(family, loaded):
    backbone, model, tokenizer = loaded(family)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        *_, text_inputs = reference_features(family, model, tokenizer, pixels)
        expected = model(pixel_values=pixels, **text_inputs).logits_per_image
        image = F.normalize(backbone.image_encoder(pixels), dim=-1)
        text = F.normalize(backbone.text_encoder.encode_tokens(backbone.tokenizer(TEXTS)), dim=-1)
        logits = backbone.logit_scale.exp() * image @ text.t()
        if backbone.logit_bias is not None:
            logits = logits + backbone.logit_bias
    assert (backbone.logit_bias is not None) == (family == "siglip")
    assert backbone.objective == ("sigmoid" if family == "siglip" else "softmax")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


CLASSES = ["red_circle", "star", "blue_square"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_head_gives_the_backbones_own_zero_shot_logits(family, loaded):
    """The RAda head starts as the identity: its logits are the classifier's zero-shot logits bit for
    bit (SigLIP: with its bias added), and those are the model's own image-text logits."""
    backbone, model, tokenizer = loaded(family)
    prompts = FixedPrompts(CLASSES, "a photo of a {}.")
    zero_shot = CLIPClassifier(backbone, prompts)
    with_head = CLIPClassifier(backbone, prompts, head=RAdaHead(backbone.embed_dim, num_heads=4))
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected = zero_shot(pixels).logits
        assert torch.equal(with_head(pixels).logits, expected)
        texts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASSES]
        if family == "blip":  # the retrieval model's own score is the cosine, unscaled
            inputs = tokenizer(texts, padding=True, return_tensors="pt")
            own = backbone.logit_scale.exp() * model(input_ids=inputs["input_ids"], pixel_values=pixels,
                                                     attention_mask=inputs["attention_mask"], use_itm_head=False).itm_score
        else:
            padding = "max_length" if family == "siglip" else True
            inputs = tokenizer(texts, padding=padding, return_tensors="pt")
            if family == "siglip":
                inputs = {"input_ids": inputs["input_ids"]}
            own = model(pixel_values=pixels, **inputs).logits_per_image
    torch.testing.assert_close(expected, own, rtol=1e-5, atol=1e-5)


def test_image_tower_checkpointing_keeps_the_loss_and_gradients(tiny_hf_path):
    def loss_and_gradients(checkpointed):
        backbone = load_backbone("hf:" + tiny_hf_path("clip"))
        if checkpointed:
            assert backbone.checkpoint_blocks("image")
        encoder = backbone.image_encoder.train()
        torch.manual_seed(0)
        loss = encoder(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)).square().sum()
        loss.backward()
        return loss.detach(), [p.grad for p in encoder.parameters()]

    plain_loss, plain_grads = loss_and_gradients(False)
    loss, grads = loss_and_gradients(True)
    assert torch.equal(loss, plain_loss)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-7)


def test_tokenizers_keep_their_models_special_tokens(loaded):
    clip, _, clip_tokenizer = loaded("clip")
    siglip, _, siglip_tokenizer = loaded("siglip")
    ids = clip.tokenizer(TEXTS)
    assert (ids[:, 0] == clip_tokenizer.bos_token_id).all() and clip.tokenizer.prefix_length == 1
    # SigLIP: no start token, the end token closes the text and pads to the full context length.
    ids = siglip.tokenizer(TEXTS)
    assert ids.shape == (len(TEXTS), siglip.tokenizer.context_length) and siglip.tokenizer.prefix_length == 0
    assert ids[0, : len(siglip.tokenizer.encode(TEXTS[0]))].tolist() == siglip.tokenizer.encode(TEXTS[0])
    assert (ids[:, -1] == siglip_tokenizer.eos_token_id).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocessing_is_the_image_processors(family, tiny_hf_path, loaded):
    """Normalising with the reported mean and std reproduces the processor's own pixel values."""
    backbone, *_ = loaded(family)
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_hf_path(family))
    preprocess = backbone.preprocess
    assert preprocess.image_size == IMAGE_SIZE and preprocess.interpolation == "bicubic"
    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3) * 255).to(torch.uint8).numpy())
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours = TF.normalize(TF.to_tensor(image), preprocess.mean, preprocess.std)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if family == "align":  # no normalisation, a rescale to [-1, 1]: mean and std 0.5
        assert preprocess.mean == pytest.approx((0.5,) * 3) and preprocess.std == pytest.approx((0.5,) * 3)


@pytest.mark.parametrize("family, mode", [("clip", "shortest"), ("siglip", "squash"), ("align", "squash"),
                                          ("blip", "squash")])
def test_the_resize_mode_is_the_image_processors(family, mode, loaded):
    """CLIP's processor resizes the shorter side and centre-crops; SigLIP's, BLIP's and ALIGN's (without
    its crop) resize the whole image to height x width."""
    backbone, *_ = loaded(family)
    assert backbone.preprocess.resize_mode == mode


def test_a_head_trained_on_one_model_loads_only_into_that_model(loaded, tiny_hf_path, tmp_path):
    """Checkpoints record the backbone: a head trained on the CLIP model is refused by the SigLIP
    model, while the same CLIP model copied to another folder (a local folder has no Hub name) loads it."""
    clip, *_ = loaded("clip")
    siglip, *_ = loaded("siglip")
    signature = clip.signature()
    assert signature["family"] == "hf" and signature["embed_dim"] == 16 and signature["model"] is None
    assert signature["vision"] == "CLIPVisionModel" and siglip.signature()["vision"] == "SiglipVisionModel"
    path = write_checkpoint({"state_dict": {}, "backbone": signature}, str(tmp_path / "head"), "model.pth.tar-1")
    with pytest.raises(CheckpointError, match="another backbone"):
        read_checkpoint(path, siglip.signature())
    moved = shutil.copytree(tiny_hf_path("clip"), tmp_path / "moved-clip")
    assert read_checkpoint(path, load_backbone(f"hf:{moved}").signature())["backbone"] == signature


def test_offline_missing_model_names_the_cache_and_the_fix(tmp_path):
    with pytest.raises(BackboneError) as raised:
        load_backbone("hf:some-org/some-model", cache_dir=str(tmp_path), download=False)
    message = str(raised.value)
    assert "'some-org/some-model'" in message and str(tmp_path / "models--some-org--some-model") in message
    assert "hf download some-org/some-model" in message and "save_pretrained" in message


def test_bad_names_and_folders_end_in_clear_messages(tmp_path, tiny_hf_path):
    with pytest.raises(BackboneError, match="there is no folder"):
        load_backbone("hf:" + str(tmp_path / "missing"))
    with pytest.raises(BackboneError, match="not a Hugging Face model name"):
        load_backbone("hf:a/b/c")
    # A folder with the model alone: transformers would make an empty tokenizer without a word.
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_hf_path("clip"), no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if name.startswith("tokenizer"):
            os.remove(no_tokenizer / name)
    with pytest.raises(BackboneError, match="has no tokenizer files"):
        load_backbone("hf:" + str(no_tokenizer))
    no_processor = tmp_path / "no-image-processor"
    shutil.copytree(tiny_hf_path("clip"), no_processor)
    os.remove(no_processor / "preprocessor_config.json")
    with pytest.raises(BackboneError, match="Cannot load the image processor"):
        load_backbone("hf:" + str(no_processor))


def _with_architecture(source, target, architecture):
    shutil.copytree(source, target)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config["architectures"] = [architecture]
    config_path.write_text(json.dumps(config))
    return str(target)


def test_models_without_a_shared_embedding_are_refused(tmp_path, tiny_hf_path):
    captioning = _with_architecture(tiny_hf_path("blip"), tmp_path / "captioning", "BlipForConditionalGeneration")
    with pytest.raises(BackboneError) as raised:
        load_backbone("hf:" + captioning)
    assert "BlipForConditionalGeneration" in str(raised.value) and "BlipForImageTextRetrieval" in str(raised.value)
    # Retrieval weights read as BlipModel would leave its text tower random: refused, not loaded.
    as_blip_model = _with_architecture(tiny_hf_path("blip"), tmp_path / "as-blip-model", "BlipModel")
    with pytest.raises(BackboneError, match="no trained weights"):
        load_backbone("hf:" + as_blip_model)


def test_prompt_learning_is_refused_by_the_text_tower(loaded):
    backbone, *_ = loaded("clip")
    assert backbone.text_encoder.takes_embeddings is False
    with pytest.raises(BackboneError, match="not supported"):
        backbone.text_prompt_sites()
