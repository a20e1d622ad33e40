"""Hugging Face `transformers` dual encoders as backbones: `MODEL.BACKBONE.NAME hf:ORG/NAME`.

A model of the Hub (`hf:openai/clip-vit-base-patch16`, `hf:google/siglip-base-patch16-224`,
`hf:kakaobrain/align-base`, `hf:Salesforce/blip-itm-base-coco`) or a local folder written with
`save_pretrained` (`hf:/path/to/folder`: the model, its tokenizer and its image processor side by
side). Supported are the classes with an image and a text embedding in one space (ARCHITECTURES):
CLIPModel, SiglipModel, AlignModel, BlipModel, and BlipForImageTextRetrieval read through its
image-text contrastive projections (vision_proj / text_proj: what `use_itm_head=False` compares).

Each tower is the model's own submodules composed as the model's own `get_image_features` /
`get_text_features` compose them (the tests check both against transformers). The text towers
take token ids only, not prompt embeddings, so these backbones serve the trainers that learn on
top of the features (zero-shot, the RAda head and its test-time training); prompt learners end
in a message naming those trainers.
"""

import logging
import os
from collections import namedtuple

import torch
from PIL import Image
from torch import nn

from ...untrusted_files import is_load_failure, unloadable
from .base import Backbone, BackboneError, Preprocess, TextEncoder, Tokenizer

logger = logging.getLogger(__name__)

PREFIX = "hf:"

# How a tower turns its inputs into the embedding: `module` and `projection` are attribute names
# on the transformers model (projection None: the tower's output is the embedding); `pooling` reads
# the tower's `pooler_output` or the first token of its `last_hidden_state`.
Tower = namedtuple("Tower", ["module", "projection", "pooling"])
# text_mask: whether the text tower is given the attention mask. CLIP's causal mask already keeps
# the padding after the end token from mattering (and it pads with the end token itself, so no mask
# could be read off the ids); SigLIP was trained without a mask on sequences padded to their full
# length, so it gets none and its sequences are padded so (pad_to_max_length).
# scale: where the logit scale lives: "logit_scale", a log-space parameter; "temperature", ALIGN's
# divisor; "config", BLIP's retrieval model, which keeps no learned one: its config's initial value.
Architecture = namedtuple("Architecture", ["image", "text", "text_mask", "pad_to_max_length", "scale", "bias"])

ARCHITECTURES = {
    "CLIPModel": Architecture(
        Tower("vision_model", "visual_projection", "pooler"), Tower("text_model", "text_projection", "pooler"),
        text_mask=False, pad_to_max_length=False, scale="logit_scale", bias=False,
    ),
    "SiglipModel": Architecture(
        Tower("vision_model", None, "pooler"), Tower("text_model", None, "pooler"),
        text_mask=False, pad_to_max_length=True, scale="logit_scale", bias=True,
    ),
    "AlignModel": Architecture(
        Tower("vision_model", None, "pooler"), Tower("text_model", "text_projection", "first"),
        text_mask=True, pad_to_max_length=False, scale="temperature", bias=False,
    ),
    "BlipModel": Architecture(
        Tower("vision_model", "visual_projection", "pooler"), Tower("text_model", "text_projection", "pooler"),
        text_mask=True, pad_to_max_length=False, scale="logit_scale", bias=False,
    ),
    "BlipForImageTextRetrieval": Architecture(
        Tower("vision_model", "vision_proj", "first"), Tower("text_encoder", "text_proj", "first"),
        text_mask=True, pad_to_max_length=False, scale="config", bias=False,
    ),
}
# The class a config without an `architectures` entry is loaded as.
DEFAULT_ARCHITECTURE = {
    "clip": "CLIPModel", "siglip": "SiglipModel", "align": "AlignModel", "blip": "BlipForImageTextRetrieval",
}
# PIL's resampling codes, as image processors store them, as torchvision / Dassl name them.
_INTERPOLATIONS = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFTokenizer(Tokenizer):
    """The model's own tokenizer: token ids (N, L), padded to the longest text (SigLIP: to its full
    context length, as it was trained)."""

    def __init__(self, tokenizer, context_length, pad_to_max_length):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, texts):
        encoded = self.tokenizer(
            list(texts), padding="max_length" if self.pad_to_max_length else True, truncation=True,
            max_length=self.context_length, return_tensors="pt",
        )
        return encoded["input_ids"]

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class _Tower(nn.Module):
    def __init__(self, model, tower):
        super().__init__()
        self.encoder = getattr(model, tower.module)
        self.projection = getattr(model, tower.projection) if tower.projection else None
        self.pooling = tower.pooling

    def embed(self, **inputs):
        outputs = self.encoder(**inputs, return_dict=True)
        pooled = outputs.pooler_output if self.pooling == "pooler" else outputs.last_hidden_state[:, 0]
        return pooled if self.projection is None else self.projection(pooled)


