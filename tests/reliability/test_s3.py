"""Checkpoints on object storage: Ray Train with ``--storage s3://...`` against moto's S3.

moto's S3 server runs inside this test process on a free loopback port, behind a thin WSGI
layer that logs every write and can hold the upload of one object: the test then SIGKILLs the
Train worker blocked in that upload, which is exactly a kill in the middle of a checkpoint
upload (the held object is never stored, as S3 never stores a PUT whose client died).

    .venv/bin/pytest tests/reliability/test_s3.py -m "" -s
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import (
    SMALL_CLASSIFIER,
    Run,
    colour_archive,
    epoch_log_lines,
    run_env,
    session_pids,
    train_worker_pids,
    wait_for,
)

from cluster.common import fetch_checkpoint
from mve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from mve.runs import latest_checkpoint
from mve.storage import resolve_storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "mvebucket"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
CKPT_FILES = {"model.safetensors", "training_state.safetensors", "mve.json"}


class S3Server:
    """moto's S3 on 127.0.0.1:<free port>, logging writes; ``hold(suffix)`` blocks every upload
    of a key ending in ``suffix`` until ``drop_held()``, which answers them with a 500 without
    storing anything."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self._app = DomainDispatcherApplication(create_backend_app)
        self._lock = threading.Lock()
        # (method, path, query, status) of every write moto answered
        self.writes: list[tuple[str, str, str, str]] = []
        self.held_paths: list[str] = []
        self._hold_suffix: str | None = None
        self.held = threading.Event()
        self._release = threading.Event()
        self._server = make_server("127.0.0.1", 0, self, threaded=True,
                                   request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        suffix = self._hold_suffix
        if suffix and method in ("PUT", "POST") and path.endswith(suffix):
            with self._lock:
                self.held_paths.append(path)
            self.held.set()
            self._release.wait(timeout=900)
            start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
            return [b"<Error><Code>InternalError</Code><Message>connection lost</Message>"
                    b"</Error>"]
        if method not in ("PUT", "POST", "DELETE"):
            return self._app(environ, start_response)
        status: list[str] = []

        def recording_start_response(st, headers, exc_info=None):
            status.append(st)
            return start_response(st, headers, exc_info)

        body = self._app(environ, recording_start_response)
        with self._lock:
            self.writes.append((method, path, query, status[0] if status else "?"))
        return body

    def commits(self, since: int = 0) -> list[str]:
        """Paths of the objects stored (in order) by the writes from index ``since`` on: a plain
        PUT, or the POST that completes a multipart upload (pyarrow streams use those)."""
        return [p for m, p, q, st in self.writes[since:] if st.startswith("200") and (
            (m == "PUT" and "partNumber=" not in q) or (m == "POST" and "uploadId=" in q))]

    def hold(self, suffix: str) -> None:
        self.held.clear()
        self._release.clear()
        self._hold_suffix = suffix

    def drop_held(self) -> None:
        self._hold_suffix = None
        self._release.set()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                         Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def snapshot_latest(self, run_prefix: str) -> str | None:
        """The checkpoint directory Ray Train's snapshot of the run names as latest."""
        try:
            body = self.client().get_object(
                Bucket=BUCKET, Key=f"{run_prefix}checkpoint_manager_snapshot.json")["Body"]
            latest = json.loads(body.read()).get("latest_checkpoint_result") or {}
        except Exception:  # noqa: BLE001 - not written yet
            return None
        return latest.get("checkpoint_dir_name")

    def download(self, prefix: str, dest: Path) -> Path:
        """Copies every object under ``prefix`` into ``dest`` (a local mirror)."""
        c = self.client()
        for key in self.keys(prefix):
            rel = key[len(prefix):].lstrip("/")
            if not rel or rel.endswith("/"):
                continue  # directory markers
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            c.download_file(BUCKET, key, str(dest / rel))
        return dest

    def stop(self) -> None:
        self.drop_held()
        self._server.shutdown()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request
    server = S3Server()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("s3-data"), classes=3, per_class=100)


def _cmd(archive: Path, s3: S3Server, out: Path, *, epochs: int, name: str | None = None
         ) -> list[str]:
    sets = ["--preset", "baseline", *(a for s in SMALL_CLASSIFIER for a in ("--set", s))]
    return [sys.executable, "-m", "cluster.train", "classifier", "--data", str(archive),
            "--workers", "1", "--epochs", str(epochs), "--max-failures", "2",
            "--storage", f"s3://{BUCKET}/runs", "--s3-endpoint", s3.endpoint,
            "--out", str(out), *(["--name", name] if name else []), *sets]


def _checkpoint_dirs(keys: list[str], run_prefix: str) -> dict[str, set[str]]:
    """epoch dir -> file names, from the object keys under ``run_prefix``."""
    dirs: dict[str, set[str]] = {}
    for key in keys:
        parts = key[len(run_prefix):].strip("/").split("/")
        if len(parts) == 2 and parts[0].startswith("epoch_") and parts[1]:
            dirs.setdefault(parts[0], set()).add(parts[1])
    return dirs


