"""Tiny random transformers dual encoders, saved as a user's save_pretrained folder: the model, a
tokenizer built offline from a vocabulary written here, and the family's image processor.

    from tests.tiny_hf import save_tiny_hf
    folder = save_tiny_hf("siglip", tmp_path)     # clip, siglip, align or blip

Every family keeps what the real checkpoints have where the project's code depends on it:
CLIP's byte-level BPE tokenizer with start and end tokens and a causal text tower, SigLIP's
tokenizer without a start token, padded to the tower's full length, and its logit bias, BERT
tokenizers for ALIGN and BLIP, and each family's own image processor (sizes shrunk to 32 px).
"""

import os

import torch

WORDS = (
    "a photo of the an x red green blue yellow purple orange cyan magenta white gray circle square triangle "
    "star cross ring type pet shape centered satellite"
).split()
IMAGE_SIZE = 32
FAMILIES = ("clip", "siglip", "align", "blip")


def _clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Every byte-level character, alone and word-final, without merges: words become characters.
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _bert_tokenizer():
    from transformers import BertTokenizer

    tokens = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz", ".", ","])
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=64)


def _siglip_tokenizer():
    """A word-level tokenizer in SigLIP's shape (SigLIP's own needs sentencepiece): lower case,
    no start token, the end token appended and used for padding."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS, ".", ","])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>", model_max_length=16
    )


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=8)
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_tiny_hf(family, seed=0):
    """(model, tokenizer, image processor) of a tiny random model of the family."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "clip":
        tokenizer = _clip_tokenizer()
        text = dict(_TEXT, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=16))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif family == "siglip":
        tokenizer = _siglip_tokenizer()
        text = dict(_TEXT, vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=None,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=_VISION))
        with torch.no_grad():  # SigLIP's trained scale and bias (log 10 and -10) rather than random numbers
            model.logit_scale.fill_(2.3)
            model.logit_bias.fill_(-10.0)
        processor = tf.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    elif family == "align":
        tokenizer = _bert_tokenizer()
        vision = dict(image_size=IMAGE_SIZE, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=64)
        config = tf.AlignConfig(text_config=dict(_TEXT, vocab_size=len(tokenizer), max_position_embeddings=64),
                                vision_config=vision, projection_dim=32, temperature_init_value=0.05)
        model = tf.AlignModel(config)
        # A random EfficientNet whose batch norms keep their initial statistics shrinks its input
        # ~50-fold per block (features of norm ~1e-30); statistics of random images, as training
        # would gather them, keep the features of order 1.
        model.vision_model.train()
        with torch.no_grad():
            for _ in range(30):
                model.vision_model(pixel_values=torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE))
        # ALIGN's processor: no normalisation, pixels rescaled to [-1, 1].
        processor = tf.EfficientNetImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_center_crop=False, do_normalize=False, rescale_factor=1 / 127.5, rescale_offset=True, include_top=False,
        )
    elif family == "blip":
        tokenizer = _bert_tokenizer()
        text = dict(_TEXT, vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=32,
                    bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
                    sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
        model = tf.BlipForImageTextRetrieval(tf.BlipConfig(text_config=text, vision_config=_VISION,
                                                           image_text_hidden_size=16))
        processor = tf.BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return model.eval(), tokenizer, processor


def save_tiny_hf(family, folder, seed=0):
    """Write a tiny model of the family with save_pretrained into folder/<family>; return that folder."""
    model, tokenizer, processor = build_tiny_hf(family, seed=seed)
    target = os.path.join(str(folder), family)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    processor.save_pretrained(target)
    return target
