"""``mve k8s``: the objects it builds validate against the CRDs, and the requests it sends through
a real ``kubernetes.client.ApiClient`` (only the HTTP transport captured) are the right ones."""

from __future__ import annotations

import argparse
import io
import json
import shlex
import uuid

import pytest
import yaml
from k8s_testlib import (
    captured_api_client,
    crd_errors,
    deepcopy,
    k8s_errors,
    kuberay_semantic_errors,
    one,
    pod_templates,
    render,
    train_parser,
    tune_parser,
)

from cluster import k8s as k8s_cli
from mve.errors import run_command

NS = "mve"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
RAYSERVICES = f"/apis/ray.io/v1/namespaces/{NS}/rayservices"
RAYCLUSTERS = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"


def server_side(obj: dict) -> dict:
    """``obj`` as the API server returns it: uid, resourceVersion, managed fields, status."""
    out = deepcopy(obj)
    out["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="4711", generation=1,
                           creationTimestamp="2026-11-28T12:00:00Z",
                           managedFields=[{"manager": "kubectl", "operation": "Apply"}],
                           annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    out["status"] = {"jobDeploymentStatus": "Suspended"} if obj["kind"] == "RayJob" else {}
    return out


def apply_json_patch(doc: dict, patch: list[dict]) -> dict:
    """RFC 6902 `test` and `replace` on object paths (what promote sends)."""
    out = deepcopy(doc)
    for op in patch:
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in
                          op["path"].lstrip("/").split("/")]
        node = out
        for p in parents:
            node = node[p]
        if op["op"] == "test":
            if node.get(leaf) != op["value"]:
                raise AssertionError("test failed")
        elif op["op"] == "replace":
            assert leaf in node
            node[leaf] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return out


class FakeCluster:
    """A tiny API server: the rendered cpu overlay's objects, created objects kept."""

    def __init__(self, overlay: str = "cpu"):
        docs = render(overlay)
        self.objects = {
            (RAYJOBS, "mve-tune"): server_side(one(docs, "RayJob", "mve-tune")),
            (RAYSERVICES, "mve"): server_side(one(docs, "RayService", "mve")),
            (RAYCLUSTERS, "mve-cluster"): server_side(one(docs, "RayCluster", "mve-cluster")),
        }

    def route(self, method: str, path: str, body):
        base, _, name = path.rpartition("/")
        if method == "GET" and (base, name) in self.objects:
            return 200, self.objects[(base, name)]
        if method == "GET" and path in (RAYJOBS, RAYSERVICES, RAYCLUSTERS):
            items = [o for (b, _), o in self.objects.items() if b == path]
            return 200, {"apiVersion": "ray.io/v1", "kind": "List", "items": items}
        if method == "POST" and path in (RAYJOBS, CONFIGMAPS):
            created = deepcopy(body)
            created["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1")
            self.objects[(path, body["metadata"]["name"])] = created
            return 201, created
        if method == "PATCH" and (base, name) in self.objects:
            try:
                patched = apply_json_patch(self.objects[(base, name)], body)
            except AssertionError:
                return 422, {"kind": "Status", "status": "Failure", "code": 422,
                             "message": "the server rejected our request: test operation "
                                        "failed"}
            self.objects[(base, name)] = patched
            return 200, patched
        return 404, {"kind": "Status", "status": "Failure", "code": 404,
                     "message": f"{path} not found"}


@pytest.fixture
def fake():
    cluster = FakeCluster()
    api, pool = captured_api_client(cluster.route)
    return cluster, api, pool


def assert_valid_rayjob(job: dict) -> None:
    assert crd_errors(job) == []
    assert kuberay_semantic_errors(job) == []


# -- CLI wiring ------------------------------------------------------------------------------

def mve_like_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mve")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("k8s", parents=[k8s_cli.k8s_parent()], help="run on KubeRay")
    return parser


