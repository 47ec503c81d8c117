"""Produce docs/dashboard.png from real data: a local Ray cluster and Debian's Prometheus (loopback),
the batch pipeline run stock and with TokenCarve on the sample corpus, and Serve traffic alongside.

    python benchmarks/dashboard_snapshot.py [--model models/carve-tiny] [--data data/sample] [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from benchmarks.bench_serve import free_port  # noqa: E402
from jobs.caption_corpus import build_job, parse_args  # noqa: E402
from monitoring.render import render_png  # noqa: E402
from pipeline.batch import run  # noqa: E402
from pipeline.serve import build_app  # noqa: E402


def start_prometheus(folder: Path) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="2s", evaluation_interval="2s")
    config["scrape_configs"] = [c for c in config["scrape_configs"] if c["job_name"] == "ray"]
    config["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "2s"
    config["scrape_configs"][0]["relabel_configs"] = [
        {  # loopback only on this machine
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
            shutil.which("prometheus") or "/usr/bin/prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{port}"


def serve_traffic(url: str, images: list[str], stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():  # bounded by the pipeline runs' duration; loopback only
        payload = {"image": images[i % len(images)], "method": "none" if i % 2 else "tokencarve"}
        httpx.post(f"{url}/v1/caption", json=payload, timeout=120)
        if i % 10 == 9:
            httpx.post(f"{url}/v1/caption", json={"image": "not-base64!"}, timeout=30)
        i += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    p.add_argument("--rounds", type=int, default=2)
    # The Serve replica takes no CPU slot: on 2 CPUs the actor pool takes one and Ray Data's read and
    # write tasks need the other, or the dataset stalls (ray#44687).
    known, rest = p.parse_known_args()
    job = build_job(parse_args(rest + ["--max-new-tokens", "16"]))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 2000},
    )
    with tempfile.TemporaryDirectory() as scratch:
        prometheus, prom_url = start_prometheus(Path(scratch))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                {
                    "model": job.engine.model,
                    "keep": 64,
                    "max_new_tokens": 16,
                    "max_replicas": 1,
                    "num_cpus": 0,
                    "max_batch_size": 4,
                    "max_ongoing_requests": 8,
                }
            ),
            name="snapshot",
            route_prefix="/",
        )
        rows = pq.read_table(sorted(Path(job.inputs[0]).glob("*.parquet"))[0], columns=["image"]).to_pylist()
        images = [base64.b64encode(r["image"]).decode() for r in rows[:20]]
        stop = threading.Event()
        traffic = threading.Thread(target=serve_traffic, args=(f"http://127.0.0.1:{port}", images, stop))
        started = time.time()
        traffic.start()
        for round_ in range(known.rounds):
            for method, keep in [("none", 64), ("tokencarve", 64), ("tokencarve", 128)]:
                engine = job.engine.__class__(**{**job.engine.__dict__, "method": method, "keep": keep})
                run(
                    job.__class__(**{**job.__dict__, "engine": engine, "output": f"{scratch}/{method}-{keep}-{round_}"})
                )
        stop.set()
        traffic.join()
        time.sleep(8)
        count = render_png(prom_url, started - 30, time.time(), known.out)
        print(f"wrote {known.out}: {count} panels with data")
        serve.shutdown()
        prometheus.terminate()


if __name__ == "__main__":
    main()
