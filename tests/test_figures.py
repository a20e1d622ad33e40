"""figures/: the mask statistics against a direct computation, and the PNGs they draw (no Dassl)."""

import numpy as np
import pytest
import torch
from PIL import Image

from figures.head import BINS_PER_UNIT, MaskStatistics, plot_mask_histogram, plot_rational_matrix
from figures.style import DPI
from trainers.model.rada_head import RAdaHead


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def random_masks(batches=3, batch=4, classes=6, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        mask = torch.relu(1 + 0.8 * torch.randn(batch, classes, dim, generator=generator))  # zeros included
        labels = torch.randint(classes, (batch,), generator=generator)
        yield mask, labels, torch.randn(batch, classes, generator=generator), torch.randn(batch, classes, generator=generator)


def test_streamed_statistics_equal_the_direct_computation():
    statistics = MaskStatistics()
    batches = list(random_masks())
    for mask, labels, logits, zero_shot in batches:
        statistics.add(mask, labels, logits, zero_shot)
    summary = statistics.summary()

    masks = torch.cat([b[0] for b in batches]).double()
    labels = torch.cat([b[1] for b in batches])
    true_rows = masks[torch.arange(len(labels)), labels]
    is_true = torch.zeros(masks.shape[:2], dtype=torch.bool)
    is_true[torch.arange(len(labels)), labels] = True
    other_rows = masks[~is_true]
    assert (masks == 0).any(), "the fixture must contain clipped entries"
    for group, values in (("all", masks), ("true_class", true_rows), ("other_classes", other_rows)):
        stats = summary[group]
        assert sum(stats["counts"]) == stats["entries"] == values.numel()
        assert stats["clipped_share"] == pytest.approx(float((values == 0).double().mean()), abs=1e-15)
        assert stats["mean_abs_deviation"] == pytest.approx(float((values - 1).abs().mean()), rel=1e-12)
        expected = np.bincount(np.floor(values.flatten().numpy() * BINS_PER_UNIT).astype(int))
        assert stats["counts"] == expected.tolist()
    batch, classes, dim = masks.shape
    assert summary["all"]["entries"] == batch * classes * dim
    assert summary["true_class"]["entries"] == batch * dim
    assert summary["other_classes"]["entries"] == batch * (classes - 1) * dim
    logits = torch.cat([b[2] for b in batches])
    assert summary["accuracy"]["rada"] == pytest.approx(100 * float((logits.argmax(1) == labels).double().mean()))


def test_identity_head_is_a_single_spike_at_one(tmp_path):
    head = RAdaHead(embed_dim=16, num_heads=4)  # zero output map: M = 1 exactly
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(7, 16), dim=-1)
    logits, mask = head(features, texts, 100.0)
    statistics = MaskStatistics()
    statistics.add(mask, torch.arange(5), logits, logits)
    summary = statistics.summary()
    for group in ("all", "true_class", "other_classes"):
        counts = summary[group]["counts"]
        assert [i for i, c in enumerate(counts) if c] == [BINS_PER_UNIT]  # the one bin [1, 1 + 1/50)
        assert summary[group]["share_exactly_one"] == 1.0
        assert summary[group]["clipped_share"] == 0.0 and summary[group]["mean_abs_deviation"] == 0.0
    path = plot_mask_histogram(summary, tmp_path / "identity.png")
    assert png_size(path) == (11 * DPI, int(4.2 * DPI))


def test_rational_matrix_figure_sorts_by_the_true_class(tmp_path):
    generator = torch.Generator().manual_seed(1)
    rational = torch.randn(4, 24, generator=generator).numpy() / 10
    mask = torch.relu(1 + torch.randn(4, 24, generator=generator)).numpy()
    image = torch.rand(32, 32, 3, generator=generator).numpy()
    path, order = plot_rational_matrix(image, rational, mask, ["a", "b", "c", "d"], tmp_path / "r.png", title="t",
                                       clip_logits=[1, 2, 3, 4], rada_logits=[4, 3, 2, 1])
    assert png_size(path) == (13 * DPI, int(6.5 * DPI))
    assert sorted(order.tolist()) == list(range(24))
    assert np.all(np.diff(rational[0, order]) <= 0)
