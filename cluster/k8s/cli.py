"""``mve k8s``: run mve on KubeRay from the current kube context (the ``kubernetes`` client).

    mve k8s submit tune classifier --samples 16 --max-epochs 10 --space my-space.yaml
    mve k8s submit train vae --epochs 30 --workers 4 --gpu
    mve k8s promote /mnt/cluster_storage/tune/mve-tune-classifier-1128-1305/best --model classifier
    mve k8s status
    python -m cluster.k8s render-serve-config          # k8s/base/serve-config.yaml

``submit`` clones the suspended RayJob template ``mve-tune`` that ``kubectl apply -k
k8s/overlays/<cpu|gpu>`` installs (or a RayJob in a YAML file, ``--template FILE``) under a
fresh name, with the entrypoint ``python -m cluster.tune|cluster.train ARGS`` (checked with that
module's own argument parser first) and starts it. Local files given to ``--space``/``--config``
travel in a ConfigMap owned by the RayJob and mounted at ``/etc/mve/job`` in every pod.

``promote`` rewrites ``user_config.checkpoint`` of the model deployment(s) in the RayService's
``serveConfigV2`` with one JSON patch (a ``test`` of the old value, then a ``replace``): a
serveConfigV2-only change is applied in place by KubeRay, and Serve reloads the checkpoint in
``reconfigure`` without restarting replicas. A later ``kubectl apply -k`` restores the committed
serveConfigV2; make a promotion permanent in ``serve_app/config.yaml`` (then
``render-serve-config``).

``status`` prints the RayClusters, RayJobs and RayServices of the namespace with the Serve
application and deployment statuses from the RayService status.

``render-serve-config`` writes ``k8s/base/serve-config.yaml``, the RayService's serveConfigV2,
from ``serve_app/config.yaml`` (the single source of truth), with the placeholder checkpoint
paths ``/models/...`` moved onto the shared volume (``/mnt/cluster_storage/models/...``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.k8s.client import make_api_client
from cluster.k8s.common import (
    DEFAULT_NAMESPACE,
    DEFAULT_SERVICE,
    DEFAULT_TEMPLATE,
    STORAGE_ROOT,
    K8sError,
)
from cluster.k8s.offline import OfflineCluster
from cluster.k8s.ops import promote, status, submit
from cluster.k8s.serve_config import (
    MODELS_ROOT,
    PLACEHOLDER_ROOT,
    SERVE_CONFIG_OUT,
    SERVE_CONFIG_SOURCE,
    write_serve_config,
)
from mve.errors import run_command

__all__ = ["k8s_parent", "run", "main"]

_Subparsers = Any  # argparse's _SubParsersAction (a private type)


def _common_parent() -> argparse.ArgumentParser:
    """The options of every action that talks to a cluster."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--context", help="kube context (default: the current one)")
    common.add_argument("-n", "--namespace",
                        default=os.environ.get("MVE_K8S_NAMESPACE", DEFAULT_NAMESPACE),
                        help="namespace (default $MVE_K8S_NAMESPACE or mve)")
    return common


def _add_submit(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("submit", parents=[common],
                       help="run cluster.tune/cluster.train as a RayJob",
                       description="Create a RayJob running `python -m cluster.tune|train ARGS` "
                                   "from the RayJob template (default: the suspended mve-tune "
                                   "that the overlays install; without a command, its own "
                                   "entrypoint). --address auto, --storage/--out on "
                                   f"{STORAGE_ROOT} and (tune) --name JOB are added when not "
                                   "given; local --space/--config files are shipped in a "
                                   "ConfigMap.")
    s.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="RayJob to clone: a name in the namespace, or a YAML file "
                        f"(default {DEFAULT_TEMPLATE})")
    s.add_argument("--name", help="RayJob name (default mve-COMMAND-MODEL-MMDD-HHMMSS)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the objects instead of creating them (without a kube config: "
                        "cloned from the --overlay's own template)")
    _add_overlay(s)
    s.add_argument("entry", nargs="?", choices=["tune", "train"],
                   help="python -m cluster.tune or cluster.train (default: the template's own "
                        "entrypoint)")
    s.add_argument("entry_args", nargs=argparse.REMAINDER,
                   help="its arguments, e.g. classifier --samples 16 --max-epochs 10")


