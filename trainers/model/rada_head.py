"""The RAda head: one attention layer that masks CLIP's rational matrix.

For an image feature f (D) and class text features t_k (D), both L2-normalised, the
rational matrix is R[k, d] = f_d * t_kd and its row sums are CLIP's cosine scores. The head
predicts a per-image mask M (K x D) and returns logits s * sum_d M[k, d] * R[k, d].

The class features are either shared by the batch (K, D), as with fixed or CoOp-style prompts,
or given per image (B, K, D), as image-conditioned prompts (CoCoOp) produce them. Everything
below is per image either way; only Q2 differs: one projection for the batch, or one per image.

Attention (per image, H heads of width D/H, scale a = 1 / (sqrt(D/H) * tau)):

    queries  Q1 = sqrt(s) f (every class row), Q2 = sqrt(s) t, Q3 = s R
    key = value source   s R
    A_n = K * softmax over all K*K entries of a * (W_qn Q_n)(W_k s R)^T
    m = W_o concat_h(((A_1 + A_2 + A_3) / 3) (W_v s R)),   M = relu(1 + m)

The K x K matrices are never built whole. Q1's rows are identical, so A_1 reduces to one
row-softmax over K keys. For Q2 and Q3 a global softmax equals a row softmax re-weighted by
K * exp(L_i - L) (L_i the log-sum-exp of row i, L that of all L_i): the two streams run as
ordinary row-softmax attention that also returns L_i, and the re-weighting is plain autograd
on top. The row attention has two implementations with the same results:

- "blocked": a loop over one image's key block and a few query rows at a time, in the forward
  pass and again (recomputing scores) in the backward pass; any device and dtype.
- "fused": PyTorch's fused attention kernels, which return L_i (on the CPU its flash-attention
  kernel, on CUDA its memory-efficient kernel). They are private operators, so the head checks
  that they exist and falls back to the blocked loop ("auto") where they do not, or where the
  CUDA kernel raises for the inputs.

Memory grows linearly in K either way, with shared and with per-image class features.
"""

import logging
import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..errors import UserFacingError
from .precision import autocast_enabled

logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("auto", "blocked", "fused")

# Score elements (images * heads * query rows * keys) of one block of the blocked loop: 16 MiB of
# float32 scores, within a CPU's last-level cache. Of 2**18 to 2**22 this was the fastest on the
# 2-core development CPU (fewer, larger operations; see bench/README.md).
DEFAULT_BLOCK_ELEMENTS = 1 << 22

_FUSED_DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_FUSED_OPS = {"cpu": "_scaled_dot_product_flash_attention_for_cpu", "cuda": "_scaled_dot_product_efficient_attention"}
# The fused backward gets one extra feature column (see _FusedRowAttention); CUDA's kernel wants
# head widths in multiples of 8.
_FUSED_PAD = {"cpu": 1, "cuda": 8}
# Where "auto" survives a fused kernel that raises: a CUDA build or GPU may lack the kernel for some
# inputs. The CPU kernel is always there, so an error there is a bug and is raised.
_FALLBACK_DEVICES = ("cuda",)


def fused_attention_available(device, dtype):
    """Whether this torch has a fused attention kernel with the row log-sum-exp for device and dtype."""
    device_type = torch.device(device).type
    return dtype in _FUSED_DTYPES.get(device_type, ()) and hasattr(torch.ops.aten, _FUSED_OPS[device_type])


def fused_attention_nondeterministic(device):
    """Whether the fused kernel's backward would break torch.use_deterministic_algorithms: CUDA's
    memory-efficient backward is deterministic only in the strict mode, and warns in warn-only mode."""
    return (torch.device(device).type == "cuda" and torch.are_deterministic_algorithms_enabled()
            and torch.is_deterministic_algorithms_warn_only_enabled())


