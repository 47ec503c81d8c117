"""A real Prometheus (Debian's package) scrapes a real local Ray cluster while the pipeline and the
Serve app run on the tiny model: every dashboard query returns data, every metric is exported and sane."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from monitoring.dashboards import OUTPUT, expressions, render
from monitoring.metrics import METRICS
from monitoring.push import SUMMARY_GAUGES, push_summary
from pipeline.batch import CaptionJob, run
from pipeline.serve import build_app
from tokencarve.engine import EngineConfig

from .bad_images import encode, gradient
from .conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
# Budgets no other test uses: other tests' traffic in the same Ray session is told apart by label.
KEEP_BATCH, KEEP_SERVE = 40, 72
OURS = f'{{keep=~"{KEEP_BATCH}|{KEEP_SERVE}"}}'
SUBSTITUTIONS = {"$__rate_interval": "2m", "$__range": "15m", "$speedup": "1.23", "$gpu_hour_price": "2.5"}


def binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: `make install` installs it with apt-get")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


def test_checked_in_dashboard_is_the_generated_one():
    assert OUTPUT.read_text() == render(), "run `python -m monitoring.dashboards`"


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Prometheus with the project's own config (monitoring/prometheus.yml), scraping every second."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"] = [c for c in config["scrape_configs"] if c["job_name"] == "ray"]
    ray_job = config["scrape_configs"][0]
    ray_job["file_sd_configs"][0]["refresh_interval"] = "1s"
    # Ray lists this node under its interface address; tests talk to loopback only (same ports).
    ray_job["relabel_configs"] = [
        {
            "source_labels": ["__address__"],
            "regex": r"[^:]+:(\d+)",
            "replacement": "127.0.0.1:$1",
            "target_label": "__address__",
        }
    ]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url, process), 60, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def ready(url: str, process: subprocess.Popen) -> bool:
    """A server's /-/ready answers 200 (Prometheus and the Pushgateway both have it); fails if it died."""
    if process.poll() is not None:
        pytest.fail(f"{process.args[0]} exited with status {process.returncode}")
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def value(url: str, expr: str) -> float:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(url: str, expr: str, minimum: float, seconds: float = 90) -> float:
    return wait_until(
        lambda: (current := value(url, expr)) >= minimum and current, seconds, f"{expr} to reach {minimum}", interval=1
    )


@pytest.fixture(scope="module")
def traffic(prometheus, ray_cluster, tiny_model_dir, tmp_path_factory):
    """The batch pipeline (with a broken row) and the Serve app (a good and a bad request)."""
    folder = tmp_path_factory.mktemp("monitored")
    rows = [{"id": f"m-{i}", "image": encode(gradient(30 + i, 30), "PNG")} for i in range(6)]
    rows.append({"id": "m-broken", "image": b"not an image"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "corpus.parquet")
    run(
        CaptionJob(
            inputs=[str(folder / "corpus.parquet")],
            output=str(folder / "out"),
            batch_size=3,
            engine=EngineConfig(model=tiny_model_dir, keep=KEEP_BATCH, max_new_tokens=4),
        )
    )

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model": tiny_model_dir,
                "keep": KEEP_SERVE,
                "max_new_tokens": 3,
                "max_replicas": 1,
                "max_ongoing_requests": 8,
                "max_batch_size": 4,
            }
        ),
        name="monitored",
        route_prefix="/",
    )
    image = base64.b64encode(encode(gradient(40, 40), "PNG")).decode()
    assert httpx.post(f"http://127.0.0.1:{port}/v1/caption", json={"image": image}, timeout=60).status_code == 200
    assert httpx.post(f"http://127.0.0.1:{port}/v1/caption", json={"image": "???"}, timeout=60).status_code == 400
    wait_for(prometheus, f"sum(ray_tokencarve_images_processed_total{OURS})", 7)
    wait_for(prometheus, f"sum(ray_tokencarve_images_failed_total{OURS})", 2)
    wait_for(prometheus, "sum(ray_serve_deployment_replica_healthy)", 1)
    # a few more scrapes, so that rate() has two samples of every series of ours: the Serve requests
    # made the newest ones (keep=72, reason=bad_base64), so once these have 3 samples, all have
    for name in ("images_processed", "images_failed"):
        wait_for(prometheus, f"min(count_over_time(ray_tokencarve_{name}_total{OURS}[10m]))", 3)
    yield prometheus
    serve.shutdown()


