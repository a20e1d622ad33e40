"""CLIP-LoRA (Zanella and Ben Ayed, CVPR Workshops 2024): low-rank updates of the attention
projections of CLIP's two towers, built with Hugging Face `peft`.

Where CLIP-LoRA puts them (TRAINER.LORA): in the self-attention of the blocks POSITION selects
(all 12 by default) of the towers ENCODER names (both), on the projections PARAMS lists (q, k, v;
o is the output projection). Each adapted Linear computes

    y = W x + b + (ALPHA / sqrt(R)) * B A dropout(x),    A: R x in, B: out x R,

A initialised kaiming-uniform (a = sqrt(5)), B zeros, so the adapted model starts exactly as the
frozen one; dropout (DROPOUT) acts on the update's input only. CLIP-LoRA scales by alpha / sqrt(r)
(rank-stabilised LoRA), peft by alpha / r unless `use_rslora=True`, which is what this uses.

OpenAI CLIP's and open_clip's blocks compute attention with nn.MultiheadAttention, whose q, k and v
projections are one fused matrix that peft cannot adapt separately (peft's own MultiheadAttention
support puts one rank-r update on the fused matrix and always one on the output: another
parameterisation). Each selected attention is therefore first replaced by SplitAttention, the same
computation with four separate Linear layers (as CLIP-LoRA's PlainMultiheadAttentionLoRA), and peft
wraps those. Hugging Face CLIP and SigLIP towers have separate q/k/v/out Linears already. Where the
blocks are is the backbone's to say (Backbone.attention_sites).

The LoRA matrices are registered as one module, LowRankUpdates: what a trainer optimises and
checkpoints (only these matrices: a checkpoint is small and loads into a freshly built model).
In eval mode CLIP-LoRA merges every update into its layer's weight (W + scaling B A) and unmerges it
for training; LowRankUpdates does the same with peft's merge when merge_for_eval is set
(TRAINER.LORA.MERGE_FOR_EVAL): the same logits to float rounding, without the extra matrix products.
"""

import logging
import re
from fractions import Fraction

import torch
from torch import nn
from torch.nn import functional as F

from ..config import LORA_ENCODERS, LORA_PROJECTIONS
from ..errors import UserFacingError

logger = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name of the one adapter
# TRAINER.LORA.PARAMS, CLIP-LoRA's letters -> the projection's attribute on an attention module.
PROJECTIONS = dict(zip(LORA_PROJECTIONS, ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True))
# TRAINER.LORA.ENCODER -> the towers adapted, as Backbone.attention_sites names them.
TOWERS = dict(zip(LORA_ENCODERS, (("text",), ("image",), ("text", "image")), strict=True))
# TRAINER.LORA.POSITION -> the share [start, end) of a tower's blocks: on 12 blocks CLIP-LoRA's
# indices (bottom 0-3, mid 4-7, up 8-11, half-bottom 0-5, half-up 6-11), on ViT-L/14's 24 vision
# blocks its halves (0-11, 12-23). "top3" is the last three blocks.
POSITION_SHARES = {
    "all": (Fraction(0), Fraction(1)),
    "bottom": (Fraction(0), Fraction(1, 3)),
    "mid": (Fraction(1, 3), Fraction(2, 3)),
    "up": (Fraction(2, 3), Fraction(1)),
    "half-bottom": (Fraction(0), Fraction(1, 2)),
    "half-up": (Fraction(1, 2), Fraction(1)),
}


def selected_blocks(position, depth):
    """The indices of the blocks TRAINER.LORA.POSITION selects in a tower of `depth` blocks."""
    if position == "top3":
        return range(max(depth - 3, 0), depth)
    start, end = POSITION_SHARES[position]
    return range(int(depth * start), int(depth * end))


