"""The command line of a search: ``python -m cluster.tune`` and ``mve tune``.

:func:`tune_parent` holds every option (a parent parser, so ``mve tune`` composes it),
:func:`run` is the handler, :func:`main` the ``python -m cluster.tune`` entry point.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cluster.tune.report import format_summary
from cluster.tune.runner import run_search
from cluster.tune.settings import prepare
from mve.errors import run_command
from mve.logs import setup_logging
from mve.models import get_spec, list_models
from mve.options import add_tracking_options

__all__ = ["DESCRIPTION", "EPILOG", "tune_parent", "build_parser", "run", "main"]

DESCRIPTION = """\
Hyperparameter search with Ray Tune: ASHA early stopping + seeded Optuna
sampling over a YAML search space. Trials are single-worker by default
(--workers-per-trial W makes each a data-parallel Ray Train run). Runs on
an embedded local Ray instance, or joins a cluster with --address.

  mve tune classifier --data PATH --samples 16 --max-epochs 10
  mve tune vae --data PATH --samples 8 --max-epochs 5 --limit 10000"""

EPILOG = """\
search space (--space FILE, default cluster/spaces/MODEL.yaml):
  dotted TrainConfig keys -> a constant or one of
    {loguniform: [lo, hi]}  {uniform: [lo, hi]}  {quniform: [lo, hi, q]}
    {randint: [lo, hi]} (hi excluded)  {qrandint: [lo, hi, q]} (hi included)
    {lograndint: [lo, hi]}  {choice: [a, b, ...]}
  plus an optional `fixed:` block of overrides for every trial. Config precedence per trial:
  recipe < --preset < --config < fixed < --set < --max-epochs/--limit/--val-size/--seed
  < sampled params; --set on a searched key pins it. Check a file without Ray:
  python -m cluster.search MODEL --space FILE

outputs in --out (default runs/tune-MODEL):
  results.csv, results.md   one row per trial: status, params, epochs, final/best metric,
                            stopped early by ASHA, node
  trial_curves.png          metric per epoch of every trial (x = stopped early by ASHA)
  param_importance.png      Optuna fANOVA importances over the finished trials
  best.yaml                 the best trial's full config: mve train MODEL --config best.yaml
  best/                     the best checkpoint, servable, with REPORT.md: mve evaluate OUT/best
  summary.json              best trial, metric, params and paths
  Ray's own files (trial logs, checkpoints, experiment state) are in STORAGE/NAME, and
  each trial's TensorBoard files in STORAGE/NAME/trial_ID: tensorboard --logdir STORAGE
  (--mlflow URI: a parent run for the search, a child run per trial)

