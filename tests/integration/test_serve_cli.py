"""``mve serve`` as a user runs it (a subprocess with its own embedded Ray): the predict and
generate commands against it (no Ray in the client), mve's metrics on ``--metrics-port``, the web
page in headless Chromium, and a clean stop on Ctrl-C (SIGINT)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from _readme import python_example  # tests/integration/_readme.py
from PIL import Image

from serve_app.testing import (
    CIFAR10_CLASSES,
    free_port,
    make_classifier,
    make_vae,
    png_bytes,
    random_images,
)

pytestmark = pytest.mark.ray
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    metrics: str
    tmp: Path
    log: Path


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    code = ("import sys; from serve_app.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'the client imported ray'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, check=check)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve-cli")
    clf, vae = make_classifier(tmp / "clf", seed=3), make_vae(tmp / "vae", seed=4)
    port, mport = free_port(), free_port()
    log = tmp / "serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MVE_API_KEY", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.cli", "serve", "--classifier", str(clf), "--vae",
             str(vae), "--port", str(port), "--metrics-port", str(mport), "--num-cpus", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C to stop" not in log.read_text():
            assert proc.poll() is None, f"mve serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mve serve did not start:\n{log.read_text()}"
            time.sleep(0.5)
        assert f"http://127.0.0.1:{port}/" in log.read_text()
        yield Served(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", tmp,
                     log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_predict_and_generate_commands(served: Served) -> None:
    a, b = served.tmp / "a.png", served.tmp / "b.jpg"
    a.write_bytes(png_bytes(random_images(1, seed=1)[0]))
    b.write_bytes(png_bytes(random_images(1, size=80, seed=2)[0], "JPEG"))
    out = _cli("predict", str(a), str(b), "--url", served.url, "--top-k", "3")
    lines = out.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(a), str(b)]
    assert all(len(re.findall(r"\d+\.\d%", ln)) == 3 for ln in lines)
    assert all(ln.split(": ")[1].split()[0] in CIFAR10_CLASSES for ln in lines)
    js = json.loads(_cli("predict", str(a), "--url", served.url, "--json").stdout)
    assert js["checkpoint_id"].startswith("classifier-")
    grid = served.tmp / "out" / "grid.png"
    _cli("generate", "--n", "4", "--seed", "1", "--temperature", "0.7", "--url", served.url,
         "--out", str(grid))
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == (2 + 2 * 34, 2 + 2 * 34)
    _cli("generate", "--mode", "variations", "--image", str(a), "--n", "3", "--seed", "2",
         "--url", served.url, "--out", str(grid))
    with Image.open(grid) as im:
        assert im.size == (2 + 2 * 34, 2 + 2 * 34)  # 3 variations on a 2x2 grid
    _cli("generate", "--mode", "interpolate", "--image", str(a), "--image", str(b), "--n", "5",
         "--url", served.url, "--out", str(grid))
    with Image.open(grid) as im:
        assert im.size == (2 + 5 * 34, 2 + 34)  # a strip of 5
    one = _cli("generate", "--mode", "variations", "--url", served.url, "--out", str(grid),
               check=False)
    assert one.returncode == 2 and "needs 1 --image" in one.stderr
    bad = _cli("predict", str(served.tmp / "nope.png"), "--url", served.url, check=False)
    assert bad.returncode == 2 and "cannot read" in bad.stderr
    down = _cli("predict", str(a), "--url", "http://127.0.0.1:9", check=False)
    assert down.returncode == 2 and "cannot reach" in down.stderr


def test_readme_python_example_prints_the_servers_top1(served: Served) -> None:
    """The README's `mve.load` example, run as written on the served checkpoints (found through
    $MVE_DEFAULT_*), prints for cat.jpg the top-1 that `mve predict --url` gets from the server."""
    work = served.tmp / "example"
    work.mkdir(exist_ok=True)
    for name, seed in (("cat.jpg", 21), ("dog.jpg", 22)):
        (work / name).write_bytes(png_bytes(random_images(1, size=48, seed=seed)[0], "JPEG"))
    env = {**os.environ, "MVE_DEFAULT_CLASSIFIER": str(served.tmp / "clf"),
           "MVE_DEFAULT_VAE": str(served.tmp / "vae")}
    local = subprocess.run([sys.executable, "-c", python_example()], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    line = next(ln for ln in local.stdout.splitlines() if ln.startswith("cat.jpg: "))
    label, pct = line.split()[1:3]
    remote = _cli("predict", str(work / "cat.jpg"), "--url", served.url, "--top-k", "1")
    r_label, r_pct = remote.stdout.split(": ", 1)[1].split()
    assert (label, pct) == (r_label, r_pct), (local.stdout, remote.stdout)


def test_mve_metrics_on_the_metrics_port(served: Served) -> None:
    img = png_bytes(random_images(1, seed=7)[0])
    for _ in range(3):
        requests.post(served.url + "/v1/classify", data=img, timeout=30,
                      headers={"Content-Type": "image/png"}).raise_for_status()
    assert requests.post(served.url + "/v1/classify", data=b"junk", timeout=30,
                         headers={"Content-Type": "image/png"}).status_code == 400
    requests.post(served.url + "/v1/vae/sample?n=2", timeout=30).raise_for_status()
    expected = [
        r'ray_mve_http_requests_total\{[^}]*route="/v1/classify"[^}]*status="200"',
        r'ray_mve_http_requests_total\{[^}]*route="/v1/classify"[^}]*status="400"',
        r'ray_mve_http_request_latency_ms_bucket\{[^}]*route="/v1/classify"',
        r'ray_mve_rejected_requests_total\{[^}]*code="invalid_image"',
        r'ray_mve_batch_size_bucket\{[^}]*model="classifier"',
        r'ray_mve_forward_passes_total\{[^}]*application="classifier"[^}]*\} [1-9]',
        r'ray_mve_forward_images_total\{[^}]*model="classifier"[^}]*\} [1-9]',
        r'ray_mve_model_forward_latency_ms_bucket\{[^}]*method="sample"',
        r'ray_mve_predictions_total\{[^}]*class="[a-z]+"',
        r'ray_mve_model_swaps_total\{[^}]*outcome="success"',
        r'ray_mve_model_info\{[^}]*checkpoint_id="vae-',
        r"ray_serve_num_http_requests_total\{",
    ]
    deadline, missing = time.monotonic() + 60, expected
    while missing and time.monotonic() < deadline:
        text = urllib.request.urlopen(served.metrics, timeout=10).read().decode()
        missing = [p for p in expected if not re.search(p, text)]
        time.sleep(2)
    assert not missing, missing
    # Predictions are counted in the replica and reach Ray at most once a second (and on each
    # health check): in the end, one per classified image, none lost.
    deadline, totals = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(served.metrics, timeout=10).read().decode()
        totals = [_total(text, name) for name in ("ray_mve_predictions_total",
                                                  "ray_mve_forward_images_total")]
        if totals[0] == totals[1] > 0:
            break
        time.sleep(2)
    assert totals and totals[0] == totals[1] > 0, totals


def _total(text: str, name: str) -> float:
    """The sum of a metric's samples of the classifier in a Prometheus text page."""
    pattern = rf'^{name}\{{[^}}]*model="classifier"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))


