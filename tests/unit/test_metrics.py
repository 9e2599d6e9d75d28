"""Unit tests for mve.metrics (expected values worked out by hand in each test)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mve.metrics import (
    ConfusionMatrix,
    MeanAccumulator,
    accuracy_from_logits,
    bits_per_dim,
    classification_metrics,
    per_class_table,
    psnr,
    ssim,
)

# 4 classes, 8 samples. Class "c" has support but is never predicted; class "d" has no support
# but is predicted once -> both exercise zero divisions.
NAMES = ["a", "b", "c", "d"]
TARGETS = [0, 0, 0, 1, 1, 2, 2, 2]
PREDS = [0, 1, 0, 1, 0, 0, 0, 3]
EXPECTED_CM = [
    [2, 1, 0, 0],  # true a: 2 -> a, 1 -> b
    [1, 1, 0, 0],  # true b: 1 -> a, 1 -> b
    [2, 0, 0, 1],  # true c: 2 -> a, 1 -> d
    [0, 0, 0, 0],  # true d: none
]


def _hand_metrics() -> dict:
    # a: tp=2, support=3, predicted=5; b: tp=1, support=2, predicted=2; c, d: tp=0.
    recall = [2 / 3, 1 / 2, 0.0, 0.0]
    precision = [2 / 5, 1 / 2, 0.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    return {"recall": recall, "precision": precision, "f1": f1, "support": [3, 2, 3, 0]}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_confusion_matrix_counts_and_metrics(dtype: torch.dtype) -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor(PREDS, dtype=dtype), torch.tensor(TARGETS, dtype=dtype))
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.device.type == "cpu"
    assert cm.matrix.tolist() == EXPECTED_CM

    m = cm.compute(NAMES)
    hand = _hand_metrics()
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["num_samples"] == 8
    assert m["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert m["macro_precision"] == pytest.approx((2 / 5 + 1 / 2) / 4)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5) / 4)  # f1(a) = f1(b) = 0.5
    assert hand["f1"][0] == pytest.approx(0.5)
    for i, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert pc["accuracy"] == pytest.approx(hand["recall"][i])
        assert pc["precision"] == pytest.approx(hand["precision"][i])
        assert pc["f1"] == pytest.approx(hand["f1"][i])
        assert pc["support"] == hand["support"][i]
        assert all(not math.isnan(v) for v in (pc["accuracy"], pc["precision"], pc["f1"]))
    assert m["confusion_matrix"] == EXPECTED_CM
    json.dumps(m)  # must be JSON-serialisable


def test_default_class_names_and_empty_matrix_has_no_nan() -> None:
    m = ConfusionMatrix(3).compute()
    assert list(m["per_class"]) == ["0", "1", "2"]
    flat = [m["accuracy"], m["mean_class_accuracy"], m["macro_f1"], m["macro_precision"]]
    assert flat == [0.0, 0.0, 0.0, 0.0]
    assert m["num_samples"] == 0


def test_merge_equals_single_accumulation() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (200,), generator=g)
    targets = torch.randint(0, 5, (200,), generator=g)
    single = ConfusionMatrix(5)
    single.update(preds, targets)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(preds[:70], targets[:70])
    b.update(preds[70:], targets[70:])
    a.merge(b)
    assert torch.equal(a.matrix, single.matrix)
    assert int(single.matrix.sum()) == 200
    # reference count by a plain loop
    ref = torch.zeros(5, 5, dtype=torch.int64)
    for p, t in zip(preds.tolist(), targets.tolist(), strict=True):
        ref[t, p] += 1
    assert torch.equal(single.matrix, ref)
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(4))


def test_update_accepts_logits_and_validates() -> None:
    cm = ConfusionMatrix(3)
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    cm.update(logits, torch.tensor([0, 1]))
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    cm.update(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert int(cm.matrix.sum()) == 2
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="equal length"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.tensor([0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(torch.zeros(3, 3, dtype=torch.int64), ["x", "y"])


def test_per_class_table() -> None:
    m = classification_metrics(torch.tensor(EXPECTED_CM), NAMES)
    table = per_class_table(m)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Class", "Accuracy (%)", "Precision (%)", "F1 (%)", "Support"]
    assert set(lines[1]) <= {"|", "-"}
    rows = {}
    for line in lines[2 : 2 + len(NAMES)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    # a: recall 2/3 -> 66.7, precision 2/5 -> 40.0, f1 0.5 -> 50.0
    assert rows["a"] == ["66.7", "40.0", "50.0", "3"]
    assert rows["b"] == ["50.0", "50.0", "50.0", "2"]
    assert rows["c"] == ["0.0", "0.0", "0.0", "3"]
    assert rows["d"] == ["0.0", "0.0", "0.0", "0"]
    assert lines[2 + len(NAMES)] == ""
    assert "Overall accuracy: 37.5%" in table  # 3/8
    assert "Mean per-class accuracy: 29.2%" in table  # 7/24
    assert "Macro F1: 25.0%" in table
    assert "Loss" not in table
    with_loss = per_class_table({**m, "loss": 0.12345}, digits=2)
    assert "Loss: 0.1235" in with_loss
    assert "| 66.67" in with_loss


def test_accuracy_from_logits() -> None:
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert accuracy_from_logits(logits, torch.tensor([1, 0, 0, 1])) == pytest.approx(0.5)
    assert accuracy_from_logits(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)) == 0.0


def test_psnr() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 10*log10(1/0.01) = 20 dB
    y[1] += 0.01  # mse 1e-4 -> 40 dB
    out = psnr(x, y)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert psnr(x, x).tolist() == [100.0, 100.0]
    # data_range scales: uint8 offset of 10 with range 255 -> 20*log10(255/10)
    a = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    b = a + 10
    assert psnr(a, b, data_range=255.0).item() == pytest.approx(20 * math.log10(25.5), abs=1e-3)
    with pytest.raises(ValueError):
        psnr(x, x[:, :2])


def _reference_ssim_single(x: np.ndarray, y: np.ndarray, win: int, sigma: float) -> float:
    """Naive per-position SSIM over valid windows of one 2-D channel (independent reference)."""
    c1, c2 = 0.01**2, 0.03**2
    ax = np.arange(win) - (win - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            px, py = x[i : i + win, j : j + win], y[i : i + win, j : j + win]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(
                (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(vals))


def test_ssim_against_naive_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 14, 13))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    ref = np.mean([_reference_ssim_single(x[0, c], y[0, c], 11, 1.5) for c in range(2)])
    got = ssim(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert got == pytest.approx(ref, abs=1e-6)


def test_ssim_constant_images_closed_form() -> None:
    mx, my = 0.3, 0.6
    x = torch.full((1, 3, 32, 32), mx)
    y = torch.full((1, 3, 32, 32), my)
    c1 = 0.01**2  # variances are zero, so the contrast/structure term is c2 / c2 = 1
    expected = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_properties() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    small = ssim(x, (x + 0.05 * noise).clamp(0, 1))
    large = ssim(x, (x + 0.3 * noise).clamp(0, 1))
    assert small.shape == (2,)
    assert bool((small < 0.999).all()) and bool((large < small).all())
    y = (x + 0.1 * noise).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    # a 3-D input is treated as a batch of one
    assert ssim(x[0], y[0]).shape == (1,)
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_ssim_matches_skimage_if_available() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(3)
    x = rng.random((3, 32, 32))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    ref = metrics.structural_similarity(
        x,
        y,
        channel_axis=0,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(ref, abs=1e-4)


def test_bits_per_dim() -> None:
    d = 3 * 32 * 32
    nats = 3.0 * d * math.log(2)  # exactly 3 bits per dim
    assert bits_per_dim(nats, d) == pytest.approx(3.0)
    assert bits_per_dim(torch.tensor([nats, 3 * nats]), d) == pytest.approx(6.0)  # averaged
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0)


def test_mean_accumulator() -> None:
    acc = MeanAccumulator()
    acc.update({"loss": 1.0, "acc": 0.5}, n=1)
    acc.update({"loss": torch.tensor(4.0)}, n=3)
    out = acc.compute()
    assert out["loss"] == pytest.approx((1.0 + 3 * 4.0) / 4)
    assert out["acc"] == pytest.approx(0.5)  # only seen with n=1
    other = MeanAccumulator()
    other.update({"loss": 0.0}, n=4)
    acc.merge(other)
    assert acc.compute()["loss"] == pytest.approx(13.0 / 8)
    acc.reset()
    assert acc.compute() == {}


def test_ssim_is_computed_in_fp32_under_bf16_autocast():
    # bf16 convolutions would make the local variances garbage (seen as SSIM = inf)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ssim(x, y)
    assert torch.allclose(under, ssim(x, y)) and torch.isfinite(under).all()