def _state_dict_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("stored", [
    [],
    ["model.safetensors"],
    ["model.safetensors", "training_state.safetensors"],
    ["model.safetensors", "mve.json"],  # Ray's default copy can store the manifest early
    ["mve.json"],
])
def test_latest_checkpoint_skips_a_partly_stored_checkpoint(stored, tmp_path):
    """Every state an interrupted upload of epoch_0002 can leave: latest_checkpoint (what a
    resume outside Ray uses) picks epoch_0001 unless epoch_0002 is complete."""
    from mve.config import load_train_config
    from mve.models import build_model

    cfg = load_train_config("classifier", preset="baseline", overrides=SMALL_CLASSIFIER)
    model = build_model("classifier", cfg.model_config)
    kw = {"model_name": "classifier", "model_config": cfg.model_config,
          "preprocessing": {"input_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}}
    save_checkpoint(tmp_path / "run" / "epoch_0001", model, training_state={"epoch": 1}, **kw)
    full = save_checkpoint(tmp_path / "full", model, training_state={"epoch": 2}, **kw)
    partial = tmp_path / "run" / "epoch_0002"
    partial.mkdir()
    for name in stored:
        (partial / name).write_bytes((full / name).read_bytes())
    assert latest_checkpoint(tmp_path / "run").name == "epoch_0001"
    for name in CKPT_FILES - set(stored):  # the upload completes
        (partial / name).write_bytes((full / name).read_bytes())
    assert latest_checkpoint(tmp_path / "run").name == "epoch_0002"
    (partial / "training_state.safetensors").write_bytes(b"\0" * 64)  # torn overwrite
    assert latest_checkpoint(tmp_path / "run").name == "epoch_0001"


def test_train_checkpoints_to_s3_and_the_export_loads(archive, s3, tmp_path, record_figures,
                                                      monkeypatch):
    out = tmp_path / "out"
    started = time.monotonic()
    writes_before = len(s3.writes)
    with Run(_cmd(archive, s3, out, epochs=2), tmp_path / "run.log",
             env=run_env(**CREDENTIALS)) as run:
        assert run.wait(timeout=600) == 0, run.output()[-4000:]
    run_s = time.monotonic() - started
    summary = json.loads((out / "ray_run.json").read_text())
    name = summary["run_name"]
    assert summary["storage"].startswith(f"{BUCKET}/runs/{name}")
    run_prefix = f"runs/{name}/"
    keys = s3.keys(run_prefix)
    dirs = _checkpoint_dirs(keys, run_prefix)
    assert dirs == {"epoch_0001": CKPT_FILES, "epoch_0002": CKPT_FILES}, keys
    assert f"{run_prefix}checkpoint_manager_snapshot.json" in keys
    # The manifest commits a checkpoint: within every checkpoint directory it was stored last.
    commits = s3.commits(writes_before)
    for d in dirs:
        order = [p.rsplit("/", 1)[1] for p in commits if f"/{d}/" in p and not p.endswith("/")]
        assert order[-1] == "mve.json" and set(order) == CKPT_FILES, (d, order)

    # The exported checkpoint loads, and it is the model of the last S3 checkpoint, read back
    # through Ray's Checkpoint from s3:// and verified.
    exported = load_checkpoint(out)
    assert exported.meta["metrics"]["epoch"] == 2
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    storage_path, fs = resolve_storage(f"s3://{BUCKET}/runs", s3_endpoint=s3.endpoint)
    fetched = fetch_checkpoint(f"{storage_path}/{name}/epoch_0002", tmp_path / "fetched",
                               filesystem=fs)
    verify_checkpoint(fetched)
    assert _state_dict_equal(load_checkpoint(fetched).model, exported.model)
    mirror = s3.download(run_prefix, tmp_path / "mirror")
    for d in dirs:
        verify_checkpoint(mirror / d)
    record_figures("s3_checkpoints", {
        "storage": f"s3://{BUCKET}/runs/{name}", "epochs": 2,
        "objects_in_run": len(keys), "checkpoint_objects": sum(map(len, dirs.values())),
        "s3_writes": len(s3.writes) - writes_before, "objects_stored": len(commits),
        "run_s": round(run_s, 1)})


def test_serve_loader_reads_a_checkpoint_from_s3(s3, tmp_path, monkeypatch):
    """``mve serve --classifier s3://...``: the serve loader fetches and verifies the checkpoint."""
    from mve.config import load_train_config
    from mve.models import build_model

    cfg = load_train_config("classifier", preset="baseline", overrides=SMALL_CLASSIFIER)
    model = build_model("classifier", cfg.model_config)
    local = save_checkpoint(tmp_path / "ckpt", model, model_name="classifier",
                            model_config=cfg.model_config, class_names=["a", "b", "c"],
                            preprocessing={"input_size": [32, 32], "mean": [0.5] * 3,
                                           "std": [0.25] * 3})
    for f in local.iterdir():
        s3.client().upload_file(str(f), BUCKET, f"served/ckpt/{f.name}")
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(k, v)
    from serve_app.loading import load_model

    served = load_model(f"s3://{BUCKET}/served/ckpt", "classifier")
    assert _state_dict_equal(served.ckpt.model, load_checkpoint(local).model)


def test_kill_during_checkpoint_upload_never_leaves_a_corrupt_latest(archive, s3, tmp_path,
                                                                    record_figures):
    """The worker is SIGKILLed while it uploads epoch 2's checkpoint (its weights stored, its
    training state in flight, its manifest not yet written). Ray's snapshot still names epoch 1,
    the partial epoch_0002 does not verify and is skipped by latest_checkpoint, and the restarted
    worker group resumes from epoch 1 and finishes; every checkpoint left in S3 verifies."""
    name = "s3-kill"
    run_prefix = f"runs/{name}/"
    out = tmp_path / "out"
    writes_before = len(s3.writes)
    s3.hold("/epoch_0002/training_state.safetensors")
    try:
        with Run(_cmd(archive, s3, out, epochs=3, name=name), tmp_path / "run.log",
                 env=run_env(**CREDENTIALS)) as run:
            wait_for(s3.held.is_set, timeout=420, what="epoch 2's checkpoint upload",
                     alive=run.proc, log=run.log)
            # The worker is stuck in the upload; Train's controller registers epoch 1 (it was
            # reported before) in the run's snapshot, then the kill lands.
            wait_for(lambda: s3.snapshot_latest(run_prefix) == "epoch_0001", timeout=60,
                     what="epoch 1 in the run's snapshot", alive=run.proc, log=run.log)
            workers = train_worker_pids(run.pid)
            assert len(workers) == 1, workers
            t_kill = run.elapsed()
            os.kill(workers[0], signal.SIGKILL)
            wait_for(lambda: workers[0] not in session_pids(run.pid), timeout=30,
                     what="the worker to die")
            # What a resume would find in storage right now.
            at_kill = _checkpoint_dirs(s3.keys(run_prefix), run_prefix)
            mirror = s3.download(run_prefix, tmp_path / "at-kill")
            s3.drop_held()
            assert run.wait(timeout=600) == 0, run.output()[-4000:]
            run_s = run.elapsed()
    finally:
        s3.drop_held()

    assert at_kill["epoch_0001"] == CKPT_FILES
    assert "mve.json" not in at_kill.get("epoch_0002", set())  # uncommitted
    assert "model.safetensors" in at_kill["epoch_0002"]  # partly uploaded
    snapshot = json.loads((mirror / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "epoch_0001"
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(mirror / "epoch_0002")
    picked = latest_checkpoint(mirror)
    assert picked is not None and picked.name == "epoch_0001"

    summary = json.loads((out / "ray_run.json").read_text())
    assert summary["metrics"]["resumed_from_epoch"] == 1
    assert summary["metrics"]["epoch"] == 3
    history = [h["epoch"] for h in json.loads((out / "history.json").read_text())]
    assert history == [1, 2, 3]
    assert load_checkpoint(out).meta["metrics"]["epoch"] == 3
    final_keys = s3.keys(run_prefix)
    final = _checkpoint_dirs(final_keys, run_prefix)
    final_mirror = s3.download(run_prefix, tmp_path / "final")
    for d, files in final.items():  # every checkpoint left verifies, with all its files
        assert files == CKPT_FILES, (d, files)
        verify_checkpoint(final_mirror / d)
    assert latest_checkpoint(final_mirror).name == "epoch_0003"
    resumed_line = [ln for ln in (tmp_path / "run.log").read_text().splitlines()
                    if "resuming from" in ln]
    record_figures("s3_kill_during_upload", {
        "storage": f"s3://{BUCKET}/{run_prefix}", "epochs": 3,
        "held_upload": s3.held_paths[:1], "kill_at_s": round(t_kill, 1),
        "epoch_0002_objects_at_kill": sorted(at_kill.get("epoch_0002", set())),
        "snapshot_latest_at_kill": "epoch_0001",
        "latest_checkpoint_at_kill": picked.name,
        "resumed_from_epoch": summary["metrics"]["resumed_from_epoch"],
        "resume_log": resumed_line[-1][-160:] if resumed_line else None,
        "epochs_logged": sorted(ep for _, ep in epoch_log_lines(run.output())),
        "final_history_epochs": history, "final_checkpoints": sorted(final),
        "objects_in_run_at_end": len(final_keys), "s3_writes": len(s3.writes) - writes_before,
        "run_s": round(run_s, 1)})
