"""Search-space YAML files -> Ray Tune ``param_space`` (validated against ``TrainConfig``).

    python -m cluster.search classifier                  # print the default space, resolved
    python -m cluster.search vae --space my_space.yaml   # check a space file without Ray

A space file maps dotted :class:`~mve.config.TrainConfig` keys (see ``mve config show MODEL``)
to a constant or to a one-key mapping that names a distribution. The names and the bounds
follow ``ray.tune``'s functions of the same name exactly::

    optim.lr:               {loguniform: [1.0e-4, 1.0e-2]}  # float, log-uniform in [lo, hi)
    model.dropout:          {uniform: [0.0, 0.3]}           # float in [lo, hi)
    label_smoothing:        {quniform: [0.0, 0.2, 0.05]}    # float in [lo, hi], multiple of q
    model.cnn_layers:       {randint: [4, 8]}               # int in [lo, hi)  (hi EXCLUDED: 4..7)
    model.final_channels:   {qrandint: [128, 320, 2]}       # int in [lo, hi], multiple of q
                                                            #   (hi INCLUDED)
    model.starting_channels: {lograndint: [16, 65]}         # int, log-uniform in [lo, hi)
    optim.name:             {choice: [adam, adamw]}         # one of the listed scalars
    optim.schedule:         onecycle                        # a constant: same in every trial
    fixed:                                                  # more constants (dotted or nested)
      model.activation: mish
      data: {augment: {cutout: 0}}

Only distributions that Ray's ``OptunaSearch`` can convert are accepted (no ``grid_search``,
``randn``, ``qloguniform`` or ``sample_from``), and ``choice`` options must be scalars. Every key
and the extreme values of every distribution are checked against ``TrainConfig`` when the file
is loaded, so a typo fails before Ray starts. This module does not import Ray until
:meth:`SearchSpace.param_space` is called.
"""

from cluster.search.fit import (
    FORBIDDEN_KEYS,
    SEARCH_RECIPE,
    base_config,
    search_recipe,
    trial_config,
    valid_keys,
    validate_space,
)
from cluster.search.space import (
    DISTRIBUTIONS,
    Param,
    SearchSpace,
    SearchSpaceError,
    default_space_path,
    flatten,
    load_space,
    parse_space,
    unflatten,
)

__all__ = [
    "DISTRIBUTIONS", "FORBIDDEN_KEYS", "SEARCH_RECIPE", "Param", "SearchSpace",
    "SearchSpaceError", "default_space_path", "load_space", "parse_space", "flatten",
    "unflatten", "valid_keys", "validate_space", "trial_config", "search_recipe", "base_config",
]
