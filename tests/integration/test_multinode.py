"""Tune on a 2-node `ray.cluster_utils.Cluster`: trials are scheduled on both nodes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import ray
from _archives import TINY_SPACE, colour_archive  # tests/integration/_archives.py
from ray.cluster_utils import Cluster

from cluster.tune import main as tune_main

pytestmark = pytest.mark.ray

SPACE = TINY_SPACE


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return colour_archive(tmp_path_factory.mktemp("mn"), seed=2)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trials_run_on_both_nodes(two_nodes, archive, tmp_path):
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "out"
    rc = tune_main(["classifier", "--data", str(archive), "--space", str(space),
                    "--samples", "4", "--max-epochs", "1", "--val-size", "30",
                    "--cpus-per-trial", "1", "--address", two_nodes.address,
                    "--storage", str(tmp_path / "storage"), "--out", str(out), "-v", "0"])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    used = {r["node_id"] for r in rows}
    assert used <= nodes and len(used) == 2, used  # both nodes ran trials