resume: rerun the same command; finished trials are not rerun.
"""


def _search_options(p: argparse.ArgumentParser) -> None:
    metrics = ", ".join(f"{get_spec(m).metric} ({get_spec(m).mode}) for the {m}"
                        for m in list_models())
    p.add_argument("model", choices=list_models(), help=f"model family; the metric is {metrics}")
    g = p.add_argument_group("search")
    g.add_argument("--samples", type=int, default=8, metavar="N",
                   help="number of trials (configs) to try (default 8)")
    g.add_argument("--max-epochs", type=int, default=10, metavar="E",
                   help="epochs of a trial that ASHA never stops; also the LR-schedule length "
                        "(default 10)")
    g.add_argument("--space", metavar="FILE",
                   help="search-space YAML (default: the packaged cluster/spaces/MODEL.yaml)")
    g.add_argument("--seed", type=int, metavar="S",
                   help="seed of the Optuna sampler and of every trial's training (default 0)")
    g.add_argument("--grace-period", type=int, default=1, metavar="EPOCHS",
                   help="epochs before ASHA may stop a trial (default 1)")
    g.add_argument("--reduction-factor", type=float, default=2, metavar="RF",
                   help="ASHA keeps the best 1/RF of trials at each rung (default 2)")
    g.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    g.add_argument("--max-failures", type=int, default=1, metavar="N",
                   help="restarts of a failed trial from its latest checkpoint (default 1)")


def _data_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and config")
    d.add_argument("--data", metavar="PATH",
                   help="data path: cifar-10-batches-py, an image folder or a .tar.gz/.zip of "
                        "one (default: $MVE_DATA, else CIFAR-10 in ~/.cache/mve); must be "
                        "readable at the same path on every node")
    d.add_argument("--limit", type=int, metavar="N",
                   help="at most N training images, stratified (fast searches)")
    d.add_argument("--val-size", type=int, metavar="N",
                   help="validation images held out (default: the config's, 5000)")
    d.add_argument("--preset", help="recipe preset every trial starts from (default: 'baseline' "
                                      "where the family has one, the recipe the default spaces "
                                      "search around; e.g. 'fast' with "
                                      "cluster/spaces/classifier-fast.yaml)")
    d.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file(s) every trial starts from; repeatable")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="dotted override for every trial, e.g. --set model.num_classes=4; "
                        "pins the key if the space searches it; repeatable")


def _resource_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("resources")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C",
                   help="CPUs per training worker of a trial (default 1)")
    r.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                   help="GPUs per training worker of a trial; fractions share a GPU (default 0)")
    r.add_argument("--workers-per-trial", type=int, default=1, metavar="W",
                   help="1 (default): a trial trains in one process; W > 1: each trial is a "
                        "data-parallel Ray Train run of W workers")


def _output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("cluster, storage and output")
    o.add_argument("--address", metavar="ADDR",
                   help="join this Ray cluster ('auto', ray://host:10001, host:6379); default: "
                        "start an embedded local instance for this command")
    o.add_argument("--storage", metavar="URI",
                   help="where Ray keeps experiment state and checkpoints: a path (shared by "
                        "all nodes on a multi-node cluster) or s3://bucket/prefix (default "
                        "./runs/ray)")
    o.add_argument("--s3-endpoint", metavar="URL",
                   help="S3-compatible endpoint for s3:// storage, e.g. http://minio:9000")
    o.add_argument("--name", help="experiment name; the same name resumes (default tune-MODEL)")
    o.add_argument("--out", metavar="DIR", help="report directory (default runs/tune-MODEL)")
    # SUPPRESS: when not given here, `mve -q tune` keeps the -q parsed before the command
    # (argparse copies a subcommand's defaults over the main parser's values)
    o.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only warnings, errors and the final summary (also -v 0)")
    o.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2],
                   help="the search's progress: 0 none, 1 a compact table of the trials "
                        "(default), 2 also a line per result and mve's epoch lines")


def tune_parent() -> argparse.ArgumentParser:
    """Every option of a search, as a parent parser (``add_help=False``) to compose:
    ``sub.add_parser("tune", parents=[tune_parent()], description=DESCRIPTION, epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter)``."""
    p = argparse.ArgumentParser(add_help=False)
    _search_options(p)
    _data_options(p)
    _resource_options(p)
    _output_options(p)
    add_tracking_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cluster.tune`` argument parser (it shows itself as ``mve tune``)."""
    return argparse.ArgumentParser(prog="mve tune", parents=[tune_parent()],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description=DESCRIPTION, epilog=EPILOG)


def run(args: argparse.Namespace) -> int:
    """Runs the search ``args`` describe; returns the exit code.

    Everything that can fail fast is checked before Ray starts. User errors (a bad option,
    space, config or data path, a different search under an existing name) raise
    :class:`mve.errors.UserError` for :func:`mve.errors.run_command` to print.
    """
    args.quiet = getattr(args, "quiet", False)  # absent: neither `mve -q` nor `tune -q`
    setup_logging(quiet=args.quiet, verbose=getattr(args, "log_verbose", False))
    settings = prepare(args)
    import ray  # only now: a command line that fails its checks never loads Ray

    from cluster.common import check_gpus, init_ray

    started = init_ray(settings.address)
    try:
        check_gpus(settings.gpus_per_trial, embedded=started, what="--gpus-per-trial")
        summary = run_search(settings)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if started:
            ray.shutdown()
    return _finish(summary)


def _finish(summary: Mapping[str, Any]) -> int:
    """Prints the summary (on stdout, even with -q: it is the result); the exit code says
    whether the search finished."""
    print(format_summary(summary), flush=True)
    if summary["unfinished"]:
        print(f"mve tune: the search was interrupted with {summary['unfinished']} trial(s) "
              f"unfinished; rerun the same command to resume it", file=sys.stderr)
        return 130
    if summary["terminated"] == 0:
        print("mve tune: error: no trial finished", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.tune``: returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line the reports record
    return run_command(run, args, prog="mve tune")
