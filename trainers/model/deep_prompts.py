"""Deep prompts: learned tokens inserted into a transformer tower layer by layer (MaPLe, and the
deep vision / text prompts of IVLP and VPT).

Two insertions, each a context manager that registers forward pre-hooks for its duration only, so
that the library's own encoder code runs unchanged and the model is untouched outside it:

- `appended_tokens(stem, tokens)`: the first-layer prompts, appended to every sequence that enters
  `stem` (the vision tower's module whose input is the patch-embedding output: the prompts follow
  the class and patch tokens and get no positional embedding).
- `deep_prompts(blocks, prompts, start)`: block i + 1 receives its own prompts[i] in place of the
  tokens the previous block produced at positions start .. start + n - 1 (the text tower's first
  text positions; for the vision tower the last n, where the appended tokens went).

The sites come from the backbone: `Backbone.text_prompt_sites()` / `vision_prompt_sites()`
(trainers/model/backbones/base.py) name the residual blocks, their layout ((L, N, W), or
(N, L, W) if batch_first), the vision stem and the text tower's first text position.
"""

import contextlib

import torch


def replace_tokens(x, tokens, start, batch_first=False):
    """x (L, N, W), a residual block's input ((N, L, W) if batch_first), with positions start ..
    start+n-1 of every sequence replaced by tokens (n, W); a negative start counts from the end."""
    seq_dim = 1 if batch_first else 0
    length, batch = x.shape[seq_dim], x.shape[1 - seq_dim]
    start = start % length
    block = tokens.to(x.dtype).unsqueeze(1 - seq_dim).expand(*((batch, -1, -1) if batch_first else (-1, batch, -1)))
    end = start + tokens.shape[0]
    before, after = x.narrow(seq_dim, 0, start), x.narrow(seq_dim, end, length - end)
    return torch.cat([before, block, after], dim=seq_dim)


@contextlib.contextmanager
def deep_prompts(blocks, prompts, start, batch_first=False):
    """While active, block i + 1 of `blocks` receives prompts[i] (n, W) at positions start ..
    start+n-1 of its input; block 0 and the blocks after the last prompt are left alone."""
    blocks = list(blocks)
    if len(prompts) > len(blocks) - 1:
        raise ValueError(f"{len(prompts)} deep prompts for a transformer of {len(blocks)} blocks")
    handles = []
    try:
        for block, tokens in zip(blocks[1:], prompts, strict=False):
            handles.append(block.register_forward_pre_hook(_token_replacer(tokens, start, batch_first)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _token_replacer(tokens, start, batch_first):
    def hook(module, args):
        return (replace_tokens(args[0], tokens, start, batch_first), *args[1:])

    return hook


@contextlib.contextmanager
def appended_tokens(module, tokens):
    """While active, `module`'s input (N, L, W) gets tokens (n, W) appended to every sequence."""

    def hook(module, args):
        x = args[0]
        block = tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x, block], dim=1), *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
