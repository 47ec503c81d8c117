"""Load test of the Serve app on loopback: throughput and p50/p99 latency, TokenCarve on vs off.

    python benchmarks/bench_serve.py [--model models/carve-tiny] [--requests 64] [--concurrency 8]

Starts a local Ray + Serve app, then sends the same bounded set of requests (a fixed count, a time
limit, loopback only) twice per setting, alternating stock (`method: none`) and TokenCarve on the
same replica, so both run on the same machine in one process. Prints a Markdown table with ratios.
"""

from __future__ import annotations

import argparse
import base64
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from pipeline.serve import build_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(folder: Path, count: int) -> list[tuple[str, str]]:
    rows = pq.read_table(sorted(folder.glob("*.parquet"))[0], columns=["image", "prompt"]).to_pylist()
    return [(base64.b64encode(r["image"]).decode(), r["prompt"]) for r in (rows * count)[:count]]


def load(url: str, payloads: list[dict], concurrency: int, deadline_s: float) -> tuple[float, list[float], int]:
    """Send every payload (bounded in count and time); returns (seconds, latencies of 200s, failures)."""
    latencies, failures = [], 0
    stop = time.time() + deadline_s

    def one(payload):
        if time.time() > stop:
            return None
        started = time.perf_counter()
        reply = httpx.post(f"{url}/v1/caption", json=payload, timeout=deadline_s)
        return time.perf_counter() - started if reply.status_code == 200 else None

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for latency in pool.map(one, payloads):
            if latency is None:
                failures += 1
            else:
                latencies.append(latency)
    return time.perf_counter() - started, latencies, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "carve-tiny"))
    p.add_argument("--data", default=str(ROOT / "data" / "sample"))
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=300, help="seconds per round at most")
    args = p.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model": args.model,
                "keep": args.keep,
                "max_new_tokens": args.max_new_tokens,
                "max_batch_size": args.max_batch_size,
                "max_replicas": 1,
                "min_replicas": 1,
                "max_ongoing_requests": 2 * args.max_batch_size,
                "max_queued_requests": 4 * args.requests,
            }
        ),
        name="bench",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    images = sample_images(Path(args.data), args.requests)
    settings = {
        "stock": {"method": "none"},
        f"TokenCarve keep={args.keep}": {"method": "tokencarve", "keep": args.keep},
    }
    load(url, [{"image": images[0][0]} for _ in range(args.concurrency)], args.concurrency, args.time_limit)  # warm-up
    results = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, extra in settings.items():
            payloads = [{"image": image, "prompt": prompt, **extra} for image, prompt in images]
            results[name].append(load(url, payloads, args.concurrency, args.time_limit))
    serve.shutdown()

    print(f"# Serve load benchmark, {date.today()}")
    print(
        f"machine: {platform.machine()}, 2 CPUs for Ray, no GPU; model {args.model}; {args.requests} requests x "
        f"{args.rounds} rounds per setting, concurrency {args.concurrency}, max batch {args.max_batch_size}, "
        f"{args.max_new_tokens} max new tokens, loopback HTTP\n"
    )
    print("| setting | requests/s | vs stock | p50 latency s | p99 latency s | failed |")
    print("|---|---|---|---|---|---|")
    stock_rate = None
    for name, rounds in results.items():
        latencies = sorted(seconds for _, lat, _ in rounds for seconds in lat)
        rate = sum(len(lat) for _, lat, _ in rounds) / sum(s for s, _, _ in rounds)
        stock_rate = stock_rate or rate
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(
            f"| {name} | {rate:.2f} | {rate / stock_rate:.2f}x | {statistics.median(latencies):.3f} | {p99:.3f} "
            f"| {sum(f for _, _, f in rounds)} |"
        )


if __name__ == "__main__":
    main()