class SplitAttention(nn.Module):
    """nn.MultiheadAttention computed with separate q_proj, k_proj, v_proj and out_proj Linear
    layers: the rows [0, E), [E, 2E), [2E, 3E) of its fused in_proj and its out_proj, copied in
    their dtype and device. Called as CLIP's blocks call the module it replaces:
    (query, key, value, need_weights=False, attn_mask=mask) -> (output, None), the mask additive
    (float) or boolean (True: may not attend), of shape (L, S) or (N * heads, L, S)."""

    def __init__(self, fused):
        super().__init__()
        if not fused._qkv_same_embed_dim or fused.bias_k is not None or fused.add_zero_attn:
            raise ValueError("SplitAttention takes a MultiheadAttention with one width for q, k and v, "
                             "without bias_k / bias_v or zero attention")
        width = fused.embed_dim
        self.num_heads = fused.num_heads
        self.batch_first = fused.batch_first
        self.dropout = fused.dropout
        weight, bias = fused.in_proj_weight, fused.in_proj_bias
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(index * width, (index + 1) * width)
            setattr(self, name, _linear(weight[rows], None if bias is None else bias[rows]))
        self.out_proj = _linear(fused.out_proj.weight, fused.out_proj.bias)

    def forward(self, query, key, value, need_weights=False, attn_mask=None):
        if need_weights:
            raise ValueError("SplitAttention does not return attention weights: call it with need_weights=False")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q, k, v = (self._heads(projection(x)) for projection, x in
                   ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = self._additive_mask(attn_mask, q.shape[0], q.dtype)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  dropout_p=self.dropout if self.training else 0.0)
        output = self.out_proj(attended.transpose(1, 2).flatten(2))
        return (output if self.batch_first else output.transpose(0, 1)), None

    def _heads(self, x):
        """(N, L, E) -> (N, heads, L, E / heads)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _additive_mask(self, attn_mask, batch, dtype):
        if attn_mask is None:
            return None
        if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention's True is "may not attend"
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
                attn_mask, float("-inf"))
        attn_mask = attn_mask.to(dtype)  # autocast may have made q half precision
        if attn_mask.dim() == 3:  # one mask per sequence and head
            attn_mask = attn_mask.view(batch, self.num_heads, *attn_mask.shape[1:])
        return attn_mask


def _linear(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class _Update(nn.Module):
    """One adapted Linear's LoRA pair and its dropout, shared with the peft layer that uses them."""

    def __init__(self, layer):
        super().__init__()
        self.lora_A = layer.lora_A[ADAPTER]
        self.lora_B = layer.lora_B[ADAPTER]
        self.lora_dropout = layer.lora_dropout[ADAPTER]