def test_subcommands_parse_as_mve_k8s():
    p = mve_like_parser()
    a = p.parse_args(["k8s", "submit", "--name", "x1", "tune", "classifier", "--samples", "2",
                      "--max-epochs", "3"])
    assert (a.k8s_command, a.entry, a.name, a.namespace) == ("submit", "tune", "x1", "mve")
    assert a.entry_args == ["classifier", "--samples", "2", "--max-epochs", "3"]
    a = p.parse_args(["k8s", "promote", "/mnt/x", "--model", "vae", "-n", "prod"])
    assert (a.checkpoint, a.model, a.namespace, a.service) == ("/mnt/x", "vae", "prod", "mve")
    assert p.parse_args(["k8s", "status", "--json"]).json is True


def test_render_serve_config_command(tmp_path):
    out = tmp_path / "serve-config.yaml"
    assert k8s_cli.main(["render-serve-config", "--out", str(out), "--check"]) == 1
    assert k8s_cli.main(["render-serve-config", "--out", str(out)]) == 0
    assert out.read_text() == k8s_cli.render_serve_config()
    assert k8s_cli.main(["render-serve-config", "--out", str(out), "--check"]) == 0
    text = k8s_cli.render_serve_config(checkpoint_root="s3://bucket/models")
    assert "&" not in text and "*" not in text  # the source's anchors became plain copies
    cfg = yaml.safe_load(text)
    assert not [k for k in cfg if k.startswith("x-")]
    ucs = {a["name"]: a["deployments"][0].get("user_config", {}) for a in cfg["applications"]}
    assert ucs["classifier"]["checkpoint"] == ucs["classifier-oip"]["checkpoint"] == \
        "s3://bucket/models/classifier"
    assert ucs["vae-oip"]["checkpoint"] == "s3://bucket/models/vae" and not ucs["mve"]


# -- submit ------------------------------------------------------------------------------------

def test_submit_clones_the_template_with_files(fake, tmp_path):
    cluster, api, pool = fake
    space = tmp_path / "my space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    out = io.StringIO()
    created = k8s_cli.submit(api, namespace=NS, command="tune", name="mve-tune-test",
                             args=["classifier", "--samples", "6", "--space", str(space),
                                   "--data", "/mnt/cluster_storage/data/c.tar.gz"], out=out)
    assert [(r["method"], r["path"]) for r in pool.requests] == [
        ("GET", f"{RAYJOBS}/mve-tune"), ("POST", RAYJOBS), ("POST", CONFIGMAPS)]
    post_job, post_cm = pool.requests[1], pool.requests[2]
    for r in (post_job, post_cm):  # a JSON body (the client leaves the type to the default)
        assert r["headers"].get("Content-Type", "application/json") == "application/json"
    job = post_job["body"]
    assert_valid_rayjob(job)
    assert job["metadata"] == {"name": "mve-tune-test", "namespace": NS, "labels": {
        "app.kubernetes.io/name": "mve", "app.kubernetes.io/component": "tune",
        "app.kubernetes.io/part-of": "mve", "app.kubernetes.io/managed-by": "mve-k8s-submit",
        "mve.dev/template": "mve-tune"}}
    assert "status" not in job
    spec, template = job["spec"], cluster.objects[(RAYJOBS, "mve-tune")]["spec"]
    assert spec["suspend"] is False
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit",
                "submitterPodTemplate", "submissionMode"):
        assert spec[key] == template[key]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:3] == ["python", "-m", "cluster.tune"]
    a = tune_parser().parse_args(entry[3:])
    assert (a.model, a.samples, a.space) == ("classifier", 6, "/etc/mve/job/my_space.yaml")
    assert (a.address, a.storage, a.name, a.out) == (
        "auto", "/mnt/cluster_storage/ray", "mve-tune-test",
        "/mnt/cluster_storage/tune/mve-tune-test")
    for name, pod in pod_templates(job):
        if name == "submitter":
            continue
        assert {"name": "mve-job-files", "configMap": {"name": "mve-tune-test-files"}} in \
            pod["spec"]["volumes"]
        assert {"name": "mve-job-files", "mountPath": "/etc/mve/job", "readOnly": True} in \
            pod["spec"]["containers"][0]["volumeMounts"]
    cm = post_cm["body"]
    assert k8s_errors(cm) == []
    assert cm["data"] == {"my_space.yaml": space.read_text()}
    assert cm["metadata"]["ownerReferences"] == [{
        "apiVersion": "ray.io/v1", "kind": "RayJob", "name": "mve-tune-test",
        "uid": created["metadata"]["uid"]}]
    assert "mve-tune-test created" in out.getvalue()


