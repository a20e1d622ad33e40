"""open_clip models (the `open_clip_torch` package) as a Backbone: OpenCLIP's CLIP models (LAION,
DataComp, MetaCLIP, DFN, ...) and SigLIP-style models (last-token pooling, no causal mask, a
tokenizer without start token, a logit bias).

Names after the "open_clip:" prefix:

- ARCH/PRETRAINED, e.g. ViT-B-16/laion2b_s34b_b88k: an architecture of open_clip.list_models() and
  one of its pretrained tags, fetched by open_clip's own downloader into the cache folder;
- hf-hub:ORG/NAME: an open_clip model on the Hugging Face hub;
- local-dir:FOLDER: a folder as the hub holds them (open_clip_config.json and the weights file);
- ARCH with MODEL.BACKBONE.WEIGHTS: an architecture and a local weights file.
"""

import difflib
import logging
import os

import open_clip
import torch
from open_clip import pretrained as open_clip_pretrained
from open_clip.factory import parse_model_name
from open_clip.model import convert_weights_to_lp
from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, SimpleTokenizer, basic_clean, canonicalize_text
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from ...untrusted_files import is_load_failure, unloadable
from .base import Backbone, BackboneError, Preprocess, PromptSites, TextEncoder, Tokenizer

logger = logging.getLogger(__name__)

PREFIX = "open_clip:"


class OpenCLIPTokenizer(Tokenizer):
    """One of open_clip's tokenizers (its CLIP BPE tokenizer or a Hugging Face one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer.context_length)

    def __call__(self, texts):
        return self.tokenizer(texts)

    def encode(self, text):
        tokenizer = self.tokenizer
        if isinstance(tokenizer, SimpleTokenizer):
            return tokenizer.encode(text)
        if isinstance(tokenizer, SigLipTokenizer):
            text = canonicalize_text(basic_clean(text))
        elif isinstance(tokenizer, HFTokenizer):
            text = tokenizer.clean_fn(text)
        return tokenizer.tokenizer(text, add_special_tokens=False).input_ids


class OpenCLIPTextEncoder(TextEncoder):
    """open_clip's text transformer on prompt embeddings; the same computation as the model's own
    encode_text (CLIP) or TextTransformer.forward (custom text towers), pooled where the tower pools
    (the end-of-text token, the last position, or the first end-of-sequence token)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower apart
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.pad_mask = tower if isinstance(tower, TextTransformer) and tower.use_pad_mask else None
        self.tokenizer = tokenizer

    @property
    def dtype(self):
        return self.transformer.get_cast_dtype()

    def forward(self, prompt_embeddings, tokenized_prompts):
        dtype = self.dtype
        x = prompt_embeddings.to(dtype)
        attn_mask = self.attn_mask
        if self.pad_mask is not None:  # bidirectional towers that mask their padding
            attn_mask = self.pad_mask._build_additive_mask(tokenized_prompts, x.shape[1], x.dtype)
        x = x + self.positional_embedding[: x.shape[1]].to(dtype)
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, tokenized_prompts, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


