"""DETERMINISTIC: the switches it sets for reproducible GPU runs, and the RAda head's choice of
attention under torch's deterministic mode (CUDA's fused backward is deterministic only in the
strict mode). Global torch state is put back after each test."""

import os

import pytest
import torch

from trainers.model.rada_head import RAdaHead
from trainers.runs.random_state import CUBLAS_WORKSPACE, torch_switches_restored, use_deterministic_algorithms


@pytest.fixture
def torch_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with torch_switches_restored():
        yield


def test_deterministic_sets_every_switch(torch_switches):
    torch.backends.cudnn.benchmark = True  # as train.py sets it for CUDA runs
    use_deterministic_algorithms()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_the_users_cublas_setting_is_kept(torch_switches, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("warn_only,auto_on_cuda", [(True, False), (False, True)])
def test_auto_leaves_the_cuda_kernel_when_its_backward_would_not_be_deterministic(
    torch_switches, warn_only, auto_on_cuda
):
    auto, fused = RAdaHead(64, 8, attention_impl="auto"), RAdaHead(64, 8, attention_impl="fused")
    assert auto.uses_fused_attention("cuda", torch.float32)  # this torch has the kernel (also in CPU builds)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    assert auto.uses_fused_attention("cuda", torch.float32) == auto_on_cuda
    assert auto.uses_fused_attention("cpu", torch.float32)  # the CPU kernel's backward is deterministic
    assert fused.uses_fused_attention("cuda", torch.float32)  # forced by the user: kept


@pytest.mark.parametrize("impl", ["blocked", "fused"])
def test_deterministic_mode_leaves_the_heads_results_unchanged(torch_switches, impl):
    """In deterministic mode torch fills new tensors with NaN, so a read of a buffer before it is
    written would show; the blocked loop, which CUDA uses then, reuses scratch buffers."""
    torch.manual_seed(0)
    head = RAdaHead(64, 8, attention_impl=impl, block_elements=1 << 12)  # small blocks: many buffer reuses
    for param in head.parameters():
        torch.nn.init.normal_(param, std=0.1)
    image = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(37, 64), dim=-1).requires_grad_()

    def values_and_gradients():
        image.grad = text.grad = None
        head.zero_grad()
        logits, mask = head(image, text, 50.0)
        (logits.sum() + mask.square().mean()).backward()
        return [logits.detach(), mask.detach(), image.grad, text.grad, *(p.grad for p in head.parameters())]

    expected = values_and_gradients()
    use_deterministic_algorithms()
    assert torch.utils.deterministic.fill_uninitialized_memory
    actual = values_and_gradients()
    assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))
