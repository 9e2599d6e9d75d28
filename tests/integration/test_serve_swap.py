"""Hot swaps on a real Ray Serve: a new ``user_config.checkpoint`` is loaded in place (same
replica) under continuous traffic with zero failed requests; bad checkpoints are refused while
the old model keeps answering; batching settings apply live; a first load that fails is reported
clearly. Deploys go through ``serve_app/config.yaml`` as ``serve deploy`` would."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from mve.checkpoint import load_checkpoint
from serve_app.dataplane import applied, embedded_env
from serve_app.deploy import app_config, deploy, load_config, set_user_config
from serve_app.testing import (
    ServedApp,
    free_port,
    make_classifier,
    make_vae,
    png_bytes,
    random_images,
)

pytestmark = pytest.mark.ray
IMG = png_bytes(random_images(1, seed=4)[0])




@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    d = tmp_path_factory.mktemp("serve-swap")
    ckpts = {"c1": make_classifier(d / "c1", seed=1), "c2": make_classifier(d / "c2", seed=2),
             "vae": make_vae(d / "vae")}
    tampered = shutil.copytree(ckpts["c1"], d / "tampered")
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    (d / "model.pt").write_bytes(b"not a pickle you want to load")
    ckpts.update(tampered=tampered, pickle=d / "model.pt", missing=d / "missing")
    port = free_port()
    config = app_config(load_config(), {"classifier": str(ckpts["c1"])},
                        host="127.0.0.1", port=port)
    with applied(embedded_env()):
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        deploy(config)
        yield ServedApp(f"http://127.0.0.1:{port}", config, ckpts)
    finally:
        serve.shutdown()
        ray.shutdown()


def info(env: ServedApp) -> dict[str, Any]:
    (model,) = requests.get(env.url + "/v1/models", timeout=30).json()["models"]
    return model


def wait_for(predicate: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, "timed out"
            return value
        time.sleep(0.2)


@contextmanager
def traffic(env: ServedApp, threads: int = 3) -> Iterator[list[tuple[int, str]]]:
    """Clients posting /v1/classify back to back; yields the (status, checkpoint id) list."""
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(env.url + "/v1/classify", data=IMG, timeout=30,
                               headers={"Content-Type": "image/png"})
                    results.append((r.status_code, r.json().get("checkpoint_id", r.text)))
                except requests.RequestException as exc:
                    results.append((0, repr(exc)))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        yield results
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)


def swap(env: ServedApp, **user_config: Any) -> None:
    env.config = set_user_config(env.config, "classifier", **user_config)
    deploy(env.config)


def test_hot_swap_under_traffic_drops_nothing(env: ServedApp) -> None:
    before = info(env)
    new_id = load_checkpoint(env.ckpts["c2"]).checkpoint_id
    assert before["checkpoint_id"] != new_id
    with traffic(env) as results:
        swap(env, checkpoint=str(env.ckpts["c2"]))
        wait_for(lambda: info(env)["checkpoint_id"] == new_id)
        n_at_swap = len(results)
        wait_for(lambda: len(results) > n_at_swap + 10)
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    ids = [cid for _, cid in results]
    assert {before["checkpoint_id"], new_id} <= set(ids) and ids[-1] == new_id
    after = info(env)
    assert after["replica"] == before["replica"], "the swap restarted the replica"
    assert after["swap"]["swaps"] == before["swap"]["swaps"] + 1
    # the model's other application (the OIP routes) swapped too
    oip = requests.get(env.url + "/v2/models/classifier", timeout=30).json()
    assert oip["versions"] == [new_id]


@pytest.mark.parametrize("bad, why", [
    ("missing", "does not exist"),
    ("tampered", "sha256"),
    ("vae", "not a 'classifier'"),
    ("pickle", "never loads pickled"),
])
def test_bad_checkpoint_is_refused_and_old_model_keeps_serving(env: ServedApp, bad: str,
                                                               why: str) -> None:
    before = info(env)
    with traffic(env, threads=2) as results:
        swap(env, checkpoint=str(env.ckpts[bad]))
        after = wait_for(lambda: (m := info(env))["swap"]["failed_swaps"]
                         > before["swap"]["failed_swaps"] and m)
    assert after["checkpoint_id"] == before["checkpoint_id"]
    assert after["swap"]["requested_checkpoint"] == str(env.ckpts[bad])
    assert why in after["swap"]["last_error"]
    assert results and all(r == (200, before["checkpoint_id"]) for r in results), results[:5]


def test_batching_settings_apply_live(env: ServedApp) -> None:
    before = info(env)
    swap(env, checkpoint=before["checkpoint"], max_batch_size=3, batch_wait_timeout_s=0.05)
    after = wait_for(lambda: (m := info(env))["max_batch_size"] == 3 and m)
    assert after["batch_wait_timeout_s"] == 0.05 and after["replica"] == before["replica"]
    r = requests.post(env.url + "/v1/classify", json={"images": [
        __import__("base64").b64encode(IMG).decode()] * 7}, timeout=30)  # 3 + 3 + 1 images
    assert r.status_code == 200 and len(r.json()["predictions"]) == 7
    swap(env, max_batch_size=32, batch_wait_timeout_s=0.0)


def test_tta_and_threads_apply_live(env: ServedApp) -> None:
    before = info(env)
    probs = {}
    for mode in ("none", "flip_translate", "flip"):
        swap(env, tta=mode, torch_threads=1)
        wait_for(lambda m=mode: info(env)["tta"] == m)
        r = requests.post(env.url + "/v1/classify?top_k=10", data=IMG, timeout=30,
                          headers={"Content-Type": "image/png"})
        probs[mode] = sorted(s["probability"] for s in r.json()["predictions"][0]["top_k"])
    after = info(env)
    assert after["replica"] == before["replica"] and after["torch_threads"] == 1
    assert probs["none"] != probs["flip"] != probs["flip_translate"]  # the modes really differ


def test_precision_applies_live_without_failed_requests(env: ServedApp) -> None:
    """fp32 -> bf16 -> fp32 on the same replica under traffic: bf16 answers differ from fp32 by
    rounding only, and fp32 comes back bit for bit (the fp32 weights were never cast)."""
    before = info(env)

    def probs() -> list[float]:
        r = requests.post(env.url + "/v1/classify?top_k=10", data=IMG, timeout=30,
                          headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]["top_k"]
        return [s["probability"] for s in sorted(top, key=lambda s: s["index"])]

    seen = {}
    with traffic(env) as results:
        for prec in ("fp32", "bf16", "fp32"):
            swap(env, precision=prec)
            wait_for(lambda p=prec: info(env)["precision"] == p)
            seen.setdefault(prec, []).append(probs())
    after = info(env)
    assert after["replica"] == before["replica"] and after["swap"]["swaps"] == before["swap"]["swaps"]
    assert seen["fp32"][0] == seen["fp32"][1]
    diff = max(abs(a - b) for a, b in zip(seen["bf16"][0], seen["fp32"][0], strict=True))
    assert 0 < diff < 0.05, diff
    assert results and all(status == 200 for status, _ in results), results[:5]
    swap(env, precision="auto")


def test_first_load_failure_fails_clearly(env: ServedApp) -> None:
    broken = app_config(load_config(), {"classifier": str(env.ckpts["missing"])},
                        name="broken", mount="/broken")
    for app in broken["applications"][1:]:  # the model apps (the front needs no checkpoint)
        app["deployments"][0]["max_constructor_retry_count"] = 1  # one attempt, not three
    both = {**env.config, "applications": env.config["applications"] + broken["applications"]}
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*missing"):
        deploy(both, timeout_s=150)
    r = requests.post(env.url + "/v1/classify", data=IMG, timeout=30,
                      headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    deploy(env.config)  # removes the broken app
