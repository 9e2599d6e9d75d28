"""Hyperparameter search on Ray Tune: ASHA early stopping + seeded Optuna (TPE) sampling.

    python -m cluster.tune classifier --data PATH --samples 16 --max-epochs 10
    mve tune vae --data PATH --samples 8 --max-epochs 5 --limit 10000
    ray job submit --working-dir . -- python -m cluster.tune classifier --data /mnt/cifar \\
        --address auto --storage s3://bucket/mve --samples 32 --max-epochs 20 --gpus-per-trial 1

Each trial trains one config drawn from a search-space YAML (default: ``cluster/spaces/
<model>.yaml``, see ``python -m cluster.search -h``) for up to ``--max-epochs`` epochs and
reports the validation metric after every epoch: ``val_accuracy`` (max) for the classifier,
the validation ELBO ``val_elbo_bpd`` in bits/dim (min) for the VAE. ASHA stops the weaker half
(``--reduction-factor 2``) at epochs ``grace, grace*2, grace*4, ...``; Optuna proposes the next
configs from the finished ones.

How a trial trains:

* Default (``--workers-per-trial 1``): the trial *is* the training process. A function
  trainable runs ``mve.train.fit`` in-process and calls ``ray.tune.report(metrics,
  checkpoint=...)`` after every epoch. The models here are small (the classifier has ~0.9M
  parameters, the VAE ~2.7M) and a trial fits one CPU worker or one GPU easily, so this is the
  lightest composition: no extra controller or worker group per trial, Tune itself keeps each
  trial's checkpoints (best 2 by the metric, plus the latest) and a restarted trial resumes from
  ``ray.tune.get_checkpoint()``.
* ``--workers-per-trial N`` (N > 1): every trial is a data-parallel Ray Train (V2) run. The trial
  function is a thin driver that builds ``cluster.train.build_trainer(...)`` with the
  deterministic name ``train-trial_id=<trial id>`` and a ``TuneReportCallback`` that forwards
  rank 0's metrics (plus ``checkpoint_path``) to Tune. Train keeps the checkpoints and resumes a
  restarted trial by its name; the driver reserves no CPU, the N workers reserve
  ``--cpus-per-trial``/``--gpus-per-trial`` each. Use it when one trial needs several GPUs.

ASHA's clock is mve's own ``epoch`` metric rather than Tune's ``training_iteration``: the two
agree for single-worker trials, but a Train-run trial that Tune restarts resumes its Train run at
epoch k while Tune's iteration counter starts again at 1.

Concurrency follows the cluster: ``floor(cluster CPUs / (workers x cpus-per-trial))`` trials at
once (and the same for GPUs when ``--gpus-per-trial`` > 0), at least one.

Resume: the experiment lives at ``<storage>/<name>`` (default ``runs/ray/tune-<model>``).
Rerunning the same command after an interruption restores it with ``Tuner.restore``: finished
trials are kept, unfinished and errored trials continue from their latest checkpoints, and the
searcher and ASHA continue from their saved state. A different search (space, samples, epochs,
data, ...) under the same name is refused; pass a new ``--name``.

The package, one job per module:

    settings.py     TuneSettings and prepare(): the command line resolved before Ray starts
    trainables.py   what runs in Ray per trial (in-process fit, or a Train-run driver)
    placement.py    removes placement groups that stopped Train-run trials leave behind
    experiment.py   the experiment in storage: spec check, trial records, the best checkpoint
    runner.py       run_search(): a new or restored Tuner, run, then exported
    report.py       results table, plots, best.yaml, best/ and summary.json (no Ray)
    cli.py          tune_parent() (every option, composable), run(args), main()
"""

from cluster.tune.cli import DESCRIPTION, EPILOG, build_parser, main, run, tune_parent
from cluster.tune.report import TrialRecord, format_summary, select_best, write_outputs
from cluster.tune.runner import max_concurrent_trials, run_search, trial_dirname
from cluster.tune.settings import SearchError, TuneSettings, prepare
from cluster.tune.trainables import train_driver_fn, train_trial

# Experiments started before this package existed pickled their trial-folder function under
# this name (Tuner.restore unpickles it); the alias keeps them resumable.
_trial_dirname = trial_dirname

__all__ = ["DESCRIPTION", "EPILOG", "SearchError", "TrialRecord", "TuneSettings",
           "build_parser", "format_summary", "main", "max_concurrent_trials", "prepare", "run",
           "run_search", "select_best", "train_driver_fn", "train_trial", "tune_parent",
           "write_outputs"]
