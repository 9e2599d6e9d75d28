"""Unit tests for mve.plots: each plot must be a readable PNG, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mve.plots import plot_confusion_matrix, plot_image_grid, plot_learning_curves

CIFAR = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _check_png(path: Path) -> Image.Image:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode in ("RGB", "RGBA")
        assert img.width > 0 and img.height > 0
        img.load()
        out = img.convert("RGB")
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    return out


def test_confusion_matrix_ten_classes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    cm = torch.randint(0, 20, (10, 10), generator=g) + torch.eye(10, dtype=torch.int64) * 300
    cm[3] = 0  # a class without support must not break the normalisation
    out = plot_confusion_matrix(cm, CIFAR, tmp_path / "nested" / "dir" / "cm.png")
    assert out == tmp_path / "nested" / "dir" / "cm.png"
    img = _check_png(out)
    assert img.width >= 600 and img.height >= 600  # readable at 10 classes
    counts = plot_confusion_matrix(
        cm.tolist(), CIFAR, tmp_path / "counts.png", normalize=False, title="counts"
    )
    _check_png(counts)


def test_confusion_matrix_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(torch.zeros(3, 3), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(torch.zeros(3, 2), ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_learning_curves_single_epoch(tmp_path: Path) -> None:
    hist = [
        {
            "epoch": 1,
            "train_loss": 1.2,
            "val_loss": 1.1,
            "train_accuracy": 0.4,
            "val_accuracy": 0.45,
            "lr": 0.1,
        }
    ]
    _check_png(plot_learning_curves(hist, tmp_path / "one.png", title="one epoch"))


def test_learning_curves_several_epochs_missing_keys(tmp_path: Path) -> None:
    hist = []
    for e in range(1, 9):
        row = {"epoch": e, "train_loss": 2.0 / e, "lr": 0.1 * 0.5**e, "run_name": "abc"}
        if e % 2 == 0:  # validation only every other epoch
            row.update(val_loss=2.2 / e, val_accuracy=0.1 * e)
        hist.append(row)
    hist[3]["train_loss"] = float("nan")  # non-finite values are skipped, not fatal
    _check_png(plot_learning_curves(hist, tmp_path / "many.png"))


def test_learning_curves_vae_keys(tmp_path: Path) -> None:
    hist = [
        {
            "epoch": e,
            "train_loss": 300.0 - e,
            "val_loss": 305.0 - e,
            "val_elbo_bpd": 5.0 - 0.1 * e,
            "val_psnr": 18.0 + e,
            "val_kl": 20.0 + e,
            "train_kl": torch.tensor(19.0 + e),
        }
        for e in range(1, 4)
    ]
    _check_png(plot_learning_curves(hist, tmp_path / "vae.png"))


def test_learning_curves_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="numeric"):
        plot_learning_curves([{"epoch": 1, "note": "x"}], tmp_path / "x.png")


def test_image_grid_uint8_and_float_agree(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
    a = _check_png(plot_image_grid(imgs, tmp_path / "u8.png", nrow=3))
    b = _check_png(plot_image_grid(imgs.float() / 255, tmp_path / "f.png", nrow=3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # 3 tiles per row of 32 px must be upscaled (nearest) to stay visible
    assert a.width >= 3 * 32 * 2 and a.width > a.height


def test_image_grid_content_and_labels(tmp_path: Path) -> None:
    red = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    img = _check_png(plot_image_grid(red, tmp_path / "red.png"))
    arr = np.asarray(img).astype(int)
    is_red = (arr[..., 0] > 250) & (arr[..., 1] < 5) & (arr[..., 2] < 5)
    assert is_red.mean() > 0.7  # the grid is dominated by the (pure red) tiles (plus margins)
    gray = torch.rand(5, 1, 16, 16)
    _check_png(
        plot_image_grid(
            gray, tmp_path / "lab.png", title="samples", labels=[f"#{i}" for i in range(5)]
        )
    )


def test_image_grid_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        plot_image_grid(torch.zeros(3, 32, 32), tmp_path / "x.png")
    with pytest.raises(ValueError, match="channels"):
        plot_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_image_grid(torch.zeros(2, 3, 8, 8), tmp_path / "x.png", labels=["a"])
    assert not (tmp_path / "x.png").exists()


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, mve.plots, mve.metrics; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert out.stdout.strip() == "False"