class HFImageEncoder(_Tower):
    """Normalised pixel values (B, 3, H, W) -> image embeddings (B, E)."""

    def forward(self, pixel_values):
        return self.embed(pixel_values=pixel_values)


class HFTextEncoder(_Tower, TextEncoder):
    """Token ids (N, L) -> text embeddings (N, E); it takes no prompt embeddings."""

    takes_embeddings = False

    def __init__(self, model, tower, tokenizer, use_mask):
        super().__init__(model, tower)
        self.tokenizer = tokenizer
        self.token_embedding = self.encoder.get_input_embeddings()
        self.use_mask = use_mask

    @property
    def dtype(self):
        return self.token_embedding.weight.dtype

    def encode_tokens(self, tokenized):
        if not self.use_mask:
            return self.embed(input_ids=tokenized)
        mask = (tokenized != self.tokenizer.tokenizer.pad_token_id).long()
        return self.embed(input_ids=tokenized, attention_mask=mask)

    def forward(self, prompt_embeddings, tokenized):
        raise BackboneError(
            "Hugging Face text towers take token ids, not learned prompt embeddings: prompt learning "
            "(CoOp, MaPLe) is not supported on hf: backbones."
        )


class HFBackbone(Backbone):
    """A transformers dual encoder (one of ARCHITECTURES) behind the Backbone interface."""

    family = "hf"

    def __init__(self, name, architecture, model, tokenizer, image_processor, repo_id=None):
        spec = ARCHITECTURES[architecture]
        self.name = name
        self.repo_id = repo_id
        self.architecture = architecture
        self.model = model
        config = model.config
        self.tokenizer = HFTokenizer(tokenizer, _context_length(tokenizer, config), spec.pad_to_max_length)
        self.image_encoder = HFImageEncoder(model, spec.image)
        self.text_encoder = HFTextEncoder(model, spec.text, self.tokenizer, spec.text_mask)
        self.logit_scale = _log_logit_scale(model, spec.scale)
        self.logit_bias = model.logit_bias if spec.bias else None
        self.preprocess = read_preprocess(image_processor, name)
        self.text_width = int(config.text_config.hidden_size)
        self.vision_width = int(getattr(config.vision_config, "hidden_size", 0) or config.vision_config.hidden_dim)
        self.embed_dim = int(_embedding_width(self.text_encoder))

    def model_id(self):
        """The Hub name; None for a local folder, which may move (its widths and towers identify it)."""
        return self.repo_id

    def vision_kind(self):
        return type(self.image_encoder.encoder).__name__

    def describe(self):
        return f"transformers {self.architecture}: {super().describe()}"

    def cast(self, dtype):
        self.model.to(dtype)
        # The scale and bias stay float32, as clip's own half-precision conversion keeps its scale.
        for parameter in (self.logit_scale, self.logit_bias):
            if parameter is not None:
                parameter.data = parameter.data.float()

    def attention_sites(self, tower):
        """The blocks of the towers built as CLIP's (encoder.layers[i].self_attn; BERT-style text towers and
        EfficientNet image towers have none)."""
        module = (self.image_encoder if tower == "image" else self.text_encoder).encoder
        layers = getattr(getattr(module, "encoder", None), "layers", None) or []
        return [(layer, "self_attn") for layer in layers if hasattr(layer, "self_attn")]

    def checkpoint_blocks(self, tower):
        module = (self.image_encoder if tower == "image" else self.text_encoder).encoder
        if not getattr(module, "supports_gradient_checkpointing", False):
            return False
        enable = getattr(module, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True

    def _no_prompts(self):
        return BackboneError(
            f"{self.name}: prompt learning (CoOp, MaPLe) is not supported for Hugging Face backbones; their "
            "towers take token ids only."
        )

    def text_prompt_sites(self):
        raise self._no_prompts()

    def vision_prompt_sites(self):
        raise self._no_prompts()


def _context_length(tokenizer, config):
    """The longest token sequence the text tower takes (a tokenizer without a limit reports ~1e30)."""
    positions = getattr(config.text_config, "max_position_embeddings", None)
    limits = [int(value) for value in (tokenizer.model_max_length, positions) if value and value < 1e6]
    return min(limits) if limits else None


def _log_logit_scale(model, where):
    if where == "logit_scale":
        return model.logit_scale
    if where == "temperature":  # ALIGN divides by it: log(1 / T)
        return nn.Parameter(-model.temperature.detach().log())
    return nn.Parameter(torch.tensor(float(model.config.logit_scale_init_value)))


def _embedding_width(text_encoder):
    """Width of the shared space, read off the text tower (its projection, else its output)."""
    if text_encoder.projection is not None:
        return text_encoder.projection.out_features
    return text_encoder.encoder.config.hidden_size


def read_preprocess(image_processor, name=""):
    """The vision tower's input from the model's image processor: size, interpolation, and the
    per-channel mean/std of [0, 1] pixels, read off the processor's own output for a black and a
    white image, so that processors that rescale with an offset instead of normalising (ALIGN's)
    are described by the same two numbers."""
    black = Image.new("RGB", (48, 40), (0, 0, 0))
    white = Image.new("RGB", (48, 40), (255, 255, 255))
    pixels = image_processor(images=[black, white], return_tensors="pt")["pixel_values"].double()
    low = pixels[0].flatten(1).mean(dim=1)
    high = pixels[1].flatten(1).mean(dim=1)
    std = 1.0 / (high - low)
    mean = -low * std
    height, width = pixels.shape[-2:]
    if height != width:
        raise BackboneError(f"{name}: its image processor makes {height}x{width} images; only square inputs are supported.")
    resample = getattr(image_processor, "resample", None)
    return Preprocess(
        image_size=int(height),
        mean=tuple(round(float(v), 8) for v in mean),
        std=tuple(round(float(v), 8) for v in std),
        interpolation=_INTERPOLATIONS.get(int(resample) if resample is not None else 3, "bicubic"),
        resize_mode=_resize_mode(image_processor),
    )


def _resize_mode(image_processor):
    """"squash" for a processor that resizes the whole image to a fixed height and width without a
    centre crop (SigLIP's, BLIP's, ALIGN's EfficientNet processor with do_center_crop off), else
    "shortest": the shorter side, then a centre crop (CLIP's: size {"shortest_edge"} and crop_size).
    A fixed-size resize followed by a smaller centre crop has no mode here and is read as "shortest"."""
    size = getattr(image_processor, "size", None) or {}
    fixed = bool(size.get("height") and size.get("width"))
    return "squash" if fixed and not getattr(image_processor, "do_center_crop", False) else "shortest"


# ---- loading ----------------------------------------------------------------------------------


def default_cache_dir():
    """The Hub's own cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _source(spec):
    """(what from_pretrained is given, whether it is a local folder) for the name after `hf:`."""
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return expanded, True
    if spec.startswith((".", "/", "~")):
        raise BackboneError(
            f"MODEL.BACKBONE.NAME hf:{spec}: there is no folder {expanded}. Give hf:ORG/NAME for a model of the "
            "Hugging Face Hub or hf:/path/to/folder for a folder written with save_pretrained."
        )
    if not spec or spec.count("/") > 1:
        raise BackboneError(
            f"MODEL.BACKBONE.NAME hf:{spec} is not a Hugging Face model name: give hf:ORG/NAME "
            "(e.g. hf:openai/clip-vit-base-patch16) or hf:/path/to/folder."
        )
    return spec, False


def _missing_message(repo, cache_dir, reason):
    cache = cache_dir or default_cache_dir()
    folder = os.path.join(cache, "models--" + repo.replace("/", "--"))
    return (
        f"Hugging Face model {repo!r} is not in the cache {cache} and could not be downloaded ({reason}). "
        f"It was looked for in {folder}. On a machine with internet access run `hf download {repo} --cache-dir "
        f"{cache}` and copy {folder} to the same place here (or point MODEL.BACKBONE.CACHE_DIR at a folder that "
        "holds it), or save the model, its tokenizer and its image processor with save_pretrained into one "
        "folder and set MODEL.BACKBONE.NAME hf:/path/to/that/folder."
    )


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _pick_architecture(name, config):
    declared = list(getattr(config, "architectures", None) or [])
    for architecture in declared:
        if architecture in ARCHITECTURES:
            return architecture
    if not declared and config.model_type in DEFAULT_ARCHITECTURE:
        return DEFAULT_ARCHITECTURE[config.model_type]
    what = ", ".join(declared) or f"model of type {config.model_type!r}"
    raise BackboneError(
        f"{name} is a {what}, which has no image and text embedding in one space. Supported transformers "
        f"classes: {', '.join(ARCHITECTURES)} (for BLIP an image-text retrieval checkpoint, e.g. "
        "Salesforce/blip-itm-base-coco)."
    )


def _refuse_missing_weights(name, architecture, info):
    """Weights the checkpoint lacks would be random, e.g. a BLIP captioning checkpoint read as
    BlipModel has no trained text tower or projections."""
    spec = ARCHITECTURES[architecture]
    used = {tower.module for tower in (spec.image, spec.text)}
    used |= {tower.projection for tower in (spec.image, spec.text) if tower.projection}
    missing = sorted(key for key in info.get("missing_keys", ()) if key.split(".")[0] in used)
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise BackboneError(
            f"{name} has no trained weights for parts of {architecture} that its features use ({shown}): it is a "
            "checkpoint for another task. Use one trained for image-text matching (for BLIP an ITM checkpoint, "
            "e.g. Salesforce/blip-itm-base-coco)."
        )


def _refuse_empty_tokenizer(name, source, tokenizer, config):
    """transformers builds a tokenizer of special tokens alone when a folder has no tokenizer files;
    every text would then encode to the same ids."""
    vocabulary = tokenizer.get_vocab()
    if len(vocabulary) <= len(set(tokenizer.all_special_ids)):
        raise BackboneError(
            f"{name}: {source} has no tokenizer files (transformers made an empty tokenizer). Save the model's "
            "tokenizer into the same folder (tokenizer.save_pretrained(folder))."
        )
    if max(vocabulary.values()) >= config.text_config.vocab_size:
        raise BackboneError(
            f"{name}: its tokenizer has ids up to {max(vocabulary.values())} but the text tower has "
            f"{config.text_config.vocab_size} token embeddings: the tokenizer belongs to another model."
        )


def load(spec, weights="", cache_dir=None, download=True):
    """The backbone of `hf:<spec>` in float32 on the CPU, in eval mode. Offline ($HF_HUB_OFFLINE=1 or
    download=False) only the cache (MODEL.BACKBONE.CACHE_DIR, else the Hub's default) is read."""
    name = PREFIX + spec
    if weights:
        raise BackboneError(
            f"MODEL.BACKBONE.WEIGHTS is not used with {name}: save the model with save_pretrained into a folder "
            "and set MODEL.BACKBONE.NAME hf:/path/to/that/folder."
        )
    try:
        import transformers
    except ImportError:
        raise BackboneError(f"MODEL.BACKBONE.NAME {name} needs the transformers package: pip install transformers") from None

    source, local = _source(spec)
    options = {"cache_dir": cache_dir or None, "local_files_only": local or not download}
    part = "config"
    try:
        config = transformers.AutoConfig.from_pretrained(source, **options)
        architecture = _pick_architecture(name, config)
        part = "weights"
        model, info = getattr(transformers, architecture).from_pretrained(
            source, config=config, dtype=torch.float32, output_loading_info=True, **options
        )
        part = "tokenizer"
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **options)
        part = "image processor"
        image_processor = transformers.AutoImageProcessor.from_pretrained(source, **options)
    except BackboneError:
        raise
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise BackboneError(
                f"Cannot load the {part} of the Hugging Face model in {source} ({_first_line(error)}). The folder "
                "must hold what save_pretrained writes for the model, its tokenizer and its image processor."
            ) from None
        raise BackboneError(_missing_message(source, cache_dir, _first_line(error))) from None
    except Exception as error:  # noqa: BLE001 - only torch.load's refusal of a weights file is answered here
        if not is_load_failure(error):
            raise
        raise BackboneError(str(unloadable(source, error, f"The {part} file of {name}"))) from None
    _refuse_missing_weights(name, architecture, info)
    _refuse_empty_tokenizer(name, source, tokenizer, config)
    backbone = HFBackbone(name, architecture, model.eval(), tokenizer, image_processor, repo_id=None if local else source)
    logger.info("Loaded %s from %s (%s)", name, source, backbone.describe())
    return backbone
