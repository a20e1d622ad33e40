"""Tiny random open_clip models built with open_clip's own classes from custom model configs and
written as a user gets them from the Hugging Face hub: a folder with open_clip_config.json and the
weights file (and, for the SigLIP-style model, its tokenizer's files). Loaded through the project's
loader as MODEL.BACKBONE.NAME open_clip:local-dir:FOLDER.

- CLIP-style: causal text transformer pooled at the end-of-text token, open_clip's CLIP BPE
  tokenizer (with start token), softmax objective, 64 px images.
- SigLIP-style: bidirectional text transformer (no causal mask) pooled at the last position, a
  word-level tokenizer without start token (sequences end with </s>, then padding), a logit bias,
  mean/std 0.5 and the "squash" resize mode as SigLIP's preprocessing, 64 px images.
"""

import json
import os

import open_clip
import torch

IMAGE_SIZE = 64
EMBED_DIM = 32
WORDS = (
    "a photo of the an itap my X . , centered satellite type pet flower texture red blue green yellow purple "
    "circle triangle square star cat dog golden retriever air plane sea lion pup"
).split()

CLIP_STYLE = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIGLIP_STYLE = {
    "embed_dim": EMBED_DIM,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 48, "head_width": 24, "patch_size": 16},
    "text_cfg": {
        "context_length": 16, "vocab_size": len(WORDS) + 3, "width": 40, "heads": 2, "layers": 2,
        "no_causal_mask": True, "pool_type": "last", "proj_bias": True, "pad_id": 0, "eos_id": 1,
        "hf_tokenizer_name": "local",
    },
}
SIGLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}


def build(model_cfg, seed=0):
    torch.manual_seed(seed)
    cfg = json.loads(json.dumps(model_cfg))
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**cfg)
    with torch.no_grad():  # a logit scale unlike the initial one, so that a mix-up shows
        model.logit_scale.fill_(3.0)
    return model.eval()


def write_word_tokenizer(folder):
    """A Hugging Face word-level tokenizer: <pad> 0, </s> 1, <unk> 2, then WORDS; "</s>" ends
    every sequence and there is no start token (SigLIP's T5 tokenizers have the same layout)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    wrapped.save_pretrained(str(folder))


def save(folder, model_cfg, preprocess=None, seed=0):
    """Write a tiny model to `folder` (open_clip's hub layout); return the folder."""
    os.makedirs(folder, exist_ok=True)
    model = build(model_cfg, seed)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess or {}}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as handle:
        json.dump(config, handle)
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    if model_cfg["text_cfg"].get("hf_tokenizer_name"):
        write_word_tokenizer(folder)
    return folder


def save_clip_style(folder):
    return save(folder, CLIP_STYLE)


def save_siglip_style(folder):
    return save(folder, SIGLIP_STYLE, SIGLIP_PREPROCESS)


def save_both_styles(root):
    """{"clip": folder, "siglip": folder} of the two tiny models saved under root."""
    return {"clip": save_clip_style(os.path.join(root, "clip-style")),
            "siglip": save_siglip_style(os.path.join(root, "siglip-style"))}


def backbone_name(folder):
    return f"open_clip:local-dir:{folder}"
