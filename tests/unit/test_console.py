"""A quiet, informative console (issue 19): -q/-v wherever a user puts them, one line before a
first decode, an estimate before a long FID on the CPU, a warning when an epoch is a few steps.
(No Ray here: tests/integration/test_console.py checks what a Ray run prints.)"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from _archives import colour_archive  # tests/integration/_archives.py

from mve.config import load_train_config
from mve.data.sources import load_source
from mve.logs import PACKAGES, driver_level, setup_logging
from mve_cli.main import build_parser, main

TRAIN = ["--local", "--preset", "baseline", "--epochs", "2", "--set", "model.num_classes=4",
         "--set", "model.cnn_layers=3", "--set", "model.final_channels=16", "--set",
         "model.fcn_layers=2", "--set", "data.val_size=40"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """4 classes x 40 PNGs: 120 training images once 40 are held out."""
    return colour_archive(tmp_path_factory.mktemp("console"), classes=4, per_class=40,
                          name="console.tar.gz")


@pytest.fixture(autouse=True)
def _levels():
    """``setup_logging`` sets mve's logger levels for the process: restore them."""
    saved = {name: logging.getLogger(name).level for name in PACKAGES}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


# -- -q / -v -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "train", "classifier"], True, False),
    (["train", "classifier", "-q"], True, False),
    (["train", "classifier", "--quiet", "--local"], True, False),
    (["-v", "train", "classifier", "--local"], False, True),
    (["train", "classifier", "--verbose"], False, True),
    (["train", "classifier"], False, False),
    (["-q", "evaluate"], True, False),
    (["evaluate", "-v"], False, True),
    (["vae", "report", "ckpt", "-q"], True, False),
    (["-q", "tune", "classifier"], True, False),  # tune's own -q no longer overwrites it
    (["-v", "tune", "classifier"], False, True),
])
def test_quiet_and_verbose_before_or_after_the_command(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.log_verbose) == (quiet, verbose)


def test_tune_keeps_its_own_verbose_for_tunes_output():
    args = build_parser().parse_args(["-v", "tune", "classifier", "-v", "2"])
    assert args.log_verbose is True and args.verbose == 2