class OpenCLIPBackbone(Backbone):
    family = "open_clip"

    def __init__(self, model, tokenizer, name, model_id):
        self.name = name
        self._model_id = model_id
        self.model = model
        tower = getattr(model, "text", model)
        if not isinstance(tower, (TextTransformer, open_clip.CLIP)) or getattr(tower, "cls_emb", None) is not None:
            raise BackboneError(
                f"{name}: its text tower ({type(tower).__name__}) is not one this project runs (open_clip's own text "
                "transformer without a class embedding). Use a CLIP or SigLIP model of open_clip."
            )
        self.tokenizer = OpenCLIPTokenizer(tokenizer)
        self.image_encoder = model.visual
        self.text_encoder = OpenCLIPTextEncoder(model, self.tokenizer)
        self.logit_scale = model.logit_scale
        self.logit_bias = model.logit_bias
        self.text_width = int(self.text_encoder.token_embedding.weight.shape[1])
        projection = self.text_encoder.text_projection
        self.embed_dim = int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])
        self.vision_width = int(_vision_width(model.visual))
        self.preprocess = _preprocess(model.visual)

    def model_id(self):
        return self._model_id

    @property
    def image_dtype(self):
        return next(m.weight.dtype for m in self.model.visual.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    def vision_kind(self):
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return "ViT"
        if hasattr(visual, "trunk"):
            return f"timm:{type(visual.trunk).__name__}"
        return "ResNet" if hasattr(visual, "layer1") else type(visual).__name__

    def signature(self):
        signature = super().signature()
        signature["objective"] = self.objective
        signature["context_length"] = self.tokenizer.context_length
        return signature

    def cast(self, dtype):
        if dtype == torch.float16:
            if hasattr(self.model.visual, "trunk"):  # timm towers: as open_clip casts them
                self.model.visual.to(dtype)
            convert_weights_to_lp(self.model, dtype=dtype)
        else:
            self.model.float()

    def text_prompt_sites(self):
        blocks = self.text_encoder.transformer
        return PromptSites(list(blocks.resblocks), batch_first=blocks.batch_first,
                           prompt_start=self.tokenizer.prefix_length)

    def vision_prompt_sites(self):
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise BackboneError(
                f"MaPLe needs open_clip's own ViT image encoder: it puts prompts into the layers of the vision "
                f"transformer, and {self.name} has a {self.vision_kind()} image encoder (a timm or ResNet tower "
                "has no such hooks here). Use a trainer without deep vision prompts (CoOp, RAdaCoOp, RAda, ...) "
                "or an open_clip ViT model."
            )
        return PromptSites(list(visual.transformer.resblocks), batch_first=visual.transformer.batch_first,
                           stem=visual.ln_pre)

    def attention_sites(self, tower):
        if tower == "text":
            transformer = self.text_encoder.transformer
        elif isinstance(self.model.visual, VisionTransformer):
            transformer = self.model.visual.transformer
        else:  # timm or ResNet image towers
            return []
        return [(block, "attn") for block in transformer.resblocks]

    def checkpoint_blocks(self, tower):
        if tower == "text":
            self.text_encoder.transformer.grad_checkpointing = True
            return True
        visual = self.model.visual
        if not hasattr(visual, "set_grad_checkpointing") or self.vision_kind() == "ResNet":
            return False
        visual.set_grad_checkpointing(True)
        return True


def _vision_width(visual):
    if isinstance(visual, VisionTransformer):
        return visual.transformer.width
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "num_features"):
        return trunk.num_features
    return next(m.weight.shape[0] for m in visual.modules() if isinstance(m, nn.Conv2d))


