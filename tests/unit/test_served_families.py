"""serve_app.families, the one table of served model families, against the registry, the
Serve config and the flags of ``mve serve`` (no Ray imported; the deployments and the front,
which import Ray, are checked in tests/integration/test_served_deployments.py)."""

from __future__ import annotations

import pytest

from mve.models import get_spec, list_models
from serve_app.deploy import load_config, model_apps
from serve_app.embedded import serve_parent
from serve_app.families import MODELS, SERVED, served
from serve_app.schemas import ModelArgs


def test_every_served_family_is_a_registered_model() -> None:
    assert set(MODELS) <= set(list_models())
    for family in SERVED.values():
        assert get_spec(family.name).name == family.name


def test_the_config_serves_each_family_at_its_prefix() -> None:
    cfg = load_config()
    prefixes = {a["name"]: a["route_prefix"] for a in cfg["applications"]}
    apps = model_apps(cfg)
    assert set(apps) == set(MODELS)
    for name, family in SERVED.items():
        api, oip = apps[name]
        assert prefixes[api] == family.api_prefix
        assert prefixes[oip] == f"/v2/models/{name}"


def test_an_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="not a served model family"):
        served("gan")
    with pytest.raises(ValueError):
        ModelArgs.model_validate({"model": "gan"})


def test_mve_serve_has_one_checkpoint_flag_per_family() -> None:
    args = serve_parent().parse_args([f"--{n}=/ckpt/{n}" for n in MODELS])
    assert {n: getattr(args, n) for n in MODELS} == {n: f"/ckpt/{n}" for n in MODELS}
