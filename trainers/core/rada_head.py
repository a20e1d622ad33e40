"""The RAda head: one attention layer that masks CLIP's rational matrix.

For an image feature f (D) and class text features t_k (D), both L2-normalised, the
rational matrix is R[k, d] = f_d * t_kd and its row sums are CLIP's cosine scores. The head
predicts a per-image mask M (K x D) and returns logits s * sum_d M[k, d] * R[k, d].

Attention (per image, H heads of width D/H, scale a = 1 / (sqrt(D/H) * tau)):

    queries  Q1 = sqrt(s) f (every class row), Q2 = sqrt(s) t, Q3 = s R
    key = value source   s R
    A_n = K * softmax over all K*K entries of a * (W_qn Q_n)(W_k s R)^T
    m = W_o concat_h(((A_1 + A_2 + A_3) / 3) (W_v s R)),   M = relu(1 + m)

The K x K matrices are never built whole. Q1's rows are identical, so A_1 reduces to one
row-softmax over K keys. For Q2 and Q3 a global softmax equals a row softmax re-weighted by
K * exp(L_i - L) (L_i the log-sum-exp of row i, L that of all L_i), which
`_GlobalSoftmaxAttention` evaluates in blocks of query rows, in the forward pass and again
(recomputing scores) in the backward pass. Memory therefore grows linearly in K.
"""

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .errors import UserFacingError
from .precision import autocast_enabled

# Score elements (B * H * rows * K) per block; bounds the scratch memory of one block.
DEFAULT_BLOCK_ELEMENTS = 1 << 23


