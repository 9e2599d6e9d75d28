"""The console of a search and the summary that ends a run (no Ray: the reporter is driven with
stand-in trials; Ray's side is tests/integration/test_tune_console.py)."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import torch

from cluster.search import load_space
from cluster.tune.progress import WIDTH, CompactReporter, fit_columns, short_names
from cluster.tune.report import format_summary
from mve.checkpoint import save_checkpoint
from mve.models import build_model, make_config
from mve.runs import main as runs_main
from mve.runs import run_summary
from mve_cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
PREP = {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}


def _classifier(path: Path, **metrics) -> Path:
    torch.manual_seed(0)
    cfg = make_config("classifier", {"num_classes": 3, "starting_channels": 8,
                                     "final_channels": 16, "cnn_layers": 3, "fcn_layers": 2})
    out = save_checkpoint(path, build_model("classifier", cfg).eval(), model_name="classifier",
                          model_config=cfg, preprocessing=PREP, class_names=["a", "b", "c"],
                          metrics=metrics)
    (out / "REPORT.md").write_text("# report\n")
    for name in ("learning_curves.png", "confusion_matrix.png"):
        (out / name).write_bytes(b"\x89PNG")
    return out


def _vae(path: Path, **metrics) -> Path:
    torch.manual_seed(0)
    cfg = make_config("vae", {}, preset="tiny")
    return save_checkpoint(path, build_model("vae", cfg).eval(), model_name="vae",
                           model_config=cfg, preprocessing=PREP, metrics=metrics)


# -- short names and the 100-column table ---------------------------------------------------

def test_short_names_are_the_last_component_or_an_alias():
    names = short_names(["optim.lr", "model.starting_channels", "batch_size", "optim.name",
                         "optim.weight_decay", "data.augment.crop_padding"])
    assert names == {"optim.lr": "lr", "model.starting_channels": "start_ch",
                     "batch_size": "batch_size", "optim.name": "optim.name",
                     "optim.weight_decay": "wd", "data.augment.crop_padding": "crop"}
    assert short_names(["label_smoothing", "smoothing"]) == {"label_smoothing": "label_smoothing",
                                                             "smoothing": "smoothing"}
    assert short_names(["label_smoothing"]) == {"label_smoothing": "smoothing"}


def test_colliding_short_names_keep_more_of_their_keys():
    assert short_names(["optim.lr", "model.lr", "dropout"]) == {
        "optim.lr": "optim.lr", "model.lr": "model.lr", "dropout": "dropout"}
    assert short_names(["a.x.lr", "b.x.lr", "c.lr"]) == {
        "a.x.lr": "a.x.lr", "b.x.lr": "b.x.lr", "c.lr": "c.lr"}
    # an alias that meets a real name: both grow until they differ
    names = short_names(["optim.weight_decay", "other.wd"])
    assert len(set(names.values())) == 2 and names["other.wd"] == "other.wd"
    # a bare key that collides stays whole, the dotted one grows
    assert short_names(["lr", "optim.lr"]) == {"lr": "lr", "optim.lr": "optim.lr"}


def test_fit_columns_drops_the_rightmost_droppable_columns_to_fit():
    headers = ["trial", "status", "epoch", "val_accuracy", *(f"param{i}" for i in range(20))]
    rows = [["abcd1234", "TERMINATED", "4/4", "0.7000", *("0.000123" for _ in range(20))]]
    lines, dropped = fit_columns(headers, rows, fixed=4)
    assert max(len(line) for line in lines) <= WIDTH
    assert dropped > 0 and lines[0].split()[:5] == ["trial", "status", "epoch", "val_accuracy",
                                                    "param0"]
    assert f"param{19 - dropped}" in lines[0] and f"param{20 - dropped}" not in lines[0]
    # long cells are cut, and a table that fits keeps every column
    lines, dropped = fit_columns(["trial", "a_very_long_header_name"], [["x", "y" * 40]], fixed=1)
    assert dropped == 0 and lines[0] == "trial  a_very_long~" and lines[1].endswith("yyyyyyyyyyy~")


def _trial(tid: str, status: str, epoch: int | None = None, value: float | None = None,
           **params) -> SimpleNamespace:
    result = {} if epoch is None else {"epoch": epoch, "val_accuracy": value}
    analysis = {} if value is None else {"val_accuracy": {"max": value, "min": value}}
    return SimpleNamespace(trial_id=tid, status=status, config=params, last_result=result,
                           metric_analysis=analysis)


def _reporter(keys, **kw) -> CompactReporter:
    return CompactReporter(name="tune-classifier", metric="val_accuracy", mode="max",
                           param_keys=keys, max_epochs=4, **kw)


def _report(reporter: CompactReporter, trials, done: bool = False) -> list[str]:
    out: list[str] = []
    if reporter.should_report(trials, done=done):
        reporter.report(trials, done, write=lambda text: out.extend(text.splitlines()))
    return out


def test_the_reporter_prints_a_compact_table_of_the_default_space():
    keys = list(load_space(REPO / "cluster/spaces/classifier.yaml", "classifier").params)
    params = {k: 0.00012345 if "lr" in k else 128 for k in keys}
    trials = [_trial("a1b2c3d4", "TERMINATED", 4, 0.71, **params),
              _trial("e5f6a7b8", "RUNNING", 2, 0.65, **params),
              _trial("c9d0e1f2", "PENDING", **params)]
    reporter = _reporter(keys)
    reporter.setup(total_samples=8)
    lines = _report(reporter, trials)
    assert lines[0] == "" and all(len(line) <= WIDTH for line in lines)
    status, header, *rows, hidden = lines[1:]
    assert status.startswith("tune-classifier 0:00:0")
    assert status.endswith(" | 3/8 trials: 1 running, 1 pending, 1 done | best a1b2c3d4 0.7100")
    assert hidden.startswith("not shown: ") and hidden.endswith("crop (see results.md)")
    assert header.split()[:6] == ["trial", "status", "epoch", "val_accuracy", "batch_size",
                                  "cnn_layers"]
    assert [r.split()[0] for r in rows] == ["e5f6a7b8", "c9d0e1f2", "a1b2c3d4"]
    assert rows[0].split()[1:4] == ["RUNNING", "2/4", "0.6500"]
    # nothing new: no table; a change within the interval: none either; at the end: always
    assert _report(reporter, trials) == []
    trials[1].last_result = {"epoch": 3, "val_accuracy": 0.7}
    assert _report(reporter, trials) == []
    assert len(_report(reporter, trials, done=True)) == 7
    # Tune keeps the reporter with the experiment (tuner.pkl)
    assert pickle.loads(pickle.dumps(reporter)).names == reporter.names


def test_the_reporter_waits_for_a_running_trial_and_shows_results_at_level_2():
    reporter = _reporter(["optim.lr"], level=2, interval=0.0)
    pending = [_trial("t1", "PENDING", lr=0.01), _trial("t2", "PENDING", lr=0.1)]
    assert _report(reporter, pending) == []  # nothing has started: nothing to show yet
    running = [_trial("t1", "RUNNING", 1, 0.5, **{"optim.lr": 0.01}),
               _trial("t2", "RUNNING", **{"optim.lr": 0.1})]
    lines = _report(reporter, running)
    assert lines[0] == "t1 epoch 1/4 val_accuracy 0.5000  lr=0.01"
    assert lines[1] == "" and lines[3].split() == ["trial", "status", "epoch", "val_accuracy",
                                                   "lr"]
    assert not [line for line in _report(reporter, running) if line.startswith("t1 epoch")]


def test_a_quiet_reporter_level_is_only_tune_s_concern():
    # -v 0 never reaches the reporter (Tune's verbosity 0 skips it); level 1 prints no
    # result lines
    reporter = _reporter(["optim.lr"], interval=0.0)
    lines = _report(reporter, [_trial("t1", "RUNNING", 1, 0.5, **{"optim.lr": 0.01})])
    assert not any(line.startswith("t1 epoch") for line in lines) and len(lines) == 4


# -- the summary that ends a run ------------------------------------------------------------

def test_run_summary_of_a_classifier(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths are printed as given: relative ones stay short
    ckpt = _classifier(Path("runs/run dir"), val_accuracy=0.739, epoch=4)
    text = run_summary(ckpt, title="mve train classifier: done")
    lines = text.splitlines()
    assert lines[0] == "mve train classifier: done"
    assert "  result      val_accuracy 0.7390 (73.9%) at epoch 4" in lines
    assert f"  checkpoint  {ckpt}" in lines and f"  report      {ckpt / 'REPORT.md'}" in lines
    assert "confusion_matrix.png, learning_curves.png" in text
    assert lines[-1] == f"  serve it    mve serve --classifier '{ckpt}'"  # quoted: a space
    assert all(len(line) <= WIDTH for line in lines)


def test_run_summary_of_a_vae_and_python_m_mve_runs(tmp_path, capsys):
    ckpt = _vae(tmp_path / "vae", val_elbo_bpd=4.51234, val_psnr=24.1, epoch=30)
    text = run_summary(ckpt, title="t", extra=[("ray run", "/somewhere")])
    assert "val_elbo_bpd 4.5123 bits/dim, val_psnr 24.10 dB at epoch 30" in text
    assert "  ray run     /somewhere" in text and "report" not in text  # no REPORT.md here
    assert text.splitlines()[-1] == f"  serve it    mve serve --vae {ckpt}"
    assert runs_main([str(ckpt)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"mve serve --vae {ckpt}")
    assert runs_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_search_summary_ends_with_the_best_checkpoint_s(tmp_path):
    best = _classifier(tmp_path / "out" / "best", val_accuracy=0.5, epoch=2)
    keys = ["optim.lr", "model.starting_channels", "batch_size", "optim.weight_decay"]
    summary = {"model": "classifier", "metric": "val_accuracy", "mode": "max", "max_epochs": 4,
               "trials": 6, "terminated": 6, "errored": 0, "stopped_early": 3,
               "experiment_path": str(tmp_path / "ray" / "tune-classifier"),
               "results_md": str(tmp_path / "out" / "results.md"),
               "best_trial_id": "abc123", "best_value": 0.5, "best_epoch": 2,
               "best_params": dict(zip(keys, [0.0123456, 24, 32, 0.0001], strict=True)),
               "best_yaml": str(tmp_path / "out" / "best.yaml"), "best_checkpoint": str(best),
               "resumed": True}
    lines = format_summary(summary).splitlines()
    assert lines[0] == ("mve tune classifier: 6 trials, 6 finished (3 stopped early by ASHA), "
                        "0 errored (resumed)")
    assert lines[1] == "best trial abc123: val_accuracy 0.5000 at epoch 2 of 4"
    assert "  params        lr=0.01235, start_ch=24, batch_size=32, wd=0.0001" in lines
    assert f"  retrain       mve train classifier --config {tmp_path}/out/best.yaml" in lines
    assert lines[-1] == f"  serve it      mve serve --classifier {best}"
    # without a checkpoint (every trial errored) it still says what happened
    failed = {k: v for k, v in summary.items() if not k.startswith("best_")}
    text = format_summary({**failed, "terminated": 0, "errored": 6})
    assert "6 errored" in text and "results.md" in text and "serve" not in text


def test_mve_q_tune_stays_quiet_and_tune_q_works_too():
    parser = build_parser()
    base = ["tune", "classifier"]
    assert parser.parse_args(["-q", *base]).quiet is True  # tune's own -q no longer resets it
    assert parser.parse_args([*base, "-q"]).quiet is True
    assert parser.parse_args(base).quiet is False


def test_local_training_prints_its_summary_even_with_q(tmp_path, capsys):
    from _archives import colour_archive

    from mve_cli.main import main

    data = colour_archive(tmp_path / "data", per_class=20)
    out = tmp_path / "run"
    assert main(["-q", "train", "classifier", "--local", "--preset", "baseline", "--data",
                 str(data), "--epochs", "1", "--out", str(out), "--set", "model.num_classes=3", "--set",
                 "model.cnn_layers=3", "--set", "model.final_channels=16", "--set",
                 "model.fcn_layers=2", "--set", "data.val_size=15", "--set",
                 "batch_size=15"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split() == ["serve", "it", "mve", "serve", "--classifier", str(out)]
    assert lines[-2].split() == ["tensorboard", "tensorboard", "--logdir", str(out / "tensorboard")]
    assert "mve train classifier (local, 1 epoch(s)): done" in lines
