"""The `mve` command line, end to end on small generated data (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _archives import colour_archive  # tests/integration/_archives.py

from mve_cli.main import main

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A tar.gz image-folder tree: 4 classes x 40 PNGs, colour tells the class."""
    return colour_archive(tmp_path_factory.mktemp("data"), names=CLASSES, colour=lambda k: 40 + 60 * k,
                          noise=25, image_name="{i:04d}.png", name="tiny.tar.gz")


SMALL = ["--preset", "baseline", "--set", "model.num_classes=4", "--set",
         "model.final_channels=32", "--set",
         "model.cnn_layers=4", "--set", "model.fcn_layers=2", "--set", "data.val_size=40",
         "--set", "batch_size=20"]


def test_summary_seed_shows_the_plan_and_875592(capsys):
    assert main(["summary", "classifier", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    assert "Classifier channel upscale ratio: 1.3548533596918833" in out
    assert "downsampled_sizes = [20, 13, 8, 5, 3, 2]" in out
    assert "channels = [3, 46, 62, 84, 114, 155, 210]" in out
    assert "FCN layers: [840, 277, 92, 30, 10]" in out
    assert "FractionalMaxPool2d" in out and "[100, 46, 20, 20]" in out
    assert "Total params: 875,592" in out
    assert out.rstrip().endswith("Total parameters: 875,592")


def test_summary_vae_and_overrides(capsys):
    assert main(["summary", "vae", "--preset", "tiny", "--set", "model.latent_channels=2"]) == 0
    out = capsys.readouterr().out
    assert "Total parameters:" in out and "VAE" in out


def test_config_show_is_loadable_yaml(capsys, tmp_path):
    assert main(["config", "show", "classifier", "--preset", "seed"]) == 0
    text = capsys.readouterr().out
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["config", "show", "classifier", "--config", str(f)]) == 0
    assert capsys.readouterr().out == text


def test_data_inspect(archive, capsys):
    assert main(["data", "inspect", str(archive), "--val-size", "40", "--json"]) == 0
    out = capsys.readouterr().out
    assert "image-folder" in out and "tar.gz" in out
    info = json.loads(out.strip().splitlines()[-1])
    assert info["classes"] == CLASSES
    assert info["counts"] == {"train": 120, "val": 40, "test": 0}
    assert info["per_class"]["val"] == [10, 10, 10, 10]
    assert info["image_size"] == [32, 32, 3]


def test_train_local_then_evaluate_json(archive, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "classifier", "--local", "--data", str(archive), "--epochs", "2",
                 "--out", str(out), *SMALL]) == 0
    for name in ("model.safetensors", "mve.json", "REPORT.md", "confusion_matrix.png",
                 "learning_curves.png", "config.yaml", "run.json", "history.json"):
        assert (out / name).exists(), name
    assert len(list((out / "checkpoints").glob("epoch_*"))) == 2
    report = (out / "REPORT.md").read_text()
    assert "| Class" in report and "ant" in report
    capsys.readouterr()
    before = _tree(out)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["evaluate", str(out), "--data", str(archive), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("| Class") for line in lines)
    metrics = json.loads(lines[-1])
    assert metrics["num_samples"] == 40 and set(metrics["per_class"]) == set(CLASSES)
    meta = json.loads((out / "mve.json").read_text())
    assert metrics["accuracy"] == pytest.approx(meta["metrics"]["val_accuracy"])
    assert Path(metrics["confusion_matrix_png"]).exists()
    # the checkpoint is only read: the PNG lands in the current directory, or in --out
    assert Path(metrics["confusion_matrix_png"]).resolve().parent == cwd.resolve()
    assert _tree(out) == before
    assert main(["evaluate", str(out), "--data", str(archive), "--json", "--out",
                 str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "confusion_matrix_val.png").exists()
    assert _tree(out) == before


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_runs_only_missing_epochs(archive, tmp_path):
    out = tmp_path / "run"
    args = ["train", "classifier", "--local", "--data", str(archive), "--out", str(out), *SMALL]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


@pytest.mark.parametrize("argv,match", [
    (["train", "classifier", "--local", "--data", "/nonexistent/x"], "does not exist"),
    (["train", "classifier", "--local", "--set", "optim.lr=-1"], "lr"),
    (["evaluate", "/nonexistent/ckpt"], "does not exist"),
    (["train", "classifier", "--data", "/tmp"], "--local"),
])
def test_user_errors_are_one_clear_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mve: error:" in err and match in err and "Traceback" not in err


def test_console_script_help():
    exe = Path(sys.executable).parent / "mve"
    if not exe.exists():
        pytest.skip("mve console script not installed in this environment")
    proc = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--local" in proc.stdout and "--set" in proc.stdout


def test_train_vae_local_writes_grids_and_evaluates(archive, tmp_path, capsys):
    out = tmp_path / "vae"
    assert main(["train", "vae", "--local", "--preset", "tiny", "--data", str(archive),
                 "--epochs", "1", "--out", str(out), "--set", "data.val_size=40",
                 "--set", "batch_size=40"]) == 0
    for name in ("model.safetensors", "mve.json", "REPORT.md", "samples.png",
                 "reconstructions.png", "learning_curves.png"):
        assert (out / name).exists(), name
    assert "bits/dim" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(archive), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_samples"] == 40
    assert metrics["elbo_bpd"] > 0 and metrics["psnr"] > 0 and 0 < metrics["ssim"] <= 1


def test_val_size_and_limit_options_reach_the_data_config():
    import argparse

    from mve.options import train_config_from_args, train_parent

    parser = argparse.ArgumentParser(parents=[train_parent()])
    cfg = train_config_from_args(parser.parse_args(
        ["classifier", "--limit", "1000", "--val-size", "500", "--set", "epochs=3"]))
    assert (cfg.data.limit, cfg.data.val_size, cfg.epochs) == (1000, 500, 3)
    cfg = train_config_from_args(parser.parse_args(["classifier", "--set", "data.val_size=7"]))
    assert cfg.data.val_size == 7 and cfg.data.limit is None
    # as for --epochs, an explicit --set of the same key is the last word
    cfg = train_config_from_args(parser.parse_args(
        ["classifier", "--val-size", "500", "--set", "data.val_size=7"]))
    assert cfg.data.val_size == 7
