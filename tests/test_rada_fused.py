"""The head's fused attention path (PyTorch's fused kernels with the row log-sum-exp) and the
choice between it and the blocked loop.

The fused path runs on the CPU through PyTorch's CPU flash-attention kernel where this torch has
it; its CUDA kernel is exercised by bench/gpu_check.sh, and here only on "meta" tensors (shapes and
operator signatures)."""

import copy

import pytest
import torch

from tests.dense_rada import dense_reference
from tests.test_rada_head import CASES, normalized, random_head, relative_error
from trainers.config import ATTENTION_IMPLS as config_attention_impls
from trainers.config import check_values, defaults
from trainers.errors import UserFacingError
from trainers.model import rada_head as rada_head_module
from trainers.model.rada_head import RAdaHead, fused_attention_available, rada_head

requires_cpu_fused = pytest.mark.skipif(
    not fused_attention_available("cpu", torch.float64),
    reason=f"torch {torch.__version__} has no CPU flash-attention kernel returning the log-sum-exp",
)


def head_and_inputs(batch, classes, dim, heads, temperature, dtype, impl="fused", block=None):
    head = random_head(dim, heads, temperature, dtype=dtype, block_elements=block, attention_impl=impl)
    image = normalized(batch, dim, dtype=dtype).requires_grad_()
    text = normalized(classes, dim, dtype=dtype).requires_grad_()
    return head, image, text


def gradient_error(actual, expected):
    """Relative error; absolute where the exact gradient is zero (one class: the attention is constant)."""
    return relative_error(actual, expected) if expected.norm() > 0 else actual.abs().max().item()


def values_and_grads(forward, head, image, text, scale, weights):
    head.zero_grad()
    image.grad = text.grad = None
    logits, mask = forward(head, image, text, scale)
    ((logits * weights).sum() + mask.square().sum()).backward()
    grads = {name: p.grad.clone() for name, p in head.named_parameters()}
    grads["image"], grads["text"] = image.grad.clone(), text.grad.clone()
    return logits.detach(), mask.detach(), grads


@requires_cpu_fused
@pytest.mark.parametrize("batch,classes,dim,heads,temperature,block", CASES)
def test_fused_matches_dense_reference_in_float64(batch, classes, dim, heads, temperature, block):
    head, image, text = head_and_inputs(batch, classes, dim, heads, temperature, torch.float64)
    weights = torch.randn(batch, classes, dtype=torch.float64)
    logits, mask, grads = values_and_grads(RAdaHead.forward, head, image, text, 30.0, weights)
    ref_logits, ref_mask, ref_grads = values_and_grads(dense_reference, head, image, text, 30.0, weights)
    assert (ref_mask - 1).abs().max() > 0.05  # the weights make the mask depart from 1
    assert relative_error(logits, ref_logits) < 1e-9
    assert relative_error(mask, ref_mask) < 1e-9
    for name, ref in ref_grads.items():
        assert gradient_error(grads[name], ref) < 1e-9, name


@requires_cpu_fused
@pytest.mark.parametrize("batch,classes,dim,heads,temperature,block", CASES[1:])
def test_fused_and_blocked_in_float32_match_dense_in_float64(batch, classes, dim, heads, temperature, block):
    head, image, text = head_and_inputs(batch, classes, dim, heads, temperature, torch.float64)
    weights = torch.randn(batch, classes, dtype=torch.float64)
    truth = values_and_grads(dense_reference, head, image, text, 100.0, weights)
    # A gradient that nearly cancels (q_proj3.bias at 5 classes: 1e-5 of the others) is compared at
    # a thousandth of the largest gradient's size, as float32 rounding allows.
    floor = 1e-3 * max(grad.norm() for grad in truth[2].values())
    for impl in ("fused", "blocked"):
        head32 = copy.deepcopy(head).float()
        head32.attention_impl, head32.block_elements = impl, block or head.block_elements
        logits, mask, grads = values_and_grads(RAdaHead.forward, head32, image.detach().float().requires_grad_(),
                                               text.detach().float().requires_grad_(), 100.0, weights.float())
        assert relative_error(logits.double(), truth[0]) < 1e-5, impl
        assert relative_error(mask.double(), truth[1]) < 1e-5, impl
        for name, ref in truth[2].items():
            error = (grads[name].double() - ref).norm() / max(ref.norm(), floor)
            assert error < 1e-3, (impl, name)


@requires_cpu_fused
def test_fused_gradcheck_small_case():
    head = random_head(8, 2, 0.7, attention_impl="fused")
    image, text = normalized(2, 8).requires_grad_(), normalized(5, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, t: head(f, t, 10.0), (image, text))


