"""Config precedence, typing and round trips."""

from __future__ import annotations

import pytest
import yaml

from mve.config import ConfigError, TrainConfig, load_train_config, parse_overrides


def test_no_preset_is_the_best_known_recipe():
    cfg = load_train_config("classifier")
    assert cfg == load_train_config("classifier", preset="fast")
    assert cfg.preset == "fast" and cfg.model_preset == "convgroups"
    assert (cfg.optim.name, cfg.optim.schedule, cfg.batch_size) == ("sgd", "linear", 1024)
    assert cfg.averaging == "lookahead" and cfg.data.augment.alternating_flip


def test_baseline_preset_is_the_old_generic_default():
    cfg = load_train_config("classifier", preset="baseline")
    assert cfg.model == "classifier" and cfg.model_preset == "seed"
    assert cfg.optim.name == "sgd" and cfg.optim.schedule == "onecycle"
    assert cfg.data.augment.crop_padding == 4 and cfg.data.augment.flip


def test_seed_preset_is_the_notes_recipe():
    cfg = load_train_config("classifier", preset="seed")
    assert cfg.preset == "seed"
    assert (cfg.optim.name, cfg.optim.lr, cfg.batch_size) == ("adam", 1e-3, 125)
    assert cfg.optim.schedule == "constant"
    assert cfg.data.augment.crop_padding == 0 and not cfg.data.augment.flip
    assert (cfg.model_config.starting_channels, cfg.model_config.final_channels) == (46, 210)


def test_precedence_defaults_preset_file_extra_overrides(tmp_path):
    f1 = tmp_path / "a.yaml"
    f1.write_text(yaml.safe_dump({"epochs": 7, "optim": {"lr": 0.2}, "model": {"dropout": 0.1}}))
    f2 = tmp_path / "b.yaml"
    f2.write_text(yaml.safe_dump({"epochs": 8}))
    cfg = load_train_config("classifier", preset="seed", files=[f1, f2],
                            extra={"batch_size": 64}, overrides=["optim.lr=3e-4", "seed=5"])
    assert cfg.epochs == 8  # later file wins
    assert cfg.optim.lr == pytest.approx(3e-4)  # override beats file; "3e-4" parsed as a float
    assert cfg.optim.name == "adam"  # from the preset
    assert cfg.model_config.dropout == 0.1 and cfg.batch_size == 64 and cfg.seed == 5


def test_round_trip_through_dict_and_yaml():
    cfg = load_train_config("classifier", overrides=["model.channels=[8,16,24,32,48,64]",
                                                     "data.limit=100"])
    again = TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    vae = load_train_config("vae", preset="tiny")
    assert TrainConfig.from_dict(vae.to_dict()) == vae


@pytest.mark.parametrize("override,match", [
    ("optim.lr=-1", "lr"),
    ("epochs=zero", "integer"),
    ("bogus=1", "unknown"),
    ("model.nope=1", "unknown"),
    ("data.augment.cutout=-3", "cutout"),
    ("optim.name=lbfgs", "sgd"),
    ("noequals", "key=value"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config("classifier", overrides=[override])


def test_unknown_preset_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="known"):
        load_train_config("classifier", preset="nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config("classifier", files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config("classifier", files=[bad])


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b.c=1", "a.d=true", "e=[1, 2]", "f=null"]) == {
        "a": {"b": {"c": 1}, "d": True}, "e": [1, 2], "f": None}


def test_a_small_split_gets_a_smaller_batch_and_a_scaled_lr():
    cfg = load_train_config("classifier", preset="fast")
    assert cfg.fitted_to(45_000) is cfg  # full data: 43 steps of 1024, as tuned
    small = cfg.fitted_to(3_000)
    assert small.batch_size == 3_000 // 40 and small.batch_size * 40 <= 3_000
    assert small.optim.lr == pytest.approx(cfg.optim.lr * small.batch_size / 1024)
    assert cfg.fitted_to(3_000, world_size=2).batch_size == 1_500 // 40
    assert cfg.fitted_to(100).batch_size == 32  # never below 32 images
    baseline = load_train_config("classifier", preset="baseline")
    assert baseline.fitted_to(100) is baseline  # min_steps_per_epoch 0: as configured