def test_submit_train_with_defaults(fake):
    _, api, pool = fake
    job = k8s_cli.submit(api, namespace=NS, command="train", name="mve-train-vae-1",
                         args=["vae", "--epochs", "3", "--workers", "2", "--gpu",
                               "--data", "/mnt/cluster_storage/data/c.tar.gz"],
                         out=io.StringIO())
    assert [r["method"] for r in pool.requests] == ["GET", "POST"]  # no files, no ConfigMap
    sent = pool.requests[1]["body"]
    assert_valid_rayjob(sent)
    assert job["spec"]["entrypoint"] == sent["spec"]["entrypoint"]
    entry = shlex.split(sent["spec"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "cluster.train"]
    a = train_parser().parse_args(entry[3:])
    assert (a.model, a.epochs, a.workers, a.gpu, a.address) == ("vae", 3, 2, True, "auto")
    assert a.out == "/mnt/cluster_storage/train/mve-train-vae-1"


def test_submit_without_command_runs_the_templates_entrypoint(fake):
    cluster, api, pool = fake
    args = mve_like_parser().parse_args(["k8s", "submit"])
    assert (args.entry, args.entry_args) == (None, [])
    assert k8s_cli.run(args, api_client=api) == 0
    job = pool.requests[1]["body"]
    assert_valid_rayjob(job)
    template = cluster.objects[(RAYJOBS, "mve-tune")]["spec"]["entrypoint"]
    assert shlex.split(job["spec"]["entrypoint"]) == shlex.split(template)
    assert job["metadata"]["name"].startswith("mve-tune-classifier-")
    assert job["spec"]["suspend"] is False


def test_submit_refuses_bad_arguments_before_any_request(fake, capsys):
    _, api, pool = fake
    with pytest.raises(k8s_cli.K8sError, match="unrecognized arguments: --bogus"):
        k8s_cli.submit(api, namespace=NS, command="tune", args=["classifier", "--bogus"])
    with pytest.raises(k8s_cli.K8sError, match="invalid choice"):
        k8s_cli.submit(api, namespace=NS, command="train", args=["resnet"])
    with pytest.raises(k8s_cli.K8sError, match="--local"):
        k8s_cli.submit(api, namespace=NS, command="train", args=["vae", "--local"])
    with pytest.raises(k8s_cli.K8sError, match="invalid RayJob name"):
        k8s_cli.submit(api, namespace=NS, command="tune", args=["vae"], name="Bad_Name")
    assert pool.requests == []
    args = mve_like_parser().parse_args(["k8s", "submit", "tune", "classifier", "--nope"])
    assert run_command(lambda a: k8s_cli.run(a, api_client=api), args, prog="mve k8s") == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    assert pool.requests == []


def test_default_job_names_are_valid():
    import datetime as dt

    name = k8s_cli.default_job_name("tune", "classifier", dt.datetime(2026, 11, 28, 13, 5, 9))
    assert name == "mve-tune-classifier-1128-130509"
    assert k8s_cli.check_job_name(name) == name


def test_submit_dry_run_from_a_rendered_file(tmp_path, capsys):
    rendered = tmp_path / "gpu.yaml"
    rendered.write_text(yaml.safe_dump_all(list(render("gpu"))))
    args = mve_like_parser().parse_args(
        ["k8s", "submit", "--template", str(rendered), "--dry-run", "--name", "dry", "tune",
         "vae", "--gpus-per-trial", "1"])
    assert k8s_cli.run(args) == 0  # no kube config needed
    (job,) = list(yaml.safe_load_all(capsys.readouterr().out))
    assert_valid_rayjob(job)
    gpu = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and job["metadata"]["labels"]["mve.dev/template"] == "mve-tune"


@pytest.fixture
def no_kube_config(tmp_path, monkeypatch):
    """No kube config anywhere and not in a pod: only an offline preview can answer."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_dry_runs_without_a_kube_config_preview_the_overlay(no_kube_config, overlay, capsys):
    args = mve_like_parser().parse_args(
        ["k8s", "submit", "--dry-run", "--overlay", overlay, "--name", "dry", "tune",
         "classifier", "--samples", "2"])
    assert k8s_cli.run(args) == 0
    out, err = capsys.readouterr()
    assert f"previewing against k8s/overlays/{overlay}" in err
    (job,) = list(yaml.safe_load_all(out))
    assert_valid_rayjob(job)
    template = one(render(overlay), "RayJob")
    assert job["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]
    assert "--samples 2" in job["spec"]["entrypoint"]

    args = mve_like_parser().parse_args(
        ["k8s", "promote", "--dry-run", "--overlay", overlay, "--model", "vae", "s3://b/v"])
    assert k8s_cli.run(args) == 0
    patch = json.loads(capsys.readouterr().out)
    service = one(render(overlay), "RayService")
    assert patch[0] == {"op": "test", "path": "/spec/serveConfigV2",
                        "value": service["spec"]["serveConfigV2"]}
    promoted = yaml.safe_load(patch[1]["value"])
    checkpoints = {a["name"]: a["deployments"][0]["user_config"]["checkpoint"]
                   for a in promoted["applications"] if a["name"] != "mve"}
    assert checkpoints["vae"] == checkpoints["vae-oip"] == "s3://b/v"
    assert checkpoints["classifier"] != "s3://b/v"


def test_without_a_kube_config_only_dry_runs_go_on(no_kube_config, capsys):
    for argv in (["k8s", "promote", "--model", "vae", "s3://b/v"], ["k8s", "status"],
                 ["k8s", "submit", "tune", "classifier"]):
        args = mve_like_parser().parse_args(argv)
        assert run_command(k8s_cli.run, args, prog="mve k8s") == 2, argv
        assert "no Kubernetes configuration" in capsys.readouterr().err


# -- promote -----------------------------------------------------------------------------------

def test_promote_patches_only_the_checkpoint(fake):
    cluster, api, pool = fake
    before = deepcopy(cluster.objects[(RAYSERVICES, "mve")])
    ckpt = "/mnt/cluster_storage/tune/classifier/best"
    patch = k8s_cli.promote(api, namespace=NS, checkpoint=ckpt, model="classifier",
                            out=io.StringIO())
    assert [(r["method"], r["path"]) for r in pool.requests] == [
        ("GET", f"{RAYSERVICES}/mve"), ("PATCH", f"{RAYSERVICES}/mve")]
    req = pool.requests[1]
    assert req["headers"]["Content-Type"] == "application/json-patch+json"
    assert req["body"] == patch
    assert [op["op"] for op in patch] == ["test", "replace"]
    assert {op["path"] for op in patch} == {"/spec/serveConfigV2"}
    assert patch[0]["value"] == before["spec"]["serveConfigV2"]

    after = cluster.objects[(RAYSERVICES, "mve")]
    sent = {k: v for k, v in after.items() if k != "status"}
    sent["metadata"] = {k: after["metadata"][k] for k in ("name", "namespace", "labels")}
    assert crd_errors(sent) == [] and kuberay_semantic_errors(sent) == []
    old_cfg = yaml.safe_load(before["spec"]["serveConfigV2"])
    new_cfg = yaml.safe_load(after["spec"]["serveConfigV2"])
    deps = {a["name"]: a["deployments"][0] for a in new_cfg["applications"]}
    for app in ("classifier", "classifier-oip"):  # both apps of the model, together
        assert deps[app]["user_config"]["checkpoint"] == ckpt
        deps[app]["user_config"]["checkpoint"] = "/mnt/cluster_storage/models/classifier"
    assert deps["vae"]["user_config"]["checkpoint"] == "/mnt/cluster_storage/models/vae"
    assert new_cfg == old_cfg  # nothing else changed: an in-place, user_config-only update
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(after["spec"]["serveConfigV2"]))


def test_promote_conflict_and_ambiguity(fake):
    cluster, api, pool = fake
    with pytest.raises(k8s_cli.K8sError, match="pass --model"):
        k8s_cli.promote(api, namespace=NS, checkpoint="/x")  # classifier and vae are served
    assert [r["method"] for r in pool.requests] == ["GET"]
    # someone changed serveConfigV2 after our GET: the `test` op makes the server refuse
    stale = cluster.objects[(RAYSERVICES, "mve")]["spec"]["serveConfigV2"]
    original_route = cluster.route

    def racing_route(method, path, body):
        if method == "PATCH":
            cluster.objects[(RAYSERVICES, "mve")]["spec"]["serveConfigV2"] = stale + "\n# edit\n"
        return original_route(method, path, body)

    pool.route = racing_route
    with pytest.raises(k8s_cli.K8sError, match="HTTP 422: .*test operation failed"):
        k8s_cli.promote(api, namespace=NS, checkpoint="/y", model="vae", out=io.StringIO())


def test_promote_serve_config_unit():
    text = k8s_cli.render_serve_config()
    new, changed = k8s_cli.promote_serve_config(text, "s3://b/vae-7", model="vae")
    assert changed == ["vae/VAE", "vae-oip/VAE"]
    new, changed = k8s_cli.promote_serve_config(text, "s3://b/c", model="classifier",
                                                app="classifier-oip")
    assert changed == ["classifier-oip/Classifier"]  # --app: that application only
    with pytest.raises(k8s_cli.K8sError, match="no application 'nope'"):
        k8s_cli.promote_serve_config(text, "/ck", model="vae", app="nope")
    only_vae = yaml.safe_load(text)
    only_vae["applications"] = [a for a in only_vae["applications"]
                                if (a.get("args") or {}).get("model") != "classifier"]
    new, changed = k8s_cli.promote_serve_config(yaml.safe_dump(only_vae), "/ck")
    assert changed == ["vae/VAE", "vae-oip/VAE"]  # the one model: --model not needed
    with pytest.raises(k8s_cli.K8sError, match="no classifier deployment"):
        k8s_cli.promote_serve_config(yaml.safe_dump(only_vae), "/ck", model="classifier")
    with pytest.raises(k8s_cli.K8sError, match="no serveConfigV2"):
        k8s_cli.promote_serve_config("", "/ck")


# -- status ------------------------------------------------------------------------------------

def test_status_reads_the_three_kinds(fake):
    cluster, api, pool = fake
    svc = cluster.objects[(RAYSERVICES, "mve")]
    svc["status"] = {
        "conditions": [{"type": "Ready", "status": "True"},
                       {"type": "UpgradeInProgress", "status": "False"}],
        "numServeEndpoints": 2,
        "activeServiceStatus": {"rayClusterName": "mve-x7k2p", "applicationStatuses": {
            "mve": {"status": "RUNNING",
                    "serveDeploymentStatuses": {"Front": {"status": "HEALTHY"}}},
            "classifier": {"status": "RUNNING",
                           "serveDeploymentStatuses": {"Classifier": {"status": "HEALTHY"}}},
            "vae": {"status": "DEPLOYING",
                    "serveDeploymentStatuses": {"VAE": {"status": "UPDATING"}}}}}}
    cluster.objects[(RAYCLUSTERS, "mve-cluster")]["status"] = {
        "state": "ready", "availableWorkerReplicas": 1, "desiredWorkerReplicas": 1,
        "head": {"podName": "mve-cluster-head-abcde"}}
    out = io.StringIO()
    summary = k8s_cli.status(api, namespace=NS, out=out)
    assert [(r["method"], r["path"]) for r in pool.requests] == [
        ("GET", RAYCLUSTERS), ("GET", RAYJOBS), ("GET", RAYSERVICES)]
    (s,) = summary["rayservices"]
    assert s["conditions"] == {"Ready": "True", "UpgradeInProgress": "False"}
    assert s["applications"]["vae"]["deployments"]["VAE"] == "UPDATING"
    assert s["checkpoints"]["classifier/Classifier"] == "/mnt/cluster_storage/models/classifier"
    assert s["checkpoints"]["vae-oip/VAE"] == "/mnt/cluster_storage/models/vae"
    assert summary["rayjobs"][0]["deployment"] == "Suspended"
    assert summary["rayclusters"][0]["workers"] == "1/1"
    text = out.getvalue()
    assert "app mve: RUNNING" in text and "VAE: UPDATING" in text and "mve-x7k2p" in text