def _block_rows(batch, heads, num_keys, block_elements):
    return max(1, block_elements // max(1, batch * heads * num_keys))


class _GlobalSoftmaxAttention(torch.autograd.Function):
    """out[i] = sum_j K * softmax_all(scale * q k^T)[i, j] * v[j], computed in row blocks.

    q: (Bq, H, K, dh) with Bq in {1, B} (a query shared by the batch is not expanded);
    k, v: (B, H, K, dh). Matrix products run in the inputs' dtype; exponentials and sums
    in at least float32, as fused attention kernels do.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, block_elements):
        with torch.autocast(k.device.type, enabled=False):
            out, total_lse, rows = _global_softmax_forward(q, k, v, scale, block_elements)
        ctx.save_for_backward(q, k, v, out, total_lse)
        ctx.scale = scale
        ctx.rows = rows
        return out.to(v.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, total_lse = ctx.saved_tensors
        with torch.autocast(k.device.type, enabled=False):
            grads = _global_softmax_backward(q, k, v, out, total_lse, grad_out, ctx.scale, ctx.rows)
        return (*grads, None, None)


def _accumulation_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _global_softmax_forward(q, k, v, scale, block_elements):
    batch, heads, num_keys, head_dim = k.shape
    acc = _accumulation_dtype(v.dtype)
    rows = _block_rows(batch, heads, num_keys, block_elements)
    key_t = k.transpose(-1, -2)
    out = torch.empty(batch, heads, num_keys, head_dim, dtype=acc, device=k.device)
    row_lse = torch.empty(batch, heads, num_keys, 1, dtype=acc, device=k.device)
    for start in range(0, num_keys, rows):
        stop = min(start + rows, num_keys)
        scores = torch.matmul(q[:, :, start:stop] * scale, key_t).to(acc)
        row_max = scores.amax(dim=-1, keepdim=True)
        weights = scores.sub_(row_max).exp_()
        row_sum = weights.sum(dim=-1, keepdim=True)
        block = torch.matmul(weights.to(v.dtype), v).to(acc)
        out[:, :, start:stop] = block.div_(row_sum)
        row_lse[:, :, start:stop] = row_max + row_sum.log()
    total_lse = torch.logsumexp(row_lse, dim=2, keepdim=True)
    # Row i of the global softmax (times K) is the row softmax scaled by K * exp(L_i - L).
    out.mul_(row_lse.sub_(total_lse).exp_().mul_(num_keys))
    return out, total_lse, rows


def _global_softmax_backward(q, k, v, out, total_lse, grad_out, scale, rows):
    num_keys = k.shape[2]
    acc = _accumulation_dtype(v.dtype)
    grad_out = grad_out.to(v.dtype)
    # Softmax over all K*K entries: dZ = G * (dG - c) with c = sum(G * dG) / K = sum(dO * O) / K.
    centre = (grad_out.to(acc) * out).sum(dim=(-1, -2), keepdim=True).div_(num_keys)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    key_t = k.transpose(-1, -2)
    value_t = v.transpose(-1, -2)
    shared_query = q.shape[0] != k.shape[0]
    for start in range(0, num_keys, rows):
        stop = min(start + rows, num_keys)
        q_block = q[:, :, start:stop]
        d_out = grad_out[:, :, start:stop]
        attn = torch.matmul(q_block * scale, key_t).to(acc)
        attn = attn.sub_(total_lse).exp_().mul_(num_keys)
        grad_v += torch.matmul(attn.transpose(-1, -2).to(v.dtype), d_out).to(acc)
        grad_scores = torch.matmul(d_out, value_t).to(acc)
        grad_scores = grad_scores.sub_(centre).mul_(attn).mul_(scale).to(k.dtype)
        block_grad_q = torch.matmul(grad_scores, k).to(acc)
        if shared_query:
            block_grad_q = block_grad_q.sum(dim=0, keepdim=True)
        grad_q[:, :, start:stop] = block_grad_q
        grad_k += torch.matmul(grad_scores.transpose(-1, -2), q_block).to(acc)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class RAdaHead(nn.Module):
    """Masks the rational matrix of CLIP features; see the module docstring.

    Parameters are named as in the authors' code (q_proj1, q_proj2, q_proj3, k_proj,
    v_proj, out_proj) so their trained layers load unchanged. None depends on the number
    of classes, so a head trained on some classes applies to any others.
    """

    def __init__(self, embed_dim, num_heads=8, temperature=1.0, block_elements=DEFAULT_BLOCK_ELEMENTS):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"RAdaHead: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if temperature <= 0:
            raise ValueError(f"RAdaHead: temperature must be positive, got {temperature}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.temperature = float(temperature)
        self.block_elements = int(block_elements)
        self.q_proj1 = nn.Linear(embed_dim, embed_dim)
        self.q_proj2 = nn.Linear(embed_dim, embed_dim)
        self.q_proj3 = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # A zero output map makes the initial mask exactly 1: the head starts as plain CLIP.
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, temperature={self.temperature}"

    def _split_heads(self, x):
        """(..., N, D) -> (..., H, N, D/H), contiguous so that batched products need no copies."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2).contiguous()

    def forward(self, image_features, text_features, logit_scale):
        """Return (logits (B, K), mask (B, K, D)).

        image_features (B, D) and text_features (K, D) must be L2-normalised; logit_scale
        is the multiplier s (already exponentiated), a float or a tensor. Inside the
        attention s is a constant, as in the authors' code; the final s * scores keeps
        its gradient, so a trainable logit scale still learns.
        """
        if image_features.dim() != 2 or text_features.dim() != 2:
            raise ValueError(
                "RAdaHead expects image_features (B, D) and text_features (K, D), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[1] != self.embed_dim or text_features.shape[1] != self.embed_dim:
            raise ValueError(
                f"RAdaHead was built for width {self.embed_dim}, got features of width "
                f"{image_features.shape[1]} (image) and {text_features.shape[1]} (text)"
            )
        if not autocast_enabled(image_features.device.type):
            image_features = image_features.to(self.q_proj1.weight.dtype)
            text_features = text_features.to(self.q_proj1.weight.dtype)
        if not torch.is_tensor(logit_scale):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float64)
        scale = logit_scale.to(image_features.device)
        const_scale = scale.detach()
        root_scale = const_scale.sqrt()
        batch, num_classes = image_features.shape[0], text_features.shape[0]

        rational = image_features.unsqueeze(1) * text_features.unsqueeze(0)  # (B, K, D)
        # s and sqrt(s) are folded into the D x D weights instead of scaling (B, K, D) inputs.
        key = self._split_heads(F.linear(rational, self.k_proj.weight * const_scale, self.k_proj.bias))
        value = self._split_heads(F.linear(rational, self.v_proj.weight * const_scale, self.v_proj.bias))
        q_image = F.linear(image_features, self.q_proj1.weight * root_scale, self.q_proj1.bias)
        q_text = F.linear(text_features, self.q_proj2.weight * root_scale, self.q_proj2.bias)
        q_rational = F.linear(rational, self.q_proj3.weight * const_scale, self.q_proj3.bias)

        attn_scale = 1.0 / (math.sqrt(self.head_dim) * self.temperature)
        # Q1: all rows equal, so the global softmax times K is one row softmax over the keys.
        q_image = q_image.unflatten(-1, (self.num_heads, self.head_dim)).unsqueeze(-2)  # (B, H, 1, dh)
        image_scores = torch.matmul(q_image * attn_scale, key.transpose(-1, -2))
        image_weights = torch.softmax(image_scores.to(_accumulation_dtype(value.dtype)), dim=-1)
        image_weights = image_weights.to(value.dtype)
        mixed = torch.matmul(image_weights, value)  # (B, H, 1, dh), broadcast over class rows
        q_text = self._split_heads(q_text).unsqueeze(0)  # (1, H, K, dh), shared by the batch
        mixed = mixed + _GlobalSoftmaxAttention.apply(q_text, key, value, attn_scale, self.block_elements)
        mixed = mixed + _GlobalSoftmaxAttention.apply(
            self._split_heads(q_rational), key, value, attn_scale, self.block_elements
        )
        mixed = (mixed / 3).transpose(1, 2).reshape(batch, num_classes, self.embed_dim)
        # relu(1 + m) - 1 == max(m, -1): keep the deviation from 1, so M == 1 adds exactly 0.
        deviation = self.out_proj(mixed).clamp(min=-1.0)
        # (s * f) @ t^T is CLIP's own expression, so an all-ones mask reproduces its logits bit for bit.
        logits = (scale * image_features) @ text_features.t()
        logits = logits + scale * (deviation * rational).sum(dim=-1)
        return logits, deviation + 1.0

    @staticmethod
    def mask_regularizer(mask):
        """mean over the batch of max_{k,d} |M - 1|: the L-infinity pull of the mask to 1."""
        return (mask - 1.0).abs().flatten(1).amax(dim=1).mean()


def mask_penalty(mask, alpha):
    """alpha times the mask regulariser: the term every RAda objective adds to its loss (0 without
    a head, mask None, or with alpha 0)."""
    if mask is None or not alpha:
        return 0.0
    return alpha * RAdaHead.mask_regularizer(mask)


def rada_loss(logits, mask, labels, alpha):
    """Cross-entropy plus the mask penalty (the authors' training objective)."""
    return F.cross_entropy(logits, labels) + mask_penalty(mask, alpha)


def rada_head(cfg, embed_dim):
    """The RAdaHead that TRAINER.RADA describes, for features of width embed_dim."""
    rada = cfg.TRAINER.RADA
    if embed_dim % rada.NUM_HEADS:
        divisors = [n for n in range(1, min(embed_dim, 64) + 1) if embed_dim % n == 0]
        raise UserFacingError(
            f"TRAINER.RADA.NUM_HEADS is {rada.NUM_HEADS}; it must be a divisor of the feature width {embed_dim} "
            f"of this CLIP (e.g. {', '.join(map(str, divisors))})."
        )
    return RAdaHead(embed_dim, num_heads=rada.NUM_HEADS, temperature=rada.TEMP)
