"""A real Prometheus scrapes a running local Ray (a short Ray Train run plus the mve Serve app)
with the relabelling of the PodMonitors, and mve's training and serving metrics, and the
PrometheusRule's recording rules, come back through Prometheus's HTTP query API.

The PodMonitors are translated into static scrape configs the way the Prometheus Operator
generates them (keep by pod labels and container port name, then the endpoint's relabelings);
the static targets carry the Kubernetes discovery labels KubeRay's pods would have, and all
point at the local node's metrics export port. Needs Debian's `prometheus`
(.ci/deps-prometheus.sh); about a minute on two cores.

Ray 2.60 evicts a gauge about two export intervals after its process stops refreshing it (a
finished Train worker), and Prometheus then marks the series stale; so the training series are
read with ``last_over_time`` after the run, and Ray exports every second here
(RAY_metrics_report_interval_ms=1000 instead of 10 s) so the short run is seen at all.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from k8s_testlib import K8S, required_tool

pytestmark = pytest.mark.ray

CLUSTER = "mve-test"  # the ray.io/cluster label of the emulated pods
NAMESPACE = "mve"
RUN = "mve-prom-test"
# The labels KubeRay puts on its pods (and the container ports of the overlays).
PODS = {
    "mve-test-head-x1": ({"ray.io/cluster": CLUSTER, "ray.io/node-type": "head",
                          "ray.io/is-ray-node": "yes", "ray.io/group": "headgroup"},
                         ("metrics", "as-metrics", "dash-metrics")),
    "mve-test-cpu-worker-y2": ({"ray.io/cluster": CLUSTER, "ray.io/node-type": "worker",
                                "ray.io/is-ray-node": "yes", "ray.io/group": "cpu"},
                               ("metrics",)),
    "unrelated-pod": ({"app": "something-else"}, ("metrics",)),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sd_label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_monitors() -> list[dict]:
    text = (K8S / "base" / "monitoring" / "podmonitors.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def scrape_configs(ports: dict[str, int]) -> list[dict]:
    """The Prometheus Operator's translation of our PodMonitors, on static targets."""
    targets = []
    for pod, (labels, port_names) in PODS.items():
        for port_name in port_names:
            meta = {"__meta_kubernetes_namespace": NAMESPACE,
                    "__meta_kubernetes_pod_name": pod,
                    "__meta_kubernetes_pod_container_name": "ray-head" if "head" in pod
                    else "ray-worker",
                    "__meta_kubernetes_pod_container_port_name": port_name}
            for k, v in labels.items():
                meta[f"__meta_kubernetes_pod_label_{sd_label(k)}"] = v
                meta[f"__meta_kubernetes_pod_labelpresent_{sd_label(k)}"] = "true"
            targets.append({"targets": [f"127.0.0.1:{ports[port_name]}"], "labels": meta})
    out = []
    for pm in pod_monitors():
        name = pm["metadata"]["name"]
        for i, ep in enumerate(pm["spec"]["podMetricsEndpoints"]):
            relabel = []
            for key, value in pm["spec"]["selector"]["matchLabels"].items():
                relabel.append({"action": "keep", "regex": f"({value});true",
                                "source_labels": [f"__meta_kubernetes_pod_label_{sd_label(key)}",
                                                  f"__meta_kubernetes_pod_labelpresent_"
                                                  f"{sd_label(key)}"]})
            relabel += [
                {"action": "keep", "regex": ep["port"],
                 "source_labels": ["__meta_kubernetes_pod_container_port_name"]},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"],
                 "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"target_label": "job", "replacement": f"{NAMESPACE}/{name}"},
                {"target_label": "endpoint", "replacement": ep["port"]},
            ]
            for r in ep.get("relabelings", []):
                relabel.append({"action": r.get("action", "replace").lower(),
                                "source_labels": r["sourceLabels"],
                                "target_label": r["targetLabel"]})
            out.append({"job_name": f"podMonitor/{NAMESPACE}/{name}/{i}",
                        "scrape_interval": "2s", "scrape_timeout": "2s",
                        "metrics_path": ep.get("path", "/metrics"),
                        "static_configs": targets, "relabel_configs": relabel})
    return out