class LowRankUpdates(nn.Module):
    """Every LoRA pair of a backbone as one module, keyed `<tower>.<block>.<projection>`, e.g.
    `text.0.q_proj.lora_A.weight`. The peft layers stay where they are in the towers; this module
    shares their LoRA matrices and dropouts (train() / eval() switch the dropouts) and merges
    the updates into the weights in eval mode when `merge_for_eval`.

    layers: {(tower, block index, projection attribute): peft LoRA Linear}."""

    def __init__(self, layers, merge_for_eval=True):
        super().__init__()
        self.merge_for_eval = merge_for_eval
        for (tower, block, projection), layer in layers.items():
            if not hasattr(self, tower):
                self.add_module(tower, nn.ModuleDict())
            blocks = getattr(self, tower)
            if str(block) not in blocks:
                blocks[str(block)] = nn.ModuleDict()
            blocks[str(block)][projection] = _Update(layer)
        self._layers = list(layers.values())  # a plain list: the layers' frozen weights are no part of this module

    @property
    def merged(self):
        return any(layer.merged for layer in self._layers)

    @torch.no_grad()
    def merge(self):
        """Add each update to its layer's weight (peft's merge); the layers then compute W' x + b."""
        for layer in self._layers:
            if not layer.merged:
                layer.merge()

    @torch.no_grad()
    def unmerge(self):
        """Take the updates out of the weights again (peft's unmerge)."""
        for layer in self._layers:
            if layer.merged:
                layer.unmerge()

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.unmerge()  # training needs W and B A apart
        elif self.merge_for_eval:
            self.merge()
        return self

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Unmerged while the matrices change: a merged weight holds the old update, which unmerging
        would subtract as the new one."""
        was_merged = self.merged
        self.unmerge()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if was_merged:
            self.merge()
        return result


def separate_projections(parent, attribute, where):
    """The attention module `parent.<attribute>` with separate q_proj, k_proj, v_proj and out_proj
    Linear layers: a fused nn.MultiheadAttention is replaced (in place) by its SplitAttention."""
    attention = getattr(parent, attribute)
    if isinstance(attention, nn.MultiheadAttention):
        attention = SplitAttention(attention)
        setattr(parent, attribute, attention)
    missing = [name for name in PROJECTIONS.values() if not isinstance(getattr(attention, name, None), nn.Linear)]
    if missing:
        raise UserFacingError(
            f"{where}: its attention ({type(attention).__name__}) has no separate {', '.join(missing)} Linear layers "
            "for LoRA. CLIP-LoRA runs on OpenAI CLIP and open_clip ViTs and on Hugging Face CLIP and SigLIP models; "
            "TRAINER.LORA.ENCODER text or vision adapts one tower only."
        )
    return attention


def add_lora(backbone, rank=2, alpha=1.0, dropout=0.25, position="all", encoder="both", params=("q", "k", "v"),
             merge_for_eval=True):
    """Put CLIP-LoRA's low-rank updates into the backbone's towers, in place, with peft; returns
    their LowRankUpdates (float32, whatever the backbone's precision). Defaults: CLIP-LoRA's."""
    from peft import LoraConfig, inject_adapter_in_model  # here: peft takes seconds to import

    targets = {}  # id of a Linear to adapt -> (tower, block, projection)
    adapted = []
    for tower in TOWERS[encoder]:
        sites = backbone.attention_sites(tower)
        blocks = selected_blocks(position, len(sites))
        if not sites:
            raise UserFacingError(
                f"{backbone.name}: its {tower} tower has no attention blocks for LoRA; set TRAINER.LORA.ENCODER "
                f"{'vision' if tower == 'text' else 'text'} to adapt the other tower only."
            )
        if not blocks:
            raise UserFacingError(f"TRAINER.LORA.POSITION {position} selects none of the {len(sites)} attention blocks "
                                  f"of the {tower} tower of {backbone.name}; use another POSITION (e.g. all).")
        adapted.append(f"{tower} blocks {blocks.start}-{blocks.stop - 1} of {len(sites)}")
        for index in blocks:
            attention = separate_projections(*sites[index], where=f"{backbone.name}, {tower} tower, block {index}")
            for letter in params:
                targets[id(getattr(attention, PROJECTIONS[letter]))] = (tower, index, PROJECTIONS[letter])
    names = {targets[id(module)]: name for name, module in backbone.model.named_modules() if id(module) in targets}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, use_rslora=True, bias="none", init_lora_weights=True,
        # a full-match pattern: a list would also match any module whose name ends with one of them
        target_modules="|".join(map(re.escape, names.values())),
    )
    inject_adapter_in_model(config, backbone.model)
    # text blocks first, then the image tower's, as CLIP-LoRA numbers its layers
    layers = {key: backbone.model.get_submodule(names[key]) for key in targets.values()}
    updates = LowRankUpdates(layers, merge_for_eval=merge_for_eval).float()
    logger.info("CLIP-LoRA: rank %d, alpha %g (scaling alpha / sqrt(r) = %.4f), dropout %g on %s of the %s: %d layers",
                rank, alpha, alpha / rank ** 0.5, dropout, ", ".join(params), ", ".join(adapted), len(names))
    return updates


def build_lora(cfg, backbone):
    """add_lora with TRAINER.LORA's settings."""
    lora = cfg.TRAINER.LORA
    return add_lora(backbone, rank=lora.R, alpha=lora.ALPHA, dropout=lora.DROPOUT, position=lora.POSITION,
                    encoder=lora.ENCODER, params=tuple(lora.PARAMS), merge_for_eval=lora.MERGE_FOR_EVAL)