@pytest.mark.slow
def test_prometheus_scrapes_ray_on_loopback_only(traffic):
    targets = httpx.get(f"{traffic}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert targets and all(t["labels"]["instance"].startswith("127.0.0.1:") for t in targets)
    assert any(t["health"] == "up" for t in targets)


@pytest.mark.slow
@pytest.mark.parametrize("expr", expressions())
def test_every_dashboard_query_returns_data(traffic, expr):
    for placeholder, replacement in SUBSTITUTIONS.items():
        expr = expr.replace(placeholder, replacement)
    assert query(traffic, expr), f"no data for {expr}"


@pytest.mark.slow
def test_every_metric_is_exported_with_sane_values(traffic):
    names = set(httpx.get(f"{traffic}/api/v1/label/__name__/values", timeout=10).json()["data"])
    for spec in METRICS.values():
        exported = spec.exported()
        assert (f"{exported}_bucket" if spec.kind == "histogram" else exported) in names, exported
    total = lambda name: value(traffic, f"sum(ray_tokencarve_{name}_total{OURS})")  # noqa: E731
    assert total("images_processed") == 7  # 6 batch rows + 1 Serve request
    assert total("images_failed") == 2  # the broken row + the bad request
    failed = query(traffic, f"sum by (reason) (ray_tokencarve_images_failed_total{OURS})")
    assert {r["metric"]["reason"] for r in failed} == {"undecodable_image", "bad_base64"}
    assert 0 < total("visual_tokens_kept") <= total("visual_tokens_in") == 7 * 576
    assert 0 < total("kv_cache_bytes_held") < total("kv_cache_bytes_uncompressed")
    assert total("generated_tokens") == 6 * 4 + 3
    assert total("model_seconds") > 0
    assert value(traffic, f"sum(ray_tokencarve_batch_size_count{OURS})") >= 3
    assert value(traffic, f"sum(ray_tokencarve_carve_seconds_sum{OURS})") > 0
    # every engine's decode pool: allocated within its budget, nothing fell back to eager
    pools = query(traffic, f"ray_tokencarve_decode_pool_bytes{OURS}")
    budgets = query(traffic, f"ray_tokencarve_decode_pool_budget_bytes{OURS}")
    assert pools and all(0 < float(p["value"][1]) for p in pools) and budgets
    assert max(float(p["value"][1]) for p in pools) <= min(float(b["value"][1]) for b in budgets)
    assert value(traffic, f"sum(ray_tokencarve_decode_eager_fallbacks{OURS})") == 0


@pytest.mark.slow
def test_dashboard_renders_to_png_from_real_data(traffic, tmp_path):
    """The picture for people without Grafana; DASHBOARD_PNG=docs/dashboard.png keeps a copy."""
    from monitoring.dashboards import PANELS
    from monitoring.render import render_png

    end = time.time()
    path = os.environ.get("DASHBOARD_PNG") or str(tmp_path / "dashboard.png")
    assert render_png(traffic, end - 600, end, path) == len(PANELS)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_summary_reaches_a_real_pushgateway(tmp_path):
    port = free_port()
    gateway = subprocess.Popen(
        [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: ready(f"http://127.0.0.1:{port}", gateway), 30, "the Pushgateway to be ready")
        summary = {
            "model": "/x/carve-tiny",
            "method": "tokencarve",
            "keep": 64,
            "rows_ok": 9,
            "rows_failed": 1,
            "rows_this_run": 10,
            "rows_per_s": 2.5,
            "visual_tokens_kept_pct": 11.1,
            "visual_tokens_kept_mean": 64.0,
            "visual_tokens_kept_p50": 64,
            "visual_tokens_kept_p95": 64,
            "kv_bytes_saved": 1234,
            "kv_saved_pct": 80.0,
            "seconds": 4.0,
        }
        push_summary(summary, f"127.0.0.1:{port}")
        scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert (
            'tokencarve_job_rows_ok{instance="",job="tokencarve_caption_corpus",keep="64",method="tokencarve",model="carve-tiny"} 9'
            in scraped
        )
        # every summary figure, with its labels, as the gateway serves it to Prometheus
        pushed = {
            s.name: s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name.startswith("tokencarve_job_") and s.labels.get("model") == "carve-tiny"
        }
        assert pushed == {f"tokencarve_job_{key}": float(summary[key]) for key in SUMMARY_GAUGES}
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
