import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session (2 CPUs, like this machine), on
    loopback, exporting metrics every second (Prometheus finds it through the discovery file)."""
    import ray

    # The dashboard process is what writes Prometheus' service-discovery file.
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), log_to_driver=False,
             _node_ip_address="127.0.0.1", _metrics_export_port=free_port(),
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny LLaVA with a real processor, saved for from_pretrained."""
    from tokencarve.testing import save_tiny_llava_with_processor

    path = tmp_path_factory.mktemp("tiny-llava-processor")
    save_tiny_llava_with_processor(path)
    return str(path)
