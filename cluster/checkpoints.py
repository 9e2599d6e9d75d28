"""Checkpoints between Ray Train workers and the run's storage, for every Train entrypoint
(the classifier and VAE in ``cluster.train``, the latent prior in ``cluster.prior_train``):
an upload that commits with its manifest, and a resume that verifies what it is handed."""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import ray.train

from cluster.common import fetch_checkpoint
from mve.checkpoint import META, CheckpointError, verify_checkpoint

__all__ = ["upload_checkpoint", "resume_point"]

logger = logging.getLogger(__name__)


def upload_checkpoint(checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str
                      ) -> ray.train.Checkpoint:
    """``checkpoint_upload_fn`` for ``ray.train.report``: copies a local mve checkpoint into the
    run's storage with the manifest (``mve.json``) written last.

    Ray's default copy writes files in listing order, so an upload cut short by a kill could
    leave ``mve.json`` next to missing weights or training state. Here the manifest of an
    earlier, interrupted attempt at the same directory is deleted first (it must not vouch for
    the new files), the weight files follow, and ``mve.json`` commits them. On a local or
    shared filesystem every file is also written under a temporary name and renamed.
    """
    import pyarrow.fs as pafs


    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    src = Path(checkpoint.path)
    local = isinstance(fs, pafs.LocalFileSystem)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    ordered = [p for p in files if p.name != META] + [p for p in files if p.name == META]
    fs.create_dir(dest, recursive=True)
    manifest = f"{dest}/{META}"
    if fs.get_file_info(manifest).type != pafs.FileType.NotFound:
        fs.delete_file(manifest)
    for f in ordered:
        rel = f.relative_to(src).as_posix()
        target = f"{dest}/{rel}"
        if "/" in rel:
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{dest}/.{rel}.uploading" if local and "/" not in rel else target
        with open(f, "rb") as fin, fs.open_output_stream(tmp) as fout:
            while chunk := fin.read(8 << 20):
                fout.write(chunk)
        if tmp != target:
            fs.move(tmp, target)
    return ray.train.Checkpoint(dest, filesystem=fs)


def resume_point(tmp: Path, rank: int) -> tuple[Path | None, int]:
    """The checkpoint to resume from, fetched into ``tmp`` and verified, and its epoch.

    ``ray.train.get_checkpoint()`` is the run's latest registered checkpoint. If it does not
    verify (a file missing or altered in storage), the newest earlier reported checkpoint that
    does is used instead, with a warning; if none does, the run fails rather than train from a
    corrupt state.
    """

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None, 0
    rejected: list[str] = []

    def attempt(ckpt: ray.train.Checkpoint) -> tuple[Path, int] | None:
        local = fetch_checkpoint(ckpt, tmp / f"ckpt{len(rejected)}")
        try:
            meta = verify_checkpoint(local)
        except CheckpointError as exc:
            logger.warning("rank %d: checkpoint %s does not verify, not resuming from it: %s",
                           rank, ckpt.path, exc)
            rejected.append(f"{ckpt.path}: {exc}")
            return None
        epoch = int((meta.get("metrics") or {}).get("epoch", 0))
        logger.info("rank %d resuming from %s (epoch %d done)", rank, ckpt.path, epoch)
        return local, epoch

    found = attempt(latest)
    if found is not None:
        return found
    try:  # the latest is bad: try the run's other retained checkpoints, newest first
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    except Exception as exc:  # noqa: BLE001 - degrade to "nothing else to try"
        logger.warning("cannot list the run's other checkpoints: %s", exc)
        reported = []
    others = [r for r in reported if r.checkpoint.path != latest.path]
    others.sort(key=lambda r: (r.metrics or {}).get("epoch", -1), reverse=True)
    for r in others:
        found = attempt(r.checkpoint)
        if found is not None:
            return found
    raise RuntimeError("no reported checkpoint of this run verifies; refusing to resume from a "
                       "corrupt state:\n  " + "\n  ".join(rejected))
