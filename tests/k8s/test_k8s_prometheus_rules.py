"""The PrometheusRule passes ``promtool check rules`` and the alert unit tests in
prometheus/rules_test.yaml (``promtool test rules``); the Grafana dashboard's queries are valid
PromQL. promtool comes from Debian's `prometheus` package (.ci/deps-prometheus.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_testlib import K8S, one, render, required_tool

HERE = Path(__file__).resolve().parent
RULE_FILE = K8S / "base" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = K8S / "base" / "monitoring" / "mve-dashboard.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    return required_tool("promtool", "bash .ci/deps-prometheus.sh")


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULE_FILE.read_text())["spec"]["groups"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rendered_rule_is_the_committed_one():
    for overlay in ("cpu", "gpu"):
        assert one(render(overlay), "PrometheusRule")["spec"]["groups"] == rule_groups()


def test_promtool_check_rules(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    out = run([promtool, "check", "rules", "rules.yaml"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_of_every_alert(promtool, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(HERE / "prometheus" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    out = run([promtool, "test", "rules", "rules_test.yaml"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_alert_is_tested_firing_and_quiet():
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts == {"MveServeHigh5xxRate", "MveServeHighP99Latency",
                      "MveServeReplicasPinnedAtMax", "MveTrainingStalled",
                      "MveTrainingZeroThroughput"}
    tests = yaml.safe_load((HERE / "prometheus" / "rules_test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no quiet case"


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_config_map_and_structure():
    for overlay in ("cpu", "gpu"):
        cm = one(render(overlay), "ConfigMap", "mve-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["mve-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "mve-overview"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"datasource", "cluster"}
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    text = " ".join(e for _, e in dashboard_exprs())
    for metric in ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                   "ray_serve_autoscaling_target_replicas", "ray_mve_train_epoch",
                   "ray_mve_train_images_per_second", "ray_mve_val_accuracy",
                   "ray_mve_http_requests_total", "ray_mve_model_forward_latency_ms_bucket"):
        assert metric in text


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = [{"record": f"dashboard:panel_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    (tmp_path / "dash.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dash",
                                                                    "rules": rules}]}))
    out = run([promtool, "check", "rules", "dash.yaml"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