def _add_promote(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    # Imported here: the registry brings torch, which the rest of the k8s tooling never needs.
    from mve.models import list_models

    p = sub.add_parser("promote", parents=[common],
                       help="serve a checkpoint: patch the RayService's serveConfigV2",
                       description="Set user_config.checkpoint of a model deployment in the "
                                   "RayService's serveConfigV2 (an in-place update: Serve "
                                   "reloads the checkpoint without restarting replicas).")
    p.add_argument("checkpoint", help="checkpoint directory or URI as the pods see it, e.g. "
                                      f"{STORAGE_ROOT}/tune/classifier/best or s3://...")
    p.add_argument("--model", choices=list_models(),
                   help="which model deployment (needed when the app serves several)")
    p.add_argument("--service", default=DEFAULT_SERVICE,
                   help=f"RayService name (default {DEFAULT_SERVICE})")
    p.add_argument("--app", help="Serve application (default: the only one)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the JSON patch only (without a kube config: against the "
                        "--overlay's RayService)")
    _add_overlay(p)


def _add_overlay(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", choices=["cpu", "gpu"], default="cpu",
                   help="--dry-run without a kube config: preview against the objects "
                        "`kubectl kustomize k8s/overlays/OVERLAY` installs (default cpu)")


def _add_render(sub: _Subparsers) -> None:
    r = sub.add_parser("render-serve-config",
                       help="write k8s/base/serve-config.yaml from serve_app/config.yaml")
    r.add_argument("--source", default=str(SERVE_CONFIG_SOURCE), help="Serve config file")
    r.add_argument("--out", default=str(SERVE_CONFIG_OUT), help="generated file")
    r.add_argument("--checkpoint-root", default=MODELS_ROOT,
                   help=f"where {PLACEHOLDER_ROOT}/... checkpoints live in the pods "
                        f"(default {MODELS_ROOT})")
    r.add_argument("--check", action="store_true",
                   help="exit 1 if the file is not up to date, without writing")


def k8s_parent(prog: str = "mve k8s") -> argparse.ArgumentParser:
    """The ``mve k8s`` actions as a parent parser (``parents=[k8s_parent()]``).

    ``prog`` is the command the actions' usage lines start with.
    """
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    common = _common_parent()
    sub = parser.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    _add_submit(sub, common)
    _add_promote(sub, common)
    st = sub.add_parser("status", parents=[common],
                        help="RayCluster/RayJob/RayService states and Serve app status")
    st.add_argument("--json", action="store_true", help="print JSON")
    _add_render(sub)
    return parser


# -- handlers -----------------------------------------------------------------------------

def _render(args: argparse.Namespace) -> int:
    ok = write_serve_config(args.out, source=args.source,
                            checkpoint_root=args.checkpoint_root, check=args.check)
    if args.check and not ok:
        print(f"{args.out} is out of date: python -m cluster.k8s render-serve-config",
              file=sys.stderr)
        return 1
    print(f"{args.out}: {'up to date' if args.check else 'written'}")
    return 0


def _submit(args: argparse.Namespace, api_client: Any) -> int:
    entry_args = list(args.entry_args)
    if entry_args[:1] == ["--"]:
        entry_args = entry_args[1:]
    # A --dry-run from a template file needs no cluster (and no kube config).
    local = args.dry_run and Path(args.template).is_file()
    if api_client is None and not local:
        api_client = _client(args)
    submit(api_client, namespace=args.namespace, command=args.entry, args=entry_args,
           template=args.template, name=args.name, dry_run=args.dry_run)
    return 0


def _client(args: argparse.Namespace) -> Any:
    """The kube context's API client; for a ``--dry-run`` without a kube config, the objects
    the ``--overlay`` installs (nothing is sent anywhere)."""
    try:
        return make_api_client(args.context)
    except K8sError as exc:
        if not getattr(args, "dry_run", False):
            raise
        offline = OfflineCluster.from_overlay(args.overlay, args.namespace)
        print(f"mve k8s: {exc}; previewing against {offline.source} (kubectl kustomize)",
              file=sys.stderr)
        return offline


def run(args: argparse.Namespace, api_client: Any = None) -> int:
    """Runs ``mve k8s ACTION``; returns the exit code.

    A user error raises :class:`K8sError` (a ``mve.errors.UserError``); the caller turns it
    into one line and exit code 2 (:func:`mve.errors.run_command`).
    """
    if args.k8s_command == "render-serve-config":
        return _render(args)
    if args.k8s_command == "submit":
        return _submit(args, api_client)
    if args.k8s_command not in ("promote", "status"):
        raise K8sError(f"unknown action {args.k8s_command!r}")
    client = api_client if api_client is not None else _client(args)
    if args.k8s_command == "promote":
        promote(client, namespace=args.namespace, checkpoint=args.checkpoint,
                service=args.service, model=args.model, app=args.app, dry_run=args.dry_run)
    else:
        status(client, namespace=args.namespace, as_json=args.json)
    return 0


def build_parser(prog: str = "python -m cluster.k8s") -> argparse.ArgumentParser:
    """The standalone parser of ``python -m cluster.k8s`` (the same actions as ``mve k8s``)."""
    return argparse.ArgumentParser(prog=prog, description=__doc__, parents=[k8s_parent(prog)],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.k8s ACTION ...`` (the same as ``mve k8s ACTION ...``)."""
    return run_command(run, build_parser().parse_args(argv), prog="mve k8s")
