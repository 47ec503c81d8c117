"""The job on a real Ray cluster: `ray start --head` + `ray job submit`, a worker crash, and the
cluster-launcher config checked against Ray's own schema."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.batch import read_output

from .conftest import free_port
from .bad_images import encode, gradient

ROOT = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).parent / "ray"



def small_corpus(folder: Path, rows: int) -> list[str]:
    folder.mkdir(parents=True)
    ids = [f"img-{i:03d}" for i in range(rows)]
    table = pa.Table.from_pylist([{"id": i, "image": encode(gradient(20 + n, 30), "PNG")} for n, i in enumerate(ids)])
    pq.write_table(table, folder / "corpus.parquet", row_group_size=4)
    return ids


def test_cluster_yaml_passes_rays_own_validation():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs, defaults filled in
    types = config["available_node_types"]
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"]
    assert any("--metrics-export-port" in c for c in config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError):  # the validator is live: a typo is caught
        jsonschema.validate(dict(config, max_wrokers=3), schema)


@pytest.fixture
def head_node(tmp_path):
    """A real Ray head started with `ray start --head` (token auth, as Ray 2.60 defaults to)."""
    gcs, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{RAY_BIN.parent}:{os.environ['PATH']}")
    head = subprocess.Popen(
        [str(RAY_BIN), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([str(RAY_BIN), "job", "list", "--address", address], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head did not come up")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)


def test_ray_job_submit_runs_the_job_on_a_running_cluster(head_node, tiny_model_dir, tmp_path):
    address, env = head_node
    ids = small_corpus(tmp_path / "corpus", 12)
    output = tmp_path / "out"
    submit = subprocess.run(
        [str(RAY_BIN), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "jobs/caption_corpus.py", "--input", str(tmp_path / "corpus"), "--output", str(output),
         "--model", tiny_model_dir, "--keep", "48", "--max-new-tokens", "4"],
        env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    table = read_output(str(output))
    assert sorted(table.column("id").to_pylist()) == ids
    assert set(table.column("visual_tokens_kept").to_pylist()) == {48}
    assert json.loads((output / "_summary.json").read_text())["rows_ok"] == len(ids)


def caption_actor_pids() -> list[int]:
    """Ray names an actor's worker process after it (`ray::MapWorker(MapBatches(CaptionActor))...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"CaptionActor" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_crashed_worker_is_retried_and_loses_nothing(ray_cluster, tiny_model_dir, tmp_path):
    ids = small_corpus(tmp_path / "corpus", 40)
    output = tmp_path / "out"
    command = [sys.executable, str(ROOT / "jobs" / "caption_corpus.py"), "--input", str(tmp_path / "corpus"),
               "--output", str(output), "--model", tiny_model_dir, "--keep", "16", "--max-new-tokens", "64",
               "--batch-size", "2", "--rows-per-file", "2", "--address", ray_cluster]
    job = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(output.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    victims = caption_actor_pids()
    assert victims, "no captioning actor found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # the model worker dies mid-batch
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    table = read_output(str(output))
    assert sorted(table.column("id").to_pylist()) == ids  # retried by Ray: every row exactly once
    assert table.column("error").null_count == len(ids)
