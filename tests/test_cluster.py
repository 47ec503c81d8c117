"""The job on a real Ray cluster: `ray start --head` + `ray job submit`, and a worker crash
(the cluster-launcher config is checked without a cluster in test_cluster_config.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import read_output

from .bad_images import encode, gradient
from .conftest import free_port, job_command, wait_until

ROOT = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).parent / "ray"

pytestmark = pytest.mark.slow  # real Ray clusters and jobs


def small_corpus(folder: Path, rows: int) -> list[str]:
    folder.mkdir(parents=True)
    ids = [f"img-{i:03d}" for i in range(rows)]
    table = pa.Table.from_pylist([{"id": i, "image": encode(gradient(20 + n, 30), "PNG")} for n, i in enumerate(ids)])
    pq.write_table(table, folder / "corpus.parquet", row_group_size=4)
    return ids


HEAD_DEADLINE_S = 240  # a cold `ray start` on 2 busy cores can take minutes; a healthy one takes ~10 s


@pytest.fixture
def head_node(tmp_path):
    """A real Ray head started with `ray start --head` (token auth, as Ray 2.60 defaults to).

    Ready means what `ray job submit` needs: the GCS port accepts connections, the head's dashboard
    agent (which runs submitted jobs; without it a submit fails with "No available agent") listens,
    and the job API answers `ray job list`. Its own stdout/stderr go to a file whose tail, with the
    dashboard's and agent's logs, is the failure message. Shutdown stops this head only (`ray stop`
    would stop every Ray on the machine): its process group, then any process left naming its temp dir."""
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    # Ray puts unix sockets under --temp-dir (a ~107-byte path limit): a short one of our own, which
    # also names every process of this head (for cleanup) and holds its logs
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{RAY_BIN.parent}:{os.environ['PATH']}")
    log = tmp_path / "ray-start.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            [
                str(RAY_BIN),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=true",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                f"--dashboard-agent-listen-port={agent}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(
            lambda: head_ready(head, (gcs, agent), address, env),
            HEAD_DEADLINE_S,
            "the Ray head's GCS, job agent and job API",
            interval=1,
            detail=lambda: head_logs(log, temp_dir),
        )
        yield address, env
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def head_ready(head: subprocess.Popen, ports: tuple[int, ...], address: str, env: dict) -> bool:
    if head.poll() is not None:
        pytest.fail(f"`ray start --head` exited with status {head.returncode}")
    for port in ports:  # the agent registers itself with the GCS right after its HTTP server is up
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False  # not listening yet: no point asking the job API
    try:  # one probe may hang on a loaded machine; it must not eat the whole deadline
        probe = subprocess.run(
            [str(RAY_BIN), "job", "list", "--address", address], env=env, capture_output=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({err})"


def head_logs(log: Path, temp_dir: Path) -> str:
    parts = [f"--- ray start (tail of {log}):\n{tail(log)}"]
    for name in ("dashboard.log", "dashboard_agent.log", "gcs_server.out"):
        parts += [f"--- {path}:\n{tail(path, 20)}" for path in sorted(temp_dir.glob(f"session_*/logs/{name}"))[-1:]]
    return "\n".join(parts)


def processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM to the head's process group (`ray start --block` then stops what it started), SIGKILL
    after 60 s; then SIGKILL whatever still names this head's temp dir (workers in their own session)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    for pid in processes_naming(str(temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not processes_naming(str(temp_dir)), 30, "the Ray head's processes to exit")


def test_ray_job_submit_runs_the_job_on_a_running_cluster(head_node, tiny_model_dir, tmp_path):
    address, env = head_node
    ids = small_corpus(tmp_path / "corpus", 12)
    output = tmp_path / "out"
    submit = subprocess.run(
        [
            str(RAY_BIN),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/caption_corpus.py",
            "--input",
            str(tmp_path / "corpus"),
            "--output",
            str(output),
            "--model",
            tiny_model_dir,
            "--keep",
            "48",
            "--max-new-tokens",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    table = read_output(str(output))
    assert sorted(table.column("id").to_pylist()) == ids
    assert set(table.column("visual_tokens_kept").to_pylist()) == {48}
    assert json.loads((output / "_summary.json").read_text())["rows_ok"] == len(ids)


def test_a_crashed_worker_is_retried_and_loses_nothing(ray_cluster, tiny_model_dir, tmp_path):
    ids = small_corpus(tmp_path / "corpus", 40)
    output = tmp_path / "out"
    command = job_command(
        str(tmp_path / "corpus"),
        str(output),
        tiny_model_dir,
        "--keep",
        "16",
        "--max-new-tokens",
        "64",
        "--batch-size",
        "2",
        "--rows-per-file",
        "2",
        "--address",
        ray_cluster,
    )
    job = subprocess.Popen(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # parts appear as batches finish (under <output>/<unit>/): kill the model worker after the second
    wait_until(
        lambda: len(list(output.rglob("part-*.parquet"))) >= 2 or job.poll() is not None,
        240,
        "the job's first two output files",
    )
    assert job.poll() is None, job.communicate()[1][-3000:]
    # Ray names an actor's worker process after it (`ray::MapWorker(MapBatches(CaptionActor))...`)
    victims = processes_naming("CaptionActor")
    assert victims, "no captioning actor found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # the model worker dies mid-batch
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    table = read_output(str(output))
    assert sorted(table.column("id").to_pylist()) == ids  # retried by Ray: every row exactly once
    assert table.column("error_code").null_count == len(ids)