@requires_cpu_fused
def test_fused_initial_head_reproduces_clip_logits_exactly():
    torch.manual_seed(1)
    head = RAdaHead(64, num_heads=8, attention_impl="fused")
    image, text = normalized(6, 64, dtype=torch.float32), normalized(11, 64, dtype=torch.float32)
    scale = torch.tensor(4.6052).exp()
    logits, mask = head(image, text, scale)
    assert torch.equal(logits, scale * image @ text.t())
    assert torch.equal(mask, torch.ones_like(mask))


@requires_cpu_fused
def test_fused_runs_under_cpu_autocast():
    head, image, text = head_and_inputs(4, 10, 32, 8, 1.0, torch.float32)
    reference, _ = head(image, text, 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = head(image, text, 100.0)
    assert relative_error(logits.float(), reference) < 0.05
    logits.float().sum().backward()
    assert torch.isfinite(image.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_auto_takes_the_fused_kernel_exactly_where_it_exists():
    head = RAdaHead(16, num_heads=4)
    for device, dtype in (("cpu", torch.float32), ("cpu", torch.float64), ("meta", torch.float32)):
        assert head.uses_fused_attention(device, dtype) == fused_attention_available(device, dtype)
    assert not RAdaHead(16, num_heads=4, attention_impl="blocked").uses_fused_attention("cpu", torch.float32)


def test_forcing_fused_where_no_kernel_exists_names_the_setting():
    head = RAdaHead(16, num_heads=4, attention_impl="fused")
    with pytest.raises(UserFacingError, match="ATTENTION_IMPL"):
        head.uses_fused_attention("meta", torch.float32)


@requires_cpu_fused
def test_auto_survives_a_failing_kernel_where_fallback_is_allowed(monkeypatch, caplog):
    """On CUDA a build or GPU may lack the kernel for some inputs: auto logs it once and continues with
    the blocked loop (exercised here on the CPU by allowing the fallback there)."""
    attempts = []

    def failing_kernel(*args):
        attempts.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    auto, image, text = head_and_inputs(3, 7, 16, 4, 1.0, torch.float32, impl="auto")
    blocked = copy.deepcopy(auto)
    blocked.attention_impl = "blocked"
    monkeypatch.setattr(rada_head_module, "_FALLBACK_DEVICES", ("cpu",))
    monkeypatch.setattr(rada_head_module._FusedRowAttention, "apply", failing_kernel)
    for _ in range(2):
        logits, mask = auto(image, text, 50.0)
        expected_logits, expected_mask = blocked(image, text, 50.0)
        assert torch.equal(logits, expected_logits) and torch.equal(mask, expected_mask)
    assert len(attempts) == 1 and caplog.text.count("fused attention kernel failed") == 1
    assert not auto.uses_fused_attention("cpu", torch.float32) and auto.uses_fused_attention("cpu", torch.float64)

    forced = copy.deepcopy(auto)
    forced.attention_impl = "fused"
    with pytest.raises(RuntimeError, match="no kernel image"):
        forced(image, text, 50.0)
    monkeypatch.setattr(rada_head_module, "_FALLBACK_DEVICES", ("cuda",))
    with pytest.raises(RuntimeError, match="no kernel image"):  # on the CPU an error is a bug: raised
        rada_head_module.RAdaHead(16, 4, attention_impl="auto")(image, text, 50.0)


def test_config_key_reaches_the_head_and_rejects_unknown_values():
    cfg = defaults()
    assert cfg.TRAINER.RADA.ATTENTION_IMPL == "auto"
    cfg.TRAINER.RADA.ATTENTION_IMPL = "blocked"
    assert rada_head(cfg, 16).attention_impl == "blocked"
    cfg.TRAINER.RADA.ATTENTION_IMPL = "flash"
    with pytest.raises(UserFacingError, match="TRAINER.RADA.ATTENTION_IMPL"):
        rada_head(cfg, 16)


def test_config_rule_allows_exactly_the_heads_implementations():
    assert config_attention_impls == rada_head_module.ATTENTION_IMPLS
    cfg = defaults()
    cfg.TRAINER.RADA.ATTENTION_IMPL = "flash"
    with pytest.raises(UserFacingError, match="TRAINER.RADA.ATTENTION_IMPL is 'flash'"):
        check_values(cfg)


def test_cuda_kernel_calls_fit_the_operators_on_meta_tensors():
    """The CUDA branch's operator calls, with the shapes the head passes (shapes only: "meta")."""
    batch, heads, rows, keys, width = 2, 4, 10, 5, 8 + rada_head_module._FUSED_PAD["cuda"]
    query = torch.empty(batch, heads, rows, width, device="meta", dtype=torch.float16)
    key = torch.empty(batch, heads, keys, width, device="meta", dtype=torch.float16)
    out, lse, state = rada_head_module._fused_forward(query, key, key, "cuda")
    assert out.shape == query.shape and lse.shape[:2] == (batch, heads) and lse.shape[2] >= rows
    grads = rada_head_module._fused_backward(out, query, key, key, out, lse, state, "cuda")
    assert [g.shape for g in grads] == [query.shape, key.shape, key.shape]