def rule_file(path: Path) -> Path:
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    groups = [{**g, "interval": "2s"} for g in rule["spec"]["groups"]]
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


class Prometheus:
    def __init__(self, exe: str, workdir: Path, scrape: list[dict]):
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
               "rule_files": [str(rule_file(workdir / "rules.yaml"))],
               "scrape_configs": scrape}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise AssertionError("prometheus did not become ready")

    def query(self, q: str) -> list[dict]:
        out = self.get("/api/v1/query", query=q)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def wait_for(self, q: str, timeout_s: float = 60, pred=lambda r: bool(r)) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(q)
            if pred(result):
                return result
            time.sleep(1)
        health = [(t["labels"].get("job"), t["labels"].get("endpoint"), t["health"],
                   t["lastError"]) for t in self.get("/api/v1/targets")["data"]["activeTargets"]]
        raise AssertionError(f"no result for {q!r} within {timeout_s}s (last: {result}); "
                             f"targets: {health}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus_exe() -> str:
    return required_tool("prometheus", "bash .ci/deps-prometheus.sh")


def tiny_archive(root: Path) -> Path:
    """4 classes x 30 PNGs whose colour tells the class (as tests/integration/test_train.py)."""
    from _archives import colour_archive, rgb_ramp  # tests/integration/_archives.py

    return colour_archive(root, classes=4, per_class=30, colour=rgb_ramp, class_dir="class{k}",
                          image_name="{i:03d}.png", name="colours.tar.gz")


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def http(url: str, data: bytes | None = None, ctype: str = "image/png") -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()  # the whole error answer, as a client does: closing early logs a 499
        return exc.code


def test_prometheus_reads_training_and_serving_metrics(prometheus_exe, tmp_path):
    import ray
    from ray import serve

    from cluster.train import ClusterConfig, run_training
    from mve.config import load_train_config
    from serve_app.dataplane import applied, embedded_env
    from serve_app.deploy import APP_NAME, app_config, deploy, load_config

    metrics_port, serve_port = free_port(), free_port()
    unused = free_port()  # the head's autoscaler/dashboard metrics ports: nothing listens here
    ports = {"metrics": metrics_port, "as-metrics": unused, "dash-metrics": unused}
    archive = tiny_archive(tmp_path / "data")
    old_interval = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # inherited by raylet and workers
    with applied(embedded_env()):  # the serving data plane, as on the RayService
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _metrics_export_port=metrics_port)
    prom = None
    try:
        prom = Prometheus(prometheus_exe, tmp_path, scrape_configs(ports))
        # -- training: a 2-epoch Ray Train run exports mve's gauges and Train's controller state
        cfg = load_train_config("classifier", preset="baseline", overrides=[
            "model.num_classes=4", "model.cnn_layers=3", "model.starting_channels=8",
            "model.final_channels=16", "model.fcn_layers=2", "model.pooling=max",
            "data.val_size=20", "data.augment.crop_padding=0", "data.augment.flip=false",
            "eval_batch_size=20", "epochs=5", "batch_size=20"])
        run_training(cfg, ClusterConfig(num_workers=1, storage=str(tmp_path / "storage")),
                     str(archive), out=tmp_path / "clf", name=RUN)
        # -- serving: serve_app/config.yaml with the fresh checkpoint, a few requests
        config = app_config(load_config(), {"classifier": str(tmp_path / "clf")},
                            host="127.0.0.1", port=serve_port)
        deploy(config, timeout_s=120)
        base = f"http://127.0.0.1:{serve_port}"
        statuses = [http(f"{base}/v1/classify", png_bytes()) for _ in range(5)]
        statuses.append(http(f"{base}/v1/models"))
        statuses.append(http(f"{base}/v1/classify", b"not an image"))  # a 4xx
        assert statuses[:6] == [200] * 6 and 400 <= statuses[6] < 500, statuses

        # -- the scrape: selectors and relabelings as in the cluster. The run is over, so its
        # series are stale: read their last samples.
        sel = f'ray_io_cluster="{CLUSTER}",job="{NAMESPACE}/mve-ray-head"'

        def last(expr: str) -> list[dict]:
            return prom.wait_for(f"last_over_time({expr}[10m])")

        epoch = last(f'ray_mve_train_epoch{{{sel},run="{RUN}"}}')
        assert {float(r["value"][1]) for r in epoch} <= {1.0, 2.0, 3.0, 4.0, 5.0}
        labels = epoch[0]["metric"]
        assert (labels["ray_io_node_type"], labels["namespace"], labels["model"]) == \
            ("head", NAMESPACE, "classifier")
        assert labels["pod"] == "mve-test-head-x1" and labels["endpoint"] == "metrics"
        for name in ("ray_mve_train_images_per_second", "ray_mve_train_loss",
                     "ray_mve_val_accuracy", "ray_mve_val_loss"):
            assert all(float(r["value"][1]) >= 0 for r in last(f'{name}{{{sel},run="{RUN}"}}'))
        assert max(float(r["value"][1]) for r in
                   last(f'ray_mve_train_images_per_second{{{sel},run="{RUN}"}}')) > 0
        states = last(f'ray_train_controller_state{{{sel},ray_train_run_name="{RUN}"}}')
        assert "RUNNING" in {r["metric"]["ray_train_controller_state"] for r in states}

        # HAProxy's request log becomes Serve's HTTP metrics, by the application that answered:
        # the classifier app for /v1/classify, the front for /v1/models
        def count(rs: list[dict], app: str) -> float:
            return sum(float(r["value"][1]) for r in rs if r["metric"].get("application") == app)

        requests = prom.wait_for(
            f'sum by (application, status_code) (ray_serve_num_http_requests_total{{{sel}}})',
            pred=lambda rs: count(rs, "classifier") >= 6 and count(rs, APP_NAME) >= 1)
        assert {r["metric"]["status_code"] for r in requests} >= {"200", "400"}
        prom.wait_for(f'ray_serve_http_request_latency_ms_bucket{{{sel},application="classifier"}}')
        prom.wait_for(f'ray_serve_autoscaling_target_replicas{{{sel},deployment="Classifier"}}')
        prom.wait_for(f'ray_mve_http_requests_total{{{sel},route="/v1/classify"}}')
        prom.wait_for(f'ray_mve_model_forward_latency_ms_bucket{{{sel},model="classifier"}}')

        # -- the worker PodMonitor scrapes the worker "pod"; nothing else is selected
        targets = prom.get("/api/v1/targets")["data"]
        active = {(t["labels"]["job"], t["labels"]["pod"], t["labels"]["endpoint"])
                  for t in targets["activeTargets"]}
        assert active == {
            (f"{NAMESPACE}/mve-ray-head", "mve-test-head-x1", "metrics"),
            (f"{NAMESPACE}/mve-ray-head", "mve-test-head-x1", "as-metrics"),
            (f"{NAMESPACE}/mve-ray-head", "mve-test-head-x1", "dash-metrics"),
            (f"{NAMESPACE}/mve-ray-workers", "mve-test-cpu-worker-y2", "metrics")}
        worker_job = f'job="{NAMESPACE}/mve-ray-workers"'
        worker = prom.wait_for(f"ray_serve_num_http_requests_total{{{worker_job}}}")
        assert worker[0]["metric"]["ray_io_node_type"] == "worker"
        assert worker[0]["metric"]["ray_io_cluster"] == CLUSTER

        # -- the PrometheusRule's recording rules evaluate on the real series
        last(f'mve:train_epoch:max{{ray_io_cluster="{CLUSTER}",run="{RUN}"}}')
        last(f'mve:train_images_per_second:max{{run="{RUN}"}}')
        running = prom.wait_for(f'max_over_time(mve:train_run:running{{run="{RUN}"}}[10m])')
        assert float(running[0]["value"][1]) == 1.0  # it was RUNNING while it trained
        prom.wait_for('mve:serve_http_requests:rate5m{application="classifier"}')
        prom.wait_for('mve:serve_http_latency_ms:p99_5m{application="classifier"}')
        prom.wait_for('mve:serve_replicas:target{deployment="Classifier"}')
        prom.wait_for('mve:serve_replicas:healthy{deployment="Classifier"}')
        rules = prom.get("/api/v1/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    finally:
        if prom is not None:
            prom.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if old_interval is None:
                os.environ.pop("RAY_metrics_report_interval_ms", None)
            else:
                os.environ["RAY_metrics_report_interval_ms"] = old_interval