def _preprocess(visual):
    """The preprocessing open_clip settled on for the model (its pretrained tag's, the hub or folder
    config's, else open_clip's defaults), as open_clip's inference transform applies it."""
    config = getattr(visual, "preprocess_cfg", {}) or {}
    size = config.get("size", getattr(visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    interpolation = config.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"  # open_clip's "random" is a training augmentation
    return Preprocess(int(size), tuple(config.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                      tuple(config.get("std", open_clip.OPENAI_DATASET_STD)), interpolation,
                      resize_mode=config.get("resize_mode") or "shortest")


def _close(word, candidates):
    matches = difflib.get_close_matches(word, candidates, n=5, cutoff=0.5)
    return ", ".join(matches) if matches else "none close"


def _check_architecture(arch):
    if arch not in open_clip.list_models():
        raise BackboneError(
            f"Unknown open_clip architecture {arch!r}. Close matches: {_close(arch, open_clip.list_models())}. "
            "All of them: open_clip.list_models(); a name is open_clip:ARCH/PRETRAINED."
        )


def _check_tag(arch, tag):
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not open_clip_pretrained.is_pretrained_cfg(arch, tag):
        raise BackboneError(
            f"open_clip has no pretrained weights {tag!r} for {arch}. Its tags: {', '.join(tags) or 'none'}"
            f" (close matches: {_close(tag, tags)}). For weights of your own set MODEL.BACKBONE.NAME open_clip:{arch} "
            "and MODEL.BACKBONE.WEIGHTS to the file."
        )


def _fetch_pretrained(name, arch, tag, cache_dir, download):
    """Download (or find in the cache) the weights of ARCH/TAG; a clear message when that fails."""
    config = open_clip_pretrained.get_pretrained_cfg(arch, tag)
    hub, url = config.get("hf_hub", ""), config.get("url", "")
    if hub:
        repo, filename = os.path.split(hub)
        looked_for = f"{filename or 'open_clip_pytorch_model.bin'} of https://huggingface.co/{repo}"
        where = f"the Hugging Face cache{f' in {cache_dir}' if cache_dir else ''}"
    else:
        looked_for = url
        where = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    hint = (
        f"On a machine with internet access download {looked_for}, copy it here and set MODEL.BACKBONE.NAME "
        f"open_clip:{arch} and MODEL.BACKBONE.WEIGHTS to the file's path (or place it in {where})."
    )
    if not download:
        raise BackboneError(f"open_clip weights for {name!r} ({looked_for}) are needed and downloading is disabled. {hint}")
    try:
        return open_clip_pretrained.download_pretrained(config, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - urllib, requests and huggingface_hub raise many types
        raise BackboneError(
            f"open_clip weights for {name!r} are not in {where} and could not be downloaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). {hint}"
        ) from None


def load(spec, weights="", cache_dir=None, download=True):
    name = PREFIX + spec
    cache_dir = cache_dir or os.environ.get("CLIP_CACHE_DIR") or None
    schema, identifier = parse_model_name(spec)
    if schema == "local-dir":
        if not os.path.isfile(os.path.join(identifier, "open_clip_config.json")):
            raise BackboneError(
                f"{name}: {identifier} is not an open_clip model folder (it needs open_clip_config.json and the "
                "weights file, as the Hugging Face hub holds them)."
            )
        model_name, pretrained, tokenizer_name = spec, None, spec
        model_id = f"local-dir:{os.path.basename(os.path.normpath(identifier))}"
    elif schema == "hf-hub":
        model_name, pretrained, tokenizer_name, model_id = spec, None, spec, spec
    else:
        arch, _, tag = spec.partition("/")
        _check_architecture(arch)
        if weights:
            if tag:
                raise BackboneError(f"{name} names pretrained weights and MODEL.BACKBONE.WEIGHTS names a file: "
                                    f"keep one (open_clip:{arch} with WEIGHTS, or {name} alone).")
            if not os.path.isfile(os.path.expanduser(weights)):
                raise BackboneError(f"MODEL.BACKBONE.WEIGHTS {weights} is not a file; set it to the weights of {arch}.")
            pretrained = os.path.expanduser(weights)
        elif tag:
            _check_tag(arch, tag)
            _fetch_pretrained(name, arch, tag, cache_dir, download)
            pretrained = tag
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise BackboneError(f"{name} names an architecture without weights: write open_clip:{arch}/TAG "
                                f"(tags: {tags}) or set MODEL.BACKBONE.WEIGHTS to a weights file.")
        model_name, tokenizer_name, model_id = arch, arch, spec
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                       require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(tokenizer_name, cache_dir=cache_dir)
    except BackboneError:
        raise
    except Exception as error:  # noqa: BLE001 - open_clip raises RuntimeError, OSError, ValueError, hub errors
        if is_load_failure(error):  # torch.load refused or could not parse the weights file: say which and why
            path = pretrained if weights else identifier
            subject = f"MODEL.BACKBONE.WEIGHTS {pretrained}" if weights else f"The weights file of {name}"
            raise BackboneError(str(unloadable(path, error, subject))) from None
        message = str(error).strip().splitlines()
        raise BackboneError(
            f"open_clip could not build {name!r}: {message[0] if message else type(error).__name__}. Check the name "
            "(open_clip:ARCH/PRETRAINED, open_clip:hf-hub:ORG/NAME, open_clip:local-dir:FOLDER) and, offline, that "
            f"its files are in the cache ({cache_dir or 'open_clip defaults'})."
        ) from None
    backbone = OpenCLIPBackbone(model.eval(), tokenizer, name, model_id)
    logger.info("Loaded open_clip %s (%s)", spec, backbone.describe())
    return backbone