def _accumulation_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _blocks(batch, rows, heads, num_keys, block_elements):
    """(first image, last image + 1, first row, last row + 1) of each block: a few query rows of one
    image, or all rows of several images when one image's scores fit the budget. Either way the
    block's slice of a (B, H, rows, ...) tensor flattens to (images * H, block rows, ...) as a view."""
    block_rows = max(1, block_elements // max(1, heads * num_keys))
    if block_rows < rows:
        for image in range(batch):
            for start in range(0, rows, block_rows):
                yield image, image + 1, start, min(start + block_rows, rows)
    else:
        images = max(1, block_rows // rows)
        for first in range(0, batch, images):
            yield first, min(first + images, batch), 0, rows


def _block_view(x, first, last, start, stop):
    """Rows start:stop of images first:last of x (Bx, H, N, ...) as (images * H, rows, ...); a query
    shared by the batch (Bx = 1) is repeated for each image."""
    if x.shape[0] == 1:
        return x[:, :, start:stop].expand(last - first, *x.shape[1:2], stop - start, *x.shape[3:]).flatten(0, 1)
    return x[first:last, :, start:stop].flatten(0, 1)


def _add_product(target, left, right):
    """target += left @ right (batched), inside the product when the dtypes allow it."""
    if target.dtype == left.dtype:
        target.baddbmm_(left, right)
    else:
        target.add_(torch.bmm(left, right))


def _scratch(buffer, *shape):
    return buffer[: math.prod(shape)].view(shape)


class _BlockedRowAttention(torch.autograd.Function):
    """Row-softmax attention softmax(q k^T) v and the row log-sum-exp, for several query streams
    that share the keys and values. k, v: (B, H, K, dh); each query (Bq, H, N, dh) with Bq in
    {1, B} (a query shared by the batch is not expanded). Returns the streams' outputs
    (B, H, N, dh), then their log-sum-exps (B, H, N). Matrix products run in the inputs' dtype,
    exponentials and sums in at least float32, as fused attention kernels do.

    The loop visits one image at a time (its keys and values stay in cache for all its query
    rows) and a block of query rows per step; the backward pass recomputes each block's scores.
    """

    @staticmethod
    def forward(ctx, block_elements, k, v, *queries):
        with torch.autocast(k.device.type, enabled=False):
            outs, lses = _blocked_forward(queries, k, v, block_elements)
        ctx.save_for_backward(k, v, *queries, *outs, *lses)
        ctx.block_elements = block_elements
        return (*outs, *lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        k, v, *rest = ctx.saved_tensors
        streams = len(grads) // 2
        queries, outs, lses = rest[:streams], rest[streams : 2 * streams], rest[2 * streams :]
        with torch.autocast(k.device.type, enabled=False):
            grad_k, grad_v, grad_queries = _blocked_backward(
                queries, k, v, outs, lses, grads[:streams], grads[streams:], ctx.block_elements
            )
        return (None, grad_k, grad_v, *grad_queries)


def _blocked_forward(queries, k, v, block_elements):
    batch, heads, num_keys, head_dim = k.shape
    acc = _accumulation_dtype(v.dtype)
    outs = [torch.empty(batch, heads, q.shape[2], head_dim, dtype=acc, device=k.device) for q in queries]
    lses = [torch.empty(batch, heads, q.shape[2], 1, dtype=acc, device=k.device) for q in queries]
    scores_buffer = torch.empty(max(block_elements, heads * num_keys), dtype=k.dtype, device=k.device)
    for q, out, lse in zip(queries, outs, lses, strict=True):
        for first, last, start, stop in _blocks(batch, q.shape[2], heads, num_keys, block_elements):
            key_t = k[first:last].flatten(0, 1).transpose(-1, -2)
            shape = ((last - first) * heads, stop - start, num_keys)
            scores = torch.bmm(_block_view(q, first, last, start, stop), key_t, out=_scratch(scores_buffer, *shape))
            scores = scores.to(acc)
            row_max = scores.amax(dim=-1, keepdim=True)
            weights = scores.sub_(row_max).exp_()
            row_sum = weights.sum(dim=-1, keepdim=True)
            block = _block_view(out, first, last, start, stop)
            block.copy_(torch.bmm(weights.to(v.dtype), v[first:last].flatten(0, 1))).div_(row_sum)
            _block_view(lse, first, last, start, stop).copy_(row_sum.log_().add_(row_max))
    return outs, [lse.squeeze(-1) for lse in lses]


def _blocked_backward(queries, k, v, outs, lses, grad_outs, grad_lses, block_elements):
    """Softmax backward per row: dS = P * (dO v^T - D), D = rowsum(dO * O) - dL (dL: the
    gradient reaching the row log-sum-exp, whose derivative in the scores is P itself)."""
    batch, heads, num_keys, head_dim = k.shape
    acc = _accumulation_dtype(v.dtype)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_queries = [torch.zeros(q.shape, dtype=acc, device=q.device) for q in queries]
    deltas = [
        (d_out.to(acc) * out).sum(dim=-1, keepdim=True).sub_(d_lse.unsqueeze(-1))
        for d_out, out, d_lse in zip(grad_outs, outs, grad_lses, strict=True)
    ]
    grad_outs = [d_out.to(v.dtype) for d_out in grad_outs]
    lses = [lse.unsqueeze(-1) for lse in lses]
    scores_buffer = torch.empty(max(block_elements, heads * num_keys), dtype=k.dtype, device=k.device)
    grad_buffer = torch.empty_like(scores_buffer)
    for q, grad_q, lse, d_out, delta in zip(queries, grad_queries, lses, grad_outs, deltas, strict=True):
        for first, last, start, stop in _blocks(batch, q.shape[2], heads, num_keys, block_elements):
            key, value = k[first:last].flatten(0, 1), v[first:last].flatten(0, 1)
            shape = ((last - first) * heads, stop - start, num_keys)
            q_block = _block_view(q, first, last, start, stop)
            d_out_block = _block_view(d_out, first, last, start, stop)
            attn = torch.bmm(q_block, key.transpose(-1, -2), out=_scratch(scores_buffer, *shape)).to(acc)
            attn = attn.sub_(_block_view(lse, first, last, start, stop)).exp_()
            _add_product(grad_v[first:last].flatten(0, 1), attn.transpose(-1, -2).to(v.dtype), d_out_block)
            grad_scores = torch.bmm(d_out_block, value.transpose(-1, -2), out=_scratch(grad_buffer, *shape)).to(acc)
            grad_scores = grad_scores.sub_(_block_view(delta, first, last, start, stop)).mul_(attn).to(k.dtype)
            _add_product(grad_k[first:last].flatten(0, 1), grad_scores.transpose(-1, -2), q_block)
            if q.shape[0] == 1:  # a shared query collects the gradient of every image
                block_grad = torch.bmm(grad_scores, key).unflatten(0, (last - first, heads)).sum(dim=0)
                grad_q[0, :, start:stop] += block_grad.to(acc)
            else:
                _add_product(_block_view(grad_q, first, last, start, stop), grad_scores, key)
    grad_queries = [grad.to(q.dtype) for grad, q in zip(grad_queries, queries, strict=True)]
    return grad_k.to(k.dtype), grad_v.to(v.dtype), grad_queries


class _FusedRowAttention(torch.autograd.Function):
    """_BlockedRowAttention's contract through PyTorch's fused attention kernel: the streams'
    queries are concatenated along the rows (one call shares the keys and values).

    The kernels' backward takes no gradient for the log-sum-exp; it enters through one extra
    feature column. The kernel computes D = rowsum(dO' * O') and dS = P * (dO' v'^T - D); with
    v' = [v, 0], dO' = [dO, 1] and O' = [O, -dL] this is D = rowsum(dO * O) - dL, exactly the
    softmax backward with the log-sum-exp's gradient (q and k get zero columns).
    """

    @staticmethod
    def forward(ctx, k, v, *queries):
        batch = k.shape[0]
        rows = [q.shape[2] for q in queries]
        query = torch.cat([q.expand(batch, -1, -1, -1) for q in queries], dim=2)
        with torch.autocast(k.device.type, enabled=False):
            out, lse, kernel_state = _fused_forward(query, k, v, k.device.type)
        outs = out.split(rows, dim=2)
        lses = lse[..., : sum(rows)].split(rows, dim=-1)
        ctx.save_for_backward(k, v, lse, *queries, *outs)
        ctx.kernel_state = kernel_state
        return (*outs, *lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        k, v, lse, *rest = ctx.saved_tensors
        streams = len(grads) // 2
        queries, outs = rest[:streams], rest[streams:]
        batch, heads, _, head_dim = k.shape
        width = head_dim + _FUSED_PAD[k.device.type]

        def padded(parts, column=None):
            result = k.new_zeros(batch, heads, sum(part.shape[2] for part in parts), width)
            start = 0
            for part in parts:  # a query shared by the batch broadcasts into every image's rows
                result[:, :, start : start + part.shape[2], :head_dim] = part
                start += part.shape[2]
            if column is not None:
                result[..., head_dim] = column
            return result

        grad_lse = torch.cat(grads[streams:], dim=-1)
        with torch.autocast(k.device.type, enabled=False):
            grad_query, grad_k, grad_v = _fused_backward(
                padded(grads[:streams], 1.0), padded(queries), padded([k]), padded([v]),
                padded(outs, -grad_lse), lse, ctx.kernel_state, k.device.type,
            )
        grad_queries = grad_query[..., :head_dim].split([q.shape[2] for q in queries], dim=2)
        grad_queries = [
            grad.sum(dim=0, keepdim=True) if q.shape[0] == 1 < batch else grad
            for grad, q in zip(grad_queries, queries, strict=True)
        ]
        return (grad_k[..., :head_dim], grad_v[..., :head_dim], *grad_queries)


def _fused_forward(query, k, v, kernel):
    """(out, row log-sum-exp, what the backward kernel needs besides them) from kernel "cpu" or
    "cuda"; the scale is folded into q. CUDA's log-sum-exp has its rows padded to a multiple of 32."""
    if kernel == "cuda":
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, k, v, None, True, scale=1.0
        )
        return out, lse, (seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, k, v, scale=1.0)
    return out, lse, ()


def _fused_backward(grad_out, query, k, v, out, lse, kernel_state, kernel):
    if kernel == "cuda":
        seed, offset = kernel_state
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, query, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], scale=1.0
        )
        return grads[:3]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, query, k, v, out, lse, 0.0, False, scale=1.0
    )