def test_model_info_outlives_the_gauge_ttl_without_traffic(served: Served) -> None:
    """Ray drops a gauge value not set again within two export intervals (20 s): the info
    gauge of each model is still exported 30 s after the last request (it was gone before
    the replicas re-asserted it on their health checks)."""
    time.sleep(30)
    text = urllib.request.urlopen(served.metrics, timeout=10).read().decode()
    for model in ("classifier", "vae"):
        assert re.search(rf'ray_mve_model_info\{{[^}}]*checkpoint_id="{model}-[^}}]*\}} 1', text), \
            f"no model_info for the {model}"


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian chromium + chromium-driver (.ci/system-deps.sh)")
def test_web_page_in_headless_chromium(served: Served) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={served.tmp / 'chrome'}"):
        opts.add_argument(flag)
    upload = served.tmp / "upload.png"
    Image.fromarray(random_images(1, size=64, seed=3)[0]).save(upload)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(served.url + "/")
        wait.until(lambda d: "classifier-" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.prediction")) == 5)
        top = driver.find_elements(By.CSS_SELECTOR, "li.prediction")[0].text
        assert top.split()[0] in CIFAR10_CLASSES
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("6")
        driver.find_element(By.ID, "sample-btn").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.sample")) == 6)
        widths = driver.execute_script(
            "return [...document.querySelectorAll('img.sample')].map(i => i.naturalWidth)")
        wait.until(lambda d: all(w == 32 for w in d.execute_script(
            "return [...document.querySelectorAll('img.sample')].map(i => i.naturalWidth)")))
        assert len(widths) == 6
        driver.find_element(By.ID, "variations-btn").click()
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('img.sample').length === 6 && "
            "[...document.querySelectorAll('img.sample')].every(i => i.complete)"))
        assert driver.find_element(By.ID, "error").text == ""
        # the steps field reaches /v1/vae/sample: an out-of-range value is the server's 422
        steps = driver.find_element(By.ID, "steps")
        steps.send_keys("0")
        driver.find_element(By.ID, "sample-btn").click()
        wait.until(lambda d: "(422)" in d.find_element(By.ID, "error").text)
        steps.clear()
        steps.send_keys("4")
        driver.execute_script("document.getElementById('samples').replaceChildren()")
        driver.find_element(By.ID, "sample-btn").click()
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('img.sample').length === 6 && "
            "[...document.querySelectorAll('img.sample')].every(i => i.complete)"))
        assert driver.find_element(By.ID, "error").text == ""
        png = driver.get_screenshot_as_png()
        assert Image.open(io.BytesIO(png)).size[0] > 0
        # /docs renders from the server's own assets (this machine cannot reach a CDN)
        driver.get(served.url + "/docs")
        wait.until(lambda d: "mve" in d.find_element(By.CSS_SELECTOR, ".swagger-ui .title").text)
        wait.until(lambda d: any("/v1/classify" in e.text for e in d.find_elements(
            By.CSS_SELECTOR, ".opblock-summary-path")))
    finally:
        driver.quit()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_nothing_from_elsewhere(served: Served, page: str) -> None:
    html = requests.get(served.url + page, timeout=30).text
    refs = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']""", html) + re.findall(
        r"""url: ?["']([^"']+)["']""", html)
    assert len(refs) >= 3 and all(r.startswith("/") for r in refs), refs  # same origin only
    for ref in refs:
        r = requests.get(served.url + ref, timeout=30)
        assert r.status_code == 200, ref
    js = requests.get(served.url + "/docs/assets/swagger-ui-bundle.js", timeout=30)
    assert js.headers["content-type"].startswith("text/javascript") and len(js.content) > 10**5
    assert requests.get(served.url + "/docs/assets/core.py", timeout=30).status_code == 404


def test_ctrl_c_stops_cleanly(served: Served) -> None:
    match = re.search(r"edit user_config\.checkpoint in (\S+\.yaml)", served.log.read_text())
    assert match and Path(match[1]).is_file()  # the effective config, for `serve deploy`
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=90) == 0, served.log.read_text()[-3000:]
    assert "mve serve: stopping" in served.log.read_text()
    assert not Path(match[1]).exists()
    port = int(served.url.rsplit(":", 1)[1])
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
