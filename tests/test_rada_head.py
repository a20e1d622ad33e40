import math

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import requires_cpu_half
from tests.dense_rada import dense_reference
from trainers.model.rada_head import RAdaHead


def random_head(dim, heads, temperature, dtype=torch.float64, seed=0, block_elements=None, attention_impl="blocked"):
    """A head with random weights; the blocked loop unless told (tests/test_rada_fused.py covers the fused path)."""
    torch.manual_seed(seed)
    kwargs = {} if block_elements is None else {"block_elements": block_elements}
    head = RAdaHead(dim, num_heads=heads, temperature=temperature, attention_impl=attention_impl, **kwargs).to(dtype)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 1.0 / math.sqrt(dim))
    return head


def normalized(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


CASES = [
    # batch, classes, width, heads, temperature, block elements (small values force many blocks)
    (1, 1, 8, 1, 1.0, None),
    (2, 5, 16, 4, 1.0, 16),
    (3, 17, 32, 8, 0.5, 64),
    (4, 40, 64, 8, 2.0, 300),
    (2, 64, 48, 6, 1.0, None),
]


@pytest.mark.parametrize("batch,classes,dim,heads,temperature,block", CASES)
def test_matches_dense_reference_in_float64(batch, classes, dim, heads, temperature, block):
    head = random_head(dim, heads, temperature, block_elements=block)
    image, text = normalized(batch, dim), normalized(classes, dim)
    logits, mask = head(image, text, 100.0)
    ref_logits, ref_mask = dense_reference(head, image, text, 100.0)
    assert logits.shape == (batch, classes) and mask.shape == (batch, classes, dim)
    assert relative_error(logits, ref_logits) < 1e-9
    assert relative_error(mask, ref_mask) < 1e-9
    # The random weights must make the mask depart from 1, or the comparison proves little.
    assert (ref_mask - 1).abs().max() > 0.05


@pytest.mark.parametrize("batch,classes,dim,heads,temperature,block", CASES[1:4])
def test_gradients_match_dense_reference(batch, classes, dim, heads, temperature, block):
    head = random_head(dim, heads, temperature, block_elements=block)
    image = normalized(batch, dim).requires_grad_()
    text = normalized(classes, dim).requires_grad_()
    weights = torch.randn(batch, classes, dtype=torch.float64)

    def grads(forward):
        head.zero_grad()
        image.grad = text.grad = None
        logits, mask = forward(head, image, text, 30.0)
        ((logits * weights).sum() + mask.square().sum()).backward()
        named = {name: p.grad.clone() for name, p in head.named_parameters()}
        return named, image.grad.clone(), text.grad.clone()

    ours, ref = grads(RAdaHead.forward), grads(dense_reference)
    for name in ref[0]:
        assert relative_error(ours[0][name], ref[0][name]) < 1e-9, name
    assert relative_error(ours[1], ref[1]) < 1e-9
    assert relative_error(ours[2], ref[2]) < 1e-9


def test_gradcheck_small_case():
    head = random_head(8, 2, 0.7, block_elements=6)
    image = normalized(2, 8).requires_grad_()
    text = normalized(5, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, t: head(f, t, 10.0), (image, text))


def test_initial_head_reproduces_clip_logits_exactly():
    torch.manual_seed(1)
    head = RAdaHead(64, num_heads=8)
    image, text = normalized(6, 64, dtype=torch.float32), normalized(11, 64, dtype=torch.float32)
    scale = torch.tensor(4.6052).exp()
    logits, mask = head(image, text, scale)
    assert torch.equal(logits, scale * image @ text.t())
    assert torch.equal(mask, torch.ones_like(mask))
    assert head.mask_regularizer(mask).item() == 0.0


def test_mask_regularizer_is_batch_mean_of_max_deviation():
    mask = torch.ones(2, 3, 4)
    mask[0, 1, 2] = 1.5
    mask[0, 2, 0] = 0.8
    mask[1, 0, 3] = 0.0
    assert RAdaHead.mask_regularizer(mask).item() == pytest.approx((0.5 + 1.0) / 2)


def test_parameters_do_not_depend_on_the_number_of_classes():
    head = random_head(16, 4, 1.0)
    shapes = {name: tuple(p.shape) for name, p in head.named_parameters()}
    assert set(shapes) == {
        f"{layer}.{kind}"
        for layer in ("q_proj1", "q_proj2", "q_proj3", "k_proj", "v_proj", "out_proj")
        for kind in ("weight", "bias")
    }
    assert all(shape in ((16, 16), (16,)) for shape in shapes.values())
    image = normalized(2, 16)
    for classes in (3, 30):
        logits, mask = head(image, normalized(classes, 16), 50.0)
        assert logits.shape == (2, classes)


@pytest.mark.parametrize("per_image", [False, True], ids=["shared-text", "per-image-text"])
def test_no_saved_tensor_grows_quadratically_in_classes(per_image):
    batch, classes, dim, heads = 2, 96, 16, 4
    head = random_head(dim, heads, 1.0, dtype=torch.float32, block_elements=4096)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    text = normalized(*((batch,) if per_image else ()), classes, dim, dtype=torch.float32)  # (B, K, D) or (K, D)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, mask = head(normalized(batch, dim, dtype=torch.float32), text, 100.0)
    logits.sum().backward()
    assert max(saved) <= batch * classes * dim
    assert max(saved) < batch * heads * classes * classes / 10


def test_dense_reference_saves_quadratic_tensors():
    """Guards the test above: the same hook does see K x K tensors in the dense formulation."""
    batch, classes, dim = 2, 96, 16
    head = random_head(dim, 4, 1.0, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dense_reference(head, normalized(batch, dim, dtype=torch.float32), normalized(classes, dim, dtype=torch.float32), 100.0)
    assert max(saved) >= batch * 4 * classes * classes


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=requires_cpu_half)])
def test_runs_under_cpu_autocast(dtype):
    head = random_head(32, 8, 1.0, dtype=torch.float32, block_elements=200)
    image = normalized(4, 32, dtype=torch.float32).requires_grad_()
    text = normalized(10, 32, dtype=torch.float32)
    reference, _ = head(image, text, 100.0)
    with torch.autocast("cpu", dtype=dtype):
        logits, mask = head(image, text, 100.0)
    assert torch.isfinite(logits).all()
    assert relative_error(logits.float(), reference) < 0.05
    logits.float().sum().backward()
    assert torch.isfinite(image.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_fp16_features_outside_autocast_are_computed_in_fp32():
    head = random_head(16, 4, 1.0, dtype=torch.float32)
    image, text = normalized(2, 16, dtype=torch.float32), normalized(3, 16, dtype=torch.float32)
    logits, _ = head(image.half(), text.half(), 100.0)
    expected, _ = head(image.half().float(), text.half().float(), 100.0)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, expected)


def test_learns_a_synthetic_task():
    torch.manual_seed(0)
    dim, classes, samples = 16, 4, 512
    text = normalized(classes, dim, dtype=torch.float32)
    # The true rule reweights the dimensions of the rational matrix; plain CLIP scores ignore it.
    dim_weights = torch.rand(dim) * 3
    image = normalized(samples, dim, dtype=torch.float32)
    labels = ((image[:, None, :] * text[None]) * dim_weights).sum(-1).argmax(-1)
    head = RAdaHead(dim, num_heads=4)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        logits, mask = head(image, text, 20.0)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (head(image, text, 20.0)[0].argmax(-1) == labels).float().mean().item()
        zero_shot = ((image @ text.t()).argmax(-1) == labels).float().mean().item()
    assert losses[-1] < 0.6 * losses[0]
    assert accuracy > max(1.0 / classes + 0.3, zero_shot + 0.1)


def test_rejects_mismatched_widths():
    head = RAdaHead(16, num_heads=4)
    with pytest.raises(ValueError, match="width 16"):
        head(normalized(2, 8, dtype=torch.float32), normalized(3, 8, dtype=torch.float32), 1.0)
    with pytest.raises(ValueError, match="divisible"):
        RAdaHead(10, num_heads=4)
