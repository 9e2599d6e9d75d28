"""serve_app/config.yaml, the config editing of serve_app.deploy and the data-plane environment
(no Ray started)."""

from __future__ import annotations

import pytest

from serve_app.dataplane import DATAPLANE_ENV, PER_HOST_PORTS, applied, embedded_env
from serve_app.deploy import (
    APP_NAME,
    app_config,
    load_config,
    model_apps,
    set_user_config,
)
from serve_app.families import served
from serve_app.schemas import AppArgs, FrontArgs, ModelArgs, ModelUserConfig

PREFIXES = {"mve": "/", "classifier": "/v1/classify", "classifier-oip": "/v2/models/classifier",
            "vae": "/v1/vae", "vae-oip": "/v2/models/vae"}


def test_the_config_is_one_front_and_two_apps_per_model() -> None:
    cfg = load_config()
    assert not [k for k in cfg if k.startswith("x-")]  # anchor holders are dropped
    assert {a["name"]: a["route_prefix"] for a in cfg["applications"]} == PREFIXES
    assert model_apps(cfg) == {"classifier": ["classifier", "classifier-oip"],
                               "vae": ["vae", "vae-oip"]}
    for app in cfg["applications"]:
        (dep,) = app["deployments"]  # one deployment: the ingress is the model
        if app["name"] == APP_NAME:
            FrontArgs.model_validate(app["args"])
            assert app["args"]["models"] == model_apps(cfg) and dep["name"] == "Front"
            continue
        args = ModelArgs.model_validate(app["args"])
        assert dep["name"] == served(args.model).deployment
        ModelUserConfig.model_validate(dep["user_config"])
    # anchors are copies: editing one twin's user_config leaves the other alone
    apps = {a["name"]: a for a in cfg["applications"]}
    apps["classifier"]["deployments"][0]["user_config"]["tta"] = "none"
    assert apps["classifier-oip"]["deployments"][0]["user_config"]["tta"] == "flip"


def test_app_config_keeps_the_present_models_and_sets_their_options() -> None:
    cfg = app_config(load_config(), {"classifier": "/ckpt/c"}, port=9000,
                     max_batch_size=4, tta="none", precision="fp32", api_key_file="/k",
                     max_images=8)
    assert [a["name"] for a in cfg["applications"]] == ["mve", "classifier", "classifier-oip"]
    front, clf, oip = cfg["applications"]
    assert front["args"]["models"] == {"classifier": ["classifier", "classifier-oip"]}
    for app in (clf, oip):
        uc = app["deployments"][0]["user_config"]
        assert uc == {"checkpoint": "/ckpt/c", "max_batch_size": 4, "batch_wait_timeout_s": 0.0,
                      "tta": "none", "torch_threads": None, "precision": "fp32"}
        assert "tta" not in app["args"] and "precision" not in app["args"] and app["args"]["model"] == "classifier"
    for app in cfg["applications"]:
        assert AppArgs.model_validate({k: v for k, v in app["args"].items()
                                       if k in AppArgs.model_fields}).max_images == 8
        assert app["args"]["api_key_file"] == "/k"
    assert cfg["http_options"]["port"] == 9000


def test_mounting_renames_and_moves_every_app() -> None:
    cfg = app_config(load_config(), {"classifier": "/c", "vae": "/v"}, name="secure",
                     mount="/secure")
    names = {a["name"]: a["route_prefix"] for a in cfg["applications"]}
    assert names == {"secure": "/secure", "secure-classifier": "/secure/v1/classify",
                     "secure-classifier-oip": "/secure/v2/models/classifier",
                     "secure-vae": "/secure/v1/vae", "secure-vae-oip": "/secure/v2/models/vae"}
    assert all(a["args"]["mount"] == "/secure" for a in cfg["applications"])
    assert cfg["applications"][0]["args"]["models"]["vae"] == ["secure-vae", "secure-vae-oip"]
    with pytest.raises(ValueError):
        AppArgs.model_validate({"mount": "no-leading-slash"})


def test_app_config_refuses_a_checkpoint_for_a_family_the_config_does_not_serve() -> None:
    with pytest.raises(ValueError, match="no applications for .'classifer'"):
        app_config(load_config(), {"classifer": "/c"})
    only_vae = app_config(load_config(), {"vae": "/v"})
    with pytest.raises(ValueError, match="it serves .'vae'"):
        app_config(only_vae, {"classifier": "/c"})


def test_set_user_config_swaps_every_app_of_a_model_in_a_copy() -> None:
    cfg = app_config(load_config(), {"classifier": "/ckpt/c", "vae": "/ckpt/v"})
    swapped = set_user_config(cfg, "classifier", checkpoint="/ckpt/d")
    ucs = {a["name"]: a["deployments"][0].get("user_config", {})
           for a in swapped["applications"]}
    assert ucs["classifier"]["checkpoint"] == ucs["classifier-oip"]["checkpoint"] == "/ckpt/d"
    assert ucs["vae"]["checkpoint"] == "/ckpt/v"
    assert cfg["applications"][1]["deployments"][0]["user_config"]["checkpoint"] == "/ckpt/c"
    with pytest.raises(KeyError):
        set_user_config(app_config(load_config(), {"classifier": "/c"}), "vae", x=1)


def test_embedded_env_takes_free_ports_and_keeps_user_overrides(monkeypatch) -> None:
    env = embedded_env({"RAY_SERVE_HAPROXY_NBTHREAD": "3"})
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "3"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" == env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]
    assert "empty-response" in env["RAY_SERVE_HAPROXY_RETRY_ON"]
    ports = [int(env[k]) for k in PER_HOST_PORTS]
    assert len(set(ports)) == len(ports) and all(p > 1024 for p in ports)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    import os

    with applied(DATAPLANE_ENV):
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def test_replicas_flag_pins_the_model_deployments_only(tmp_path) -> None:
    import argparse

    from mve.errors import UserError
    from serve_app.embedded import _app_config, replica_counts, serve_parent
    from serve_app.testing import make_classifier, make_vae

    clf, vae = make_classifier(tmp_path / "c"), make_vae(tmp_path / "v")
    parse = argparse.ArgumentParser(parents=[serve_parent()]).parse_args
    args = parse(["--classifier", str(clf), "--vae", str(vae), "--replicas", "2",
                  "--replicas", "vae=3"])
    counts = {}
    for app in _app_config(args)["applications"]:
        (dep,) = app["deployments"]
        auto = dep.get("autoscaling_config", {})
        counts[app["name"]] = (auto.get("min_replicas"), auto.get("max_replicas"),
                               auto.get("initial_replicas"))
    assert counts["classifier"] == counts["classifier-oip"] == (2, 2, 2)
    assert counts["vae"] == counts["vae-oip"] == (3, 3, 3)
    assert counts["mve"][2] is None  # the front keeps its autoscaling
    assert replica_counts(None) == {}
    for bad in ("0", "x", "gan=2", "classifier=-1"):
        with pytest.raises(UserError, match="--replicas"):
            replica_counts([bad])
