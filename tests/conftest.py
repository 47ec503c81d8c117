import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Credentials for the loopback S3 server, set before Ray starts so its workers inherit them
# (pyarrow's S3 filesystem reads them from the environment, never from a URI).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOB = Path(__file__).resolve().parent.parent / "jobs" / "caption_corpus.py"


def job_command(inputs: str, output: str, model: str, *options: str) -> list[str]:
    """The captioning job's command line (`python jobs/caption_corpus.py ...`), as a user runs it."""
    return [sys.executable, str(JOB), "--input", str(inputs), "--output", str(output), "--model", str(model), *options]


def wait_until(condition, timeout: float, what: str, interval: float = 0.2, detail=None):
    """Poll `condition` until it returns something truthy (returned) or `timeout` seconds pass (fail;
    `detail()`, when given, adds what the failure message should show, e.g. a server's log tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    extra = f"\n{detail()}" if detail is not None else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's standalone server) on loopback; yields the URI query that points
    pyarrow at it (`s3://bucket/key?endpoint_override=...&scheme=http`) and a pyarrow filesystem."""
    import pyarrow.fs as pafs

    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if binary is None:
        pytest.fail("moto_server is not installed (pip install 'moto[server]', part of the test extra)")
    port = free_port()
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
        connect_timeout=5,
        request_timeout=30,
    )

    def answers():
        try:
            fs.get_file_info("probe-bucket")
            return True
        except OSError:
            return server.poll() is not None and pytest.fail("moto_server exited")

    wait_until(answers, 60, "the S3 server to answer")
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", fs
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (2 CPUs, like this machine), on
    loopback, exporting metrics every second (Prometheus finds it through the discovery file)."""
    import ray

    # The dashboard process is what writes Prometheus' service-discovery file.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LLaVA with a real processor, saved for from_pretrained."""
    from tokencarve.testing import save_tiny_llava_with_processor

    path = tmp_path_factory.mktemp("tiny-llava-processor")
    save_tiny_llava_with_processor(path)
    return str(path)


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory):
    """A random tiny LLaVA-1.5 (4 decoder layers, 576 tokens per image), saved; no processor."""
    from .tiny_llava import save_tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    save_tiny_llava(path)
    return path


@pytest.fixture(scope="session")
def sdpa_model(tiny_llava_path):
    """The tiny LLaVA with SDPA attention, shared: patch it only through `carved`, which undoes it."""
    from .tiny_llava import load

    return load(tiny_llava_path, "sdpa")


@pytest.fixture(scope="session")
def eager_model(tiny_llava_path):
    from .tiny_llava import load

    return load(tiny_llava_path, "eager")


@pytest.fixture
def carved(sdpa_model):
    """Yields a function that applies a config (cut at tiny_llava.CUT) to the shared model; removed afterwards."""
    import tokencarve

    from .tiny_llava import CUT

    def _apply(**config):
        return tokencarve.apply(sdpa_model, tokencarve.CarveConfig(layer=CUT, **config))

    yield _apply
    if tokencarve.is_applied(sdpa_model):
        tokencarve.remove(sdpa_model)


@pytest.fixture(scope="session")
def bundled():
    """The bundled trained carve-tiny (models/carve-tiny) and its processor, loaded once."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    path = Path(__file__).resolve().parent.parent / "models" / "carve-tiny"
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
