"""Search-space files: parsing, validation against TrainConfig, per-trial configs (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cluster.search import (
    FORBIDDEN_KEYS,
    SearchSpaceError,
    base_config,
    default_space_path,
    flatten,
    load_space,
    parse_space,
    trial_config,
    unflatten,
    valid_keys,
    validate_space,
)
from mve.config import ConfigError, load_train_config

REPO = Path(__file__).resolve().parents[2]
NOTE_WINNER = {"batch_size": 125, "model.cnn_layers": 6, "model.fcn_layers": 4,
               "model.final_channels": 210, "optim.lr": 0.001, "model.starting_channels": 46}


def _space(text: str, model: str = "classifier"):
    space = parse_space(yaml.safe_load(text), source="test.yaml")
    validate_space(space, base_config(model, space))
    return space


@pytest.mark.parametrize("model", ["classifier", "vae"])
def test_default_spaces_are_valid_and_shipped_once(model):
    space = load_space(None, model)
    validate_space(space, base_config(model, space))
    assert len(space.params) >= 6
    # configs/search/ is the same file as the packaged copy (one source of truth).
    assert (REPO / "configs" / "search" / f"{model}.yaml").read_bytes() == \
        default_space_path(model).read_bytes()


def test_default_classifier_space_covers_the_note_and_its_winner():
    space = load_space(None, "classifier")
    for key, value in NOTE_WINNER.items():
        param = space.params[key]
        if param.dist == "choice":
            assert value in param.args
        elif param.dist == "randint":
            assert param.args[0] <= value < param.args[1]
        else:  # loguniform lr, qrandint channels (upper bound included)
            assert param.args[0] <= value <= param.args[1]
            if param.dist == "qrandint":
                assert (value - param.args[0]) % param.args[2] == 0
    assert space.params["optim.lr"].dist == "loguniform"
    for knob in ("model.residual", "model.dropout", "label_smoothing", "optim.name",
                 "optim.weight_decay", "data.augment.flip", "data.augment.crop_padding"):
        assert knob in space.params
    # The note's winner is a valid trial config of the default space.
    base = base_config("classifier", space)
    cfg = trial_config(base.to_dict(), NOTE_WINNER)
    assert (cfg.batch_size, cfg.model_config.cnn_layers, cfg.optim.lr) == (125, 6, 0.001)


def test_vae_space_does_not_search_the_epoch_budget_or_family():
    space = load_space(None, "vae")
    assert not set(space.params) & set(FORBIDDEN_KEYS)


def test_numbers_in_yaml_1_1_form_are_floats():
    space = _space("optim.lr: {loguniform: [1e-4, 1e-2]}\nfixed: {optim.weight_decay: 5e-4}")
    assert space.params["optim.lr"].args == (1e-4, 1e-2)
    assert space.fixed["optim.weight_decay"] == 5e-4


def test_fixed_accepts_dotted_and_nested_keys_and_plain_constants():
    space = _space("optim.schedule: constant\n"
                   "fixed:\n  model.cnn_layers: 3\n  data: {augment: {flip: false}}\n")
    assert space.params == {}
    assert space.fixed == {"optim.schedule": "constant", "model.cnn_layers": 3,
                           "data.augment.flip": False}
    base = base_config("classifier", space)
    assert base.optim.schedule == "constant"
    assert base.model_config.cnn_layers == 3 and base.data.augment.flip is False


def test_precedence_fixed_then_set_then_command_line():
    space = _space("fixed: {batch_size: 32, seed: 5}")
    base = base_config("classifier", space, overrides=["batch_size=64"], extra={"seed": 9})
    assert (base.batch_size, base.seed) == (64, 9)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(SearchSpaceError) as err:
        _space("optim.lrr: {loguniform: [1.0e-4, 1.0e-2]}")
    msg = str(err.value)
    assert "optim.lrr" in msg and "did you mean optim.lr" in msg
    assert "model.starting_channels" in msg and "data.augment.flip" in msg


def test_unknown_fixed_key_is_a_search_space_error():
    with pytest.raises(SearchSpaceError, match="fixed key 'model.depth'"):
        _space("fixed: {model.depth: 3}")


def test_errors_are_config_errors():
    assert issubclass(SearchSpaceError, ConfigError)  # the CLI prints them as one line


@pytest.mark.parametrize("text, match", [
    ("optim.lr: {logunifom: [1.0e-4, 1.0e-2]}", "unknown distribution 'logunifom'"),
    ("optim.lr: {grid_search: [0.1, 0.01]}", "grid_search.*not supported"),
    ("optim.lr: {randn: [0.0, 1.0]}", "randn.*not supported"),
    ("optim.lr: {qloguniform: [1.0e-4, 1.0e-2, 1.0e-4]}", "qloguniform.*not supported"),
    ("optim.lr: {loguniform: [0, 1.0e-2]}", "lo > 0"),
    ("optim.lr: {loguniform: [1.0e-2, 1.0e-4]}", "lo < hi"),
    ("optim.lr: {loguniform: [1.0e-4]}", "takes 2 numbers"),
    ("optim.lr: {loguniform: 0.1}", "takes a list"),
    ("optim.lr: {uniform: [a, b]}", "must be numbers"),
    ("optim.lr: {loguniform: [1.0e-4, 1.0e-2], choice: [1]}", "exactly one key"),
    ("model.cnn_layers: {randint: [4, 4]}", "is empty"),
    ("model.cnn_layers: {randint: [4.5, 6]}", "must be integers"),
    ("model.final_channels: {qrandint: [128, 321, 2]}", "multiple of q"),
    ("batch_size: {choice: []}", "at least one option"),
    ("model.channels: {choice: [[8, 16, 32]]}", "must be scalars"),
    ("batch_size: {uniform: [32, 64]}", "batch_size is an integer"),
    ("model.cnn_layers: {randint: [4, 11]}", "can sample 10"),
    ("optim.name: {choice: [adam, lion]}", "can sample 'lion'"),
    ("optim.lr: {choice: [0.1, -1]}", "lr must be > 0"),
    ("epochs: {choice: [5, 10]}", "--max-epochs"),
    ("model.name: vae", "first argument"),
    ("model.preset: {choice: [seed]}", "architecture preset"),
    ("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\nfixed: {optim.lr: 0.1}", "both searched and fixed"),
    ("- optim.lr", "mapping of dotted keys"),
])
def test_bad_spaces_are_rejected_clearly(text, match):
    with pytest.raises(SearchSpaceError, match=match):
        _space(text)


def test_vae_keys_are_checked_against_the_vae_config():
    _space("model.latent_channels: {choice: [4, 8]}", model="vae")
    with pytest.raises(SearchSpaceError, match="not a TrainConfig key"):
        _space("model.cnn_layers: {randint: [3, 5]}", model="vae")
    with pytest.raises(SearchSpaceError, match="can sample 24"):
        _space("model.base_channels: {choice: [32, 24]}", model="vae")  # groups=16


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml", "classifier")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {loguniform: [1, 2\n")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_space(bad, "classifier")
    with pytest.raises(SearchSpaceError, match="no default search space"):
        default_space_path("gan")


def test_pin_removes_searched_keys():
    space = load_space(None, "classifier").pin(["optim.lr", "batch_size"])
    assert "optim.lr" not in space.params and "batch_size" not in space.params
    assert "model.cnn_layers" in space.params


def test_to_yaml_round_trips(tmp_path):
    space = load_space(None, "classifier")
    again = parse_space(yaml.safe_load(space.to_yaml()), source="again")
    assert again.params == space.params and again.fixed == space.fixed


def test_probe_values_follow_tune_bounds():
    space = _space("model.cnn_layers: {randint: [4, 8]}\n"
                   "model.final_channels: {qrandint: [128, 320, 2]}\n"
                   "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert space.params["model.cnn_layers"].probe_values() == [4, 7]  # hi excluded
    assert space.params["model.final_channels"].probe_values() == [128, 320]  # hi included
    lo, mid, hi = space.params["optim.lr"].probe_values()
    assert lo < mid < hi and not math.isclose(mid, round(mid))


def test_contains_follows_the_same_bounds_as_the_draws():
    space = _space("model.cnn_layers: {randint: [4, 8]}\n"
                   "model.final_channels: {qrandint: [128, 320, 2]}\n"
                   "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                   "model.dropout: {quniform: [0.0, 0.3, 0.1]}\n"
                   "model.residual: {choice: [true, false]}\n"
                   "optim.name: {choice: [adam, adamw]}\n")
    for p in space.params.values():
        assert all(p.contains(v) for v in p.probe_values()), p
    inside = {"model.cnn_layers": 7, "model.final_channels": 130, "optim.lr": 1e-3,
              "model.dropout": 0.2, "model.residual": False, "optim.name": "adamw"}
    outside = {"model.cnn_layers": 8, "model.final_channels": 131, "optim.lr": 2e-2,
               "model.dropout": 0.25, "model.residual": 0, "optim.name": "sgd"}
    for key, p in space.params.items():
        assert p.contains(inside[key]) and not p.contains(outside[key]), key
    assert not space.params["model.cnn_layers"].contains(5.5)
    assert not space.params["optim.lr"].contains("0.001")


def test_a_search_starts_from_its_base_config_when_the_space_holds_it():
    space = load_space(REPO / "cluster/spaces/classifier-fast.yaml", "classifier")
    base = load_train_config("classifier", preset="fast")
    point, outside = space.base_point(base.to_dict())
    assert outside == [] and point is not None and set(point) == set(space.params)
    flat = flatten(base.to_dict())
    assert all(flat[k] == v for k, v in point.items())
    assert point["optim.lr"] == 1.5 and point["averaging"] == "lookahead"
    # The note's space does not hold the fast recipe: no point, and the keys that say why.
    point, outside = load_space(None, "classifier").base_point(base.to_dict())
    assert point is None and "optim.lr" in outside and "batch_size" in outside


def test_optuna_distributions_match_the_bounds():
    space = _space("model.cnn_layers: {randint: [4, 8]}\n"
                   "model.final_channels: {qrandint: [128, 320, 2]}\n"
                   "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                   "model.dropout: {quniform: [0.0, 0.3, 0.1]}\n"
                   "optim.name: {choice: [adam, adamw]}\n")
    d = {k: p.to_optuna() for k, p in space.params.items()}
    assert (d["model.cnn_layers"].low, d["model.cnn_layers"].high) == (4, 7)
    assert (d["model.final_channels"].high, d["model.final_channels"].step) == (320, 2)
    assert d["optim.lr"].log and d["model.dropout"].step == 0.1
    assert d["optim.name"].choices == ("adam", "adamw")


def test_valid_keys_are_dotted_leaves_without_forbidden_ones():
    keys = valid_keys(load_train_config("classifier"))
    assert "optim.lr" in keys and "data.augment.crop_padding" in keys
    assert "data.augment" not in keys and "epochs" not in keys and "model.name" not in keys


def test_flatten_unflatten_and_trial_config():
    nested = {"optim": {"lr": 0.1}, "data": {"augment": {"flip": False}}, "batch_size": 8}
    assert flatten(nested) == {"optim.lr": 0.1, "data.augment.flip": False, "batch_size": 8}
    assert unflatten(flatten(nested)) == nested
    base = load_train_config("classifier", overrides=["epochs=3"])
    cfg = trial_config(base.to_dict(), {"optim.lr": 0.02, "model.residual": True})
    assert cfg.optim.lr == 0.02 and cfg.model_config.residual is True and cfg.epochs == 3
    assert cfg.optim.name == base.optim.name


# -- the search's report (cluster.tune.report is Ray-free too) ------------------------------

def _trial(tid: str, values: list[float], status: str = "TERMINATED", lr: float = 0.01):
    from cluster.tune.report import TrialRecord

    hist = [{"epoch": i + 1, "val_accuracy": v, "node_ip": "10.0.0.1"}
            for i, v in enumerate(values)]
    return TrialRecord(tid, status, {"optim.lr": lr, "batch_size": 32}, hist)


def test_rows_rank_trials_and_flag_asha_stops():
    from cluster.tune.report import result_rows, select_best

    trials = [_trial("b", [0.5, 0.7, 0.6, 0.65]), _trial("a", [0.4]),
              _trial("c", [0.5, 0.7, 0.8, 0.75]), _trial("d", [0.2], status="ERROR"),
              _trial("e", [])]
    best = select_best(trials, "val_accuracy", "max")
    assert (best[0].trial_id, best[1], best[2]) == ("c", 3, 0.8)
    rows = result_rows(trials, metric="val_accuracy", mode="max", max_epochs=4,
                       param_keys=["optim.lr"])
    assert [r["trial_id"] for r in rows] == ["c", "b", "a", "d", "e"]
    flags = {r["trial_id"]: r["early_stopped"] for r in rows}
    assert flags == {"c": False, "b": False, "a": True, "d": False, "e": False}
    assert rows[0]["final_val_accuracy"] == 0.75 and rows[0]["best_epoch"] == 3
    assert rows[0]["param:optim.lr"] == 0.01 and rows[0]["node_ip"] == "10.0.0.1"
    low = select_best(trials, "val_accuracy", "min")
    assert (low[0].trial_id, low[2]) == ("d", 0.2)


def test_report_files_and_plot_fallbacks(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from cluster.tune.report import plot_param_importance, plot_trial_curves, write_results

    dists = {"optim.lr": FloatDistribution(1e-4, 1e-1, log=True),
             "batch_size": CategoricalDistribution([16, 32])}
    two = [_trial("a", [0.5]), _trial("b", [0.6, 0.7])]
    png = plot_param_importance(two, tmp_path / "few.png", metric="val_accuracy", mode="max",
                                distributions=dists)
    assert png.read_bytes()[:4] == b"\x89PNG"  # the "not enough trials" figure
    many = [_trial(str(i), [0.3 + 0.1 * i], lr=10 ** (-3 + 0.4 * i)) for i in range(5)]
    png = plot_param_importance(many, tmp_path / "imp.png", metric="val_accuracy",
                                mode="max", distributions=dists)
    assert png.stat().st_size > 2000
    png = plot_trial_curves([_trial("e", [])], tmp_path / "empty.png", metric="val_accuracy",
                            mode="max", max_epochs=3)
    assert png.is_file()
    csv_path, md_path = write_results([{"trial_id": "x|y", "early_stopped": True,
                                        "best": 0.123456789}], tmp_path, title="t")
    assert "0.123456789" in csv_path.read_text()
    assert "| x\\|y | yes | 0.123457 |" in md_path.read_text()


def test_export_writes_best_from_the_one_loaded_checkpoint(tmp_path, monkeypatch):
    """best/ and the summary come from the checkpoint loaded once after the search: the source
    directory is gone and every reader is disabled by the time the report is written."""
    import dataclasses
    import json
    import shutil

    import torch

    from cluster.tune.report import write_outputs
    from mve import checkpoint as checkpoint_mod
    from mve import runs
    from mve.checkpoint import load_checkpoint, save_checkpoint
    from mve.models import build_model

    cfg = load_train_config("classifier", extra={"epochs": 2})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="/data/x.tar.gz"))
    history = [{"epoch": 1, "train_loss": 1.2, "val_accuracy": 0.5},
               {"epoch": 2, "train_loss": 0.9, "val_accuracy": 0.6}]
    src = save_checkpoint(
        tmp_path / "src", build_model("classifier", cfg.model_config), model_name="classifier",
        model_config=cfg.model_config, class_names=[f"c{i}" for i in range(10)],
        preprocessing={"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        metrics={"epoch": 2, "val_accuracy": 0.6}, train_config=cfg.to_dict(),
        training_state={"epoch": 2, "history": history, "optimizer": {"m": torch.ones(3)}})
    best = load_checkpoint(src)
    shutil.rmtree(src)

    def no_reads(*args, **kwargs):
        raise AssertionError("the checkpoint was opened again")

    for name in ("load_checkpoint", "read_meta", "load_training_state", "verify_checkpoint"):
        monkeypatch.setattr(checkpoint_mod, name, no_reads)
        monkeypatch.setattr(runs, name, no_reads, raising=False)
    out = tmp_path / "out"
    summary = write_outputs(out, [_trial("a", [0.5, 0.6])], model="classifier",
                            metric="val_accuracy", mode="max", max_epochs=2,
                            param_keys=["optim.lr"], distributions={}, best_cfg=cfg,
                            best_ckpt=best, command="mve tune classifier",
                            experiment_path="/x/tune-classifier")
    monkeypatch.undo()
    assert (summary["best_checkpoint_epoch"], summary["best_checkpoint_value"]) == (2, 0.6)
    assert json.loads((out / "best" / "history.json").read_text()) == history
    assert yaml.safe_load((out / "best" / "config.yaml").read_text())["data"]["path"] == \
        "/data/x.tar.gz"
    assert yaml.safe_load((out / "best.yaml").read_text()) == cfg.to_dict()
    exported = load_checkpoint(out / "best")
    assert exported.metrics == best.metrics and exported.class_names == best.class_names
    assert not (out / "best" / "training_state.safetensors").exists()
    assert (out / "best" / "REPORT.md").is_file()
