"""A tiny, randomly initialised CLIP built with the clip package's own model class.

Used by the tests and by the offline demo when no real weights are cached. It has the real
tokenizer's vocabulary and context length and a 224 px input, so every code path (prompt
tokenisation, the text transformer, the image encoder, loading from disk) is the one real
weights take; only the widths and depths are small.
"""

import warnings

import torch

from .backbones.openai_package import clip_model

TINY_EMBED_DIM = 32


def build_tiny_clip(vision="ViT", seed=0):
    """A random CLIP with two-layer encoders; vision is "ViT" or "ResNet"."""
    torch.manual_seed(seed)
    if vision == "ViT":
        vision_layers, vision_width, patch = 2, 64, 32
    elif vision == "ResNet":
        vision_layers, vision_width, patch = (1, 1, 1, 1), 8, None
    else:
        raise ValueError(f"vision must be 'ViT' or 'ResNet', got {vision!r}")
    model = clip_model.CLIP(
        embed_dim=TINY_EMBED_DIM,
        image_resolution=224,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=patch,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    # Store fp16 weights as OpenAI's checkpoints do, so loading exercises the same casts.
    clip_model.convert_weights(model)
    return model.eval()


def save_tiny_clip(path, vision="ViT", seed=0, torchscript=False):
    """Write a tiny CLIP to `path` as a plain state dict or as a TorchScript archive."""
    model = build_tiny_clip(vision=vision, seed=seed)
    if torchscript:
        example = torch.zeros(1, 3, 224, 224, dtype=model.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing warns about data-dependent branches in CLIP
            torch.jit.trace_module(model.float(), {"encode_image": example.float()}).save(str(path))
    else:
        torch.save(model.state_dict(), str(path))
    return path


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random CLIP checkpoint (for demos and tests).")
    parser.add_argument("path", help="file to write (a plain state dict)")
    parser.add_argument("--vision", choices=["ViT", "ResNet"], default="ViT")
    args = parser.parse_args(argv)
    save_tiny_clip(args.path, vision=args.vision)
    print(f"Wrote a tiny random CLIP ({args.vision}) to {args.path}")


if __name__ == "__main__":
    main()