class RAdaHead(nn.Module):
    """Masks the rational matrix of CLIP features; see the module docstring.

    Parameters are named as in the authors' code (q_proj1, q_proj2, q_proj3, k_proj,
    v_proj, out_proj) so their trained layers load unchanged. None depends on the number
    of classes, so a head trained on some classes applies to any others.

    attention_impl: "blocked", "fused" or "auto" (fused where fused_attention_available says
    this torch has the kernel for the device and dtype and its backward keeps torch's
    deterministic mode, see fused_attention_nondeterministic; else blocked); see the module docstring.
    """

    def __init__(self, embed_dim, num_heads=8, temperature=1.0, block_elements=DEFAULT_BLOCK_ELEMENTS,
                 attention_impl="auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"RAdaHead: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if temperature <= 0:
            raise ValueError(f"RAdaHead: temperature must be positive, got {temperature}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"RAdaHead: attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {attention_impl!r}"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.temperature = float(temperature)
        self.block_elements = int(block_elements)
        self.attention_impl = attention_impl
        # (device type, dtype) whose CUDA kernel raised under "auto": the blocked loop serves them.
        self._failed_kernels = set()
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
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, temperature={self.temperature}, "
                f"attention_impl={self.attention_impl}")

    def _split_heads(self, x):
        """(..., N, D) -> (..., H, N, D/H), contiguous so that batched products need no copies."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2).contiguous()

    def uses_fused_attention(self, device, dtype):
        """Whether a forward on features of this device and (attention) dtype takes the fused kernel."""
        if self.attention_impl == "blocked":
            return False
        available = fused_attention_available(device, dtype)
        if self.attention_impl == "fused" and not available:
            raise UserFacingError(
                f"RAdaHead: attention_impl 'fused' needs a fused attention kernel for {torch.device(device).type} "
                f"{dtype}, which torch {torch.__version__} does not have; set TRAINER.RADA.ATTENTION_IMPL to auto "
                "or blocked"
            )
        if self.attention_impl == "auto" and (
            fused_attention_nondeterministic(device) or (torch.device(device).type, dtype) in self._failed_kernels
        ):
            return False
        return available

    def _fused_row_attention(self, key, value, queries):
        """The fused kernel's results; None where "auto" meets a CUDA kernel this GPU or build cannot
        run for these inputs (logged once; the blocked loop takes over)."""
        try:
            return _FusedRowAttention.apply(key, value, *queries)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            if self.attention_impl != "auto" or key.device.type not in _FALLBACK_DEVICES:
                raise
            self._failed_kernels.add((key.device.type, key.dtype))
            logger.warning("RAdaHead: the fused attention kernel failed on %s %s (%s); the head uses its blocked "
                           "attention instead (TRAINER.RADA.ATTENTION_IMPL blocked skips this attempt).",
                           key.device, key.dtype, str(error).splitlines()[0][:200])
            return None

    def forward(self, image_features, text_features, logit_scale):
        """Return (logits (B, K), mask (B, K, D)).

        image_features (B, D) and text_features, (K, D) shared by the batch or (B, K, D) per
        image, must be L2-normalised; logit_scale is the multiplier s (already exponentiated), a
        float or a tensor. Inside the attention s is a constant, as in the authors' code; the
        final s * scores keeps its gradient, so a trainable logit scale still learns.
        """
        self._check_shapes(image_features, text_features)
        if not autocast_enabled(image_features.device.type):
            image_features = image_features.to(self.q_proj1.weight.dtype)
            text_features = text_features.to(self.q_proj1.weight.dtype)
        if not torch.is_tensor(logit_scale):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float64)
        scale = logit_scale.to(image_features.device)
        const_scale = scale.detach()
        root_scale = const_scale.sqrt()
        per_image = text_features.dim() == 3
        batch, num_classes = image_features.shape[0], text_features.shape[-2]
        attn_scale = 1.0 / (math.sqrt(self.head_dim) * self.temperature)

        # (B, K, D); shared class features broadcast over the batch.
        rational = image_features.unsqueeze(1) * (text_features if per_image else text_features.unsqueeze(0))
        # s, sqrt(s) and the attention scale are folded into the D x D weights instead of scaling
        # (B, K, D) tensors, and the three maps of the rational matrix run as one product.
        weight = torch.cat([self.k_proj.weight * const_scale, self.v_proj.weight * const_scale,
                            self.q_proj3.weight * (const_scale * attn_scale)])
        bias = torch.cat([self.k_proj.bias, self.v_proj.bias, self.q_proj3.bias * attn_scale])
        projected = F.linear(rational, weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        key, value, q_rational = projected.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # each (B, H, K, dh)
        query_scale = root_scale * attn_scale
        q_image = F.linear(image_features, self.q_proj1.weight * query_scale, self.q_proj1.bias * attn_scale)
        q_text = F.linear(text_features, self.q_proj2.weight * query_scale, self.q_proj2.bias * attn_scale)

        # Q1: all rows equal, so the global softmax times K is one row softmax over the keys.
        q_image = q_image.unflatten(-1, (self.num_heads, self.head_dim)).unsqueeze(-2)  # (B, H, 1, dh)
        image_scores = torch.matmul(q_image, key.transpose(-1, -2))
        image_weights = torch.softmax(image_scores.to(_accumulation_dtype(value.dtype)), dim=-1)
        mixed = torch.matmul(image_weights.to(value.dtype), value)  # (B, H, 1, dh), broadcast over class rows
        # Q2 (shared by the batch and not expanded, (1, H, K, dh), or per image, (B, H, K, dh)) and
        # Q3: row attention, then the global re-weighting, whose log-sum-exp runs over each image's rows.
        q_text = self._split_heads(q_text)
        queries = (q_text if per_image else q_text.unsqueeze(0), q_rational)
        results = None
        if self.uses_fused_attention(key.device, key.dtype):
            results = self._fused_row_attention(key, value, queries)
        if results is None:
            results = _BlockedRowAttention.apply(self.block_elements, key, value, *queries)
        for out, row_lse in zip(results[:2], results[2:], strict=True):
            weights = torch.exp(row_lse - torch.logsumexp(row_lse, dim=-1, keepdim=True)) * num_classes
            mixed = mixed + out * weights.unsqueeze(-1)
        mixed = (mixed / 3).transpose(1, 2).reshape(batch, num_classes, self.embed_dim)
        # relu(1 + m) - 1 == max(m, -1): keep the deviation from 1, so M == 1 adds exactly 0.
        deviation = self.out_proj(mixed).clamp(min=-1.0)
        # CLIP's own expression first, so an all-ones mask reproduces its logits bit for bit.
        logits = clip_logits(scale, image_features, text_features)
        logits = logits + scale * (deviation * rational).sum(dim=-1)
        return logits, deviation + 1.0

    def _check_shapes(self, image_features, text_features):
        if image_features.dim() != 2 or text_features.dim() not in (2, 3):
            raise ValueError(
                "RAdaHead expects image_features (B, D) and text_features (K, D) or (B, K, D), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[1] != self.embed_dim or text_features.shape[-1] != self.embed_dim:
            raise ValueError(
                f"RAdaHead was built for width {self.embed_dim}, got features of width "
                f"{image_features.shape[1]} (image) and {text_features.shape[-1]} (text)"
            )
        if text_features.dim() == 3 and text_features.shape[0] != image_features.shape[0]:
            raise ValueError(
                f"RAdaHead got per-image text features for {text_features.shape[0]} images "
                f"{tuple(text_features.shape)} but {image_features.shape[0]} images {tuple(image_features.shape)}; "
                "per-image text features (B, K, D) need one set of K class features per image"
            )

    @staticmethod
    def mask_regularizer(mask):
        """mean over the batch of max_{k,d} |M - 1|: the L-infinity pull of the mask to 1."""
        return (mask - 1.0).abs().flatten(1).amax(dim=1).mean()


def clip_logits(scale, image_features, text_features):
    """CLIP's logits s * <f, t_k> (B, K): the head's logits where its mask is all ones.

    text_features (K, D) shared by the batch: CLIP's (and CoOp's) own expression s * f @ t^T.
    (B, K, D) per image: the same per image, as one batched product.
    """
    if text_features.dim() == 2:
        return scale * image_features @ text_features.t()
    if text_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"Per-image text features {tuple(text_features.shape)} do not match image features "
            f"{tuple(image_features.shape)}: one set of class features per image is needed"
        )
    return torch.matmul((scale * image_features).unsqueeze(1), text_features.transpose(-1, -2)).squeeze(1)


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
    if rada.ATTENTION_IMPL not in ATTENTION_IMPLS:
        raise UserFacingError(
            f"TRAINER.RADA.ATTENTION_IMPL must be one of {', '.join(ATTENTION_IMPLS)}, got {rada.ATTENTION_IMPL!r}"
        )
    return RAdaHead(embed_dim, num_heads=rada.NUM_HEADS, temperature=rada.TEMP, attention_impl=rada.ATTENTION_IMPL)
