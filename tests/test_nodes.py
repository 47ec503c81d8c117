"""A worker node killed mid-run on a simulated multi-node cluster: every row exactly once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from ray.cluster_utils import Cluster

from pipeline.synthetic import write_parquet_corpus

from .conftest import job_command, wait_until

pytestmark = pytest.mark.slow  # a three-node Ray cluster on loopback

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cluster():
    """A CPU-only head (the driver's node) and a worker node that runs the job's tasks and actors."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    yield cluster
    cluster.shutdown()


def test_a_worker_node_killed_mid_run_loses_and_duplicates_nothing(cluster, tiny_model_dir, tmp_path):
    first_worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    rows = write_parquet_corpus(str(tmp_path / "corpus"), shards=6, rows_per_shard=60, real_every=3)
    out = tmp_path / "out"
    command = job_command(
        str(tmp_path / "corpus"),
        str(out),
        tiny_model_dir,
        "--keep",
        "16",
        "--max-new-tokens",
        "24",
        "--batch-size",
        "4",
        "--rows-per-file",
        "8",
        "--progress-every",
        "2",
        "--address",
        cluster.address,
    )
    job = subprocess.Popen(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # once captions are being written (and before the run is over), the node doing the work dies
    wait_until(lambda: len(list(out.glob("*/part-*.parquet"))) >= 4 or job.poll() is not None, 600, "the first parts")
    assert job.poll() is None, "the job ended before the node could be killed: " + job.stderr.read()[-3000:]
    cluster.remove_node(first_worker, allow_graceful=False)
    cluster.add_node(num_cpus=2)  # the autoscaler's replacement
    stdout, stderr = job.communicate(timeout=900)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{") :])
    assert summary["rows_total"] == rows and summary["units_done"] == 6 and summary["units_failed"] == 0
    assert summary["rows_ok"] == rows // 3

    table = pads.dataset(str(out), format="parquet").to_table(columns=["source_file", "source_row", "caption"])
    counts = table.group_by(["source_file", "source_row"]).aggregate([([], "count_all")])
    assert counts.num_rows == table.num_rows == rows  # every source row exactly once
    assert table.column("caption").null_count == rows - rows // 3