def test_quiet_and_verbose_together_is_a_usage_error(capsys):
    for argv in (["-q", "-v", "summary", "classifier"], ["-q", "summary", "classifier", "-v"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "-q/--quiet" in capsys.readouterr().err


def test_the_ray_train_entrypoint_takes_quiet_too():
    from cluster.options import train_parser

    args = train_parser("python -m cluster.train").parse_args(["classifier", "-q"])
    assert args.quiet and not args.log_verbose


def test_setup_logging_levels_and_what_workers_are_handed():
    setup_logging(quiet=True)
    assert logging.getLogger("mve.train").getEffectiveLevel() == logging.WARNING
    assert driver_level() == logging.WARNING
    setup_logging(verbose=True)
    assert logging.getLogger("cluster.train").getEffectiveLevel() == logging.DEBUG
    setup_logging()  # a second command in the same process gets its own level back
    assert driver_level() == logging.INFO
    assert logging.getLogger("mve_cli").getEffectiveLevel() == logging.INFO


def test_quiet_after_train_hides_the_epoch_lines(archive, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    argv = ["train", "classifier", *TRAIN, "--data", str(archive), "--set", "batch_size=20"]
    assert main([*argv, "--out", str(tmp_path / "a"), "-q"]) == 0
    assert not [r for r in caplog.records if r.levelno < logging.WARNING
                and r.name.startswith("mve")]
    caplog.clear()
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert any(r.getMessage().startswith("epoch 2:") for r in caplog.records)


# -- a small training set ------------------------------------------------------------------

def test_a_batch_larger_than_the_data_warns_once_with_what_to_do(archive, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["train", "classifier", *TRAIN, "--data", str(archive), "--set",
                 "batch_size=64", "--out", str(tmp_path / "o")]) == 0
    notes = [r for r in caplog.records if "optimizer step(s) per epoch" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING  # 2 epochs, one warning
    text = notes[0].getMessage()
    assert "batch_size 64 on 120 training images" in text and "1 optimizer step(s)" in text
    # the lr scales with the batch: 0.05 (baseline's, at the 64 set here) * 15 / 64
    assert "chance" in text and "--set batch_size=15 --set optim.lr=0.012" in text
    assert "--limit" in text


def test_no_small_data_warning_where_the_preset_already_shrinks_the_batch():
    fast = load_train_config("classifier")  # batch 1024, min_steps_per_epoch 40
    assert fast.few_steps_note(400) is not None  # as configured: 0 full batches
    assert fast.fitted_to(400).few_steps_note(400) is None  # what fit trains: 32 x 12 steps
    baseline = load_train_config("classifier", preset="baseline")
    assert baseline.few_steps_note(45_000) is None
    assert baseline.few_steps_note(300, world_size=2) is not None


# -- the first decode of a dataset -----------------------------------------------------------

def test_the_first_decode_says_so_once_and_a_warm_cache_is_silent(archive, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mve.data.sources")
    cache = tmp_path / "cache"
    load_source(archive, cache_dir=cache)  # progress off: as in a Ray worker, no bar
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (f"decoding 160 images from {archive} (first use; cached in {cache})")
    assert lines[1].startswith("decoded 160 images from console.tar.gz in ")
    caplog.clear()
    assert load_source(archive, cache_dir=cache).from_cache
    assert not caplog.records  # every later trial or worker reads the cache without a word
    load_source(archive, use_cache=False)
    assert "(not cached)" in caplog.records[0].getMessage()


# -- FID on the CPU ------------------------------------------------------------------------

def test_fid_on_the_cpu_announces_its_duration_first(archive, tmp_path, caplog, monkeypatch):
    import torch

    from mve.checkpoint import save_checkpoint
    from mve.models import build_model, make_config
    from serve_app.testing import make_classifier

    monkeypatch.setenv("MVE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = make_config("vae", {}, preset="tiny")
    vae = save_checkpoint(tmp_path / "vae", build_model("vae", cfg).eval(), model_name="vae",
                          model_config=cfg, preprocessing={"input_size": [32, 32],
                                                           "mean": [0.5] * 3, "std": [0.5] * 3},
                          provenance={"val_size": 40, "split_seed": 0})
    clf = make_classifier(tmp_path / "clf")
    caplog.set_level(logging.INFO)
    assert main(["evaluate", str(vae), "--data", str(archive), "--device", "cpu", "--fid", "6",
                 "--fid-features", "classifier", "--fid-classifier", str(clf)]) == 0
    lines = [r.getMessage() for r in caplog.records]
    [estimate] = [m for m in lines if m.startswith("FID of 6 samples on the CPU: about ")]
    assert "per image through the classifier" in estimate and "--device cuda" in estimate
    # before the work: choosing the feature network is the FID call's first step
    fallback = next(i for i, m in enumerate(lines) if "Inception-v3 is not available" in m)
    assert lines.index(estimate) < fallback


def test_durations_read_naturally():
    from mve_cli.evaluate import _duration

    assert _duration(12.3) == "12 s"
    assert _duration(180) == "3 min"
    assert _duration(5400) == "1 h 30 min"


# -- mve serve's Ray ---------------------------------------------------------------------------

def test_serve_asks_ray_for_plain_prefixes_off_a_terminal(monkeypatch):
    from serve_app.embedded import _console_env

    monkeypatch.setattr("sys.stdout", io.StringIO())  # output to a file or a pipe
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set: nothing to ask Ray (no ray import here)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    _console_env(True)
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's choice stands
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _console_env(True)
    assert os.environ["RAY_COLOR_PREFIX"] == "1" and os.environ["RAY_AUTH_MODE"] == "disabled"
