"""Search spaces as Ray Tune sees them: domains, bounds, and what OptunaSearch converts them to.

Needs ``ray.tune`` (no running Ray instance).
"""

from __future__ import annotations

import pytest
import yaml

from cluster.search import base_config, load_space, parse_space, validate_space

pytestmark = pytest.mark.ray

ALL_DISTRIBUTIONS = """\
optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
model.dropout: {uniform: [0.0, 0.3]}
label_smoothing: {quniform: [0.0, 0.2, 0.05]}
model.cnn_layers: {randint: [4, 8]}
model.final_channels: {qrandint: [128, 320, 2]}
model.starting_channels: {lograndint: [16, 65]}
optim.name: {choice: [adam, adamw]}
model.residual: {choice: [false, true]}
"""


def _space(text: str):
    space = parse_space(yaml.safe_load(text), source="test")
    validate_space(space, base_config("classifier", space))
    return space


@pytest.mark.parametrize("model", ["classifier", "vae"])
def test_optuna_converts_the_default_spaces_as_we_describe_them(model):
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(None, model)
    converted = OptunaSearch.convert_search_space(space.param_space())
    assert converted == {k: p.to_optuna() for k, p in space.params.items()}


def test_every_supported_distribution_converts_and_samples_within_bounds():
    from ray.tune.search.optuna import OptunaSearch

    space = _space(ALL_DISTRIBUTIONS)
    param_space = space.param_space()
    assert OptunaSearch.convert_search_space(param_space) == \
        {k: p.to_optuna() for k, p in space.params.items()}
    samples = {k: [d.sample() for _ in range(300)] for k, d in param_space.items()}
    assert set(samples["model.cnn_layers"]) == {4, 5, 6, 7}  # randint: hi excluded
    fc = samples["model.final_channels"]
    assert min(fc) >= 128 and max(fc) <= 320 and all(v % 2 == 0 for v in fc)
    assert all(1e-4 <= v < 1e-2 for v in samples["optim.lr"])
    assert all(16 <= v < 65 for v in samples["model.starting_channels"])
    assert set(samples["optim.name"]) == {"adam", "adamw"}
    ls = samples["label_smoothing"]
    assert all(0.0 <= v <= 0.2 + 1e-9 and abs(v / 0.05 - round(v / 0.05)) < 1e-6 for v in ls)


def test_the_optuna_searcher_accepts_the_space():
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=None, metric="val_accuracy", mode="max", seed=0)
    assert searcher.set_search_properties("val_accuracy", "max",
                                          load_space(None, "classifier").param_space())
    suggestion = searcher.suggest("t1")
    assert set(suggestion) == set(load_space(None, "classifier").params)
