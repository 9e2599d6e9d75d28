"""The ``mve`` command line: a thin layer on top of the three packages.

It is the only code that imports all of them: ``mve`` (pure PyTorch: summary, config, data,
local training, evaluation, VAE tools), ``cluster`` (training on Ray Train, ``tune``, ``k8s``)
and ``serve_app`` (``serve``, ``predict``, ``generate``). Each package exposes parent parsers
and handlers; :mod:`mve_cli.main` composes them.
"""
