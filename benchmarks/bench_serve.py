"""Load tests of the Serve app on loopback: what one replica holds, and TokenCarve on vs off.

    python benchmarks/bench_serve.py [--model models/carve-tiny] [--requests 64] [--concurrency 8]

Starts a local Ray + Serve app (one replica), then sends bounded sets of requests (a fixed count, a
time limit, loopback only; pipeline.load):

- capacity: a steady load (`--concurrency` clients, as many as the replica takes in flight) and an
  overload (`--overload` x as many clients): answers by status, 503s with Retry-After, requests lost
  without an answer, throughput and latency;
- A/B: the same requests per round, alternating stock (`method: none`) and TokenCarve on the same
  replica.

Prints Markdown tables with the machine, date and versions.
"""

from __future__ import annotations

import argparse
import base64
import socket
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/common.py

import common  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from pipeline.load import LoadReport, run_load  # noqa: E402
from pipeline.serve import build_app  # noqa: E402
from tokencarve.engine import DEFAULT_METHOD  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(folder: Path, count: int) -> list[tuple[str, str]]:
    rows = pq.read_table(sorted(folder.glob("*.parquet"))[0], columns=["image", "prompt"]).to_pylist()
    return [(base64.b64encode(r["image"]).decode(), r["prompt"]) for r in (rows * count)[:count]]


def environment() -> str:
    """common's header, plus the serving stack's versions and Ray's share of the CPUs."""
    env = common.environment("cpu") | {name: version(name) for name in ("ray", "fastapi", "httpx")}
    return common.header(env | {"CPUs for Ray": 2})


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def capacity_row(name: str, clients: int, report: LoadReport) -> str:
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(report.statuses.items()))
    with_retry_after = sum(a.retry_after is not None for a in report.refused)
    return (
        f"| {name} | {clients} | {len(report.answers) + len(report.lost)} | {statuses} | "
        f"{with_retry_after} of {len(report.refused)} | {sum(report.other.values())} | {len(report.lost)} | "
        f"{report.ok_per_second:.2f} | {seconds(report.latency(0.5))} | {seconds(report.latency(0.99))} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "carve-tiny"))
    p.add_argument("--data", default=str(ROOT / "data" / "sample"))
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--requests", type=int, default=64, help="requests per load (the overload sends 4x)")
    p.add_argument("--concurrency", type=int, default=8, help="steady clients (and the A/B's)")
    p.add_argument("--overload", type=int, default=8, help="the overload has this many times the steady clients")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queued-requests", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="A/B rounds per setting (0: no A/B)")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per load at most")
    args = p.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "model": args.model,
        "keep": args.keep,
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size,
        "max_replicas": 1,
        "min_replicas": 1,
        "max_ongoing_requests": 2 * args.max_batch_size,
        "max_queued_requests": args.max_queued_requests,
        "retry_after_s": 2,
    }
    serve.run(build_app(settings), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/caption"
    images = sample_images(Path(args.data), 4 * args.requests)
    payloads = [{"image": image, "prompt": prompt} for image, prompt in images]
    run_load(url, payloads[: args.concurrency], args.concurrency, args.time_limit)  # warm-up

    overload_clients = args.overload * args.concurrency
    steady = run_load(url, payloads[: args.requests], args.concurrency, args.time_limit)
    overload = run_load(url, payloads, overload_clients, args.time_limit)
    ab = {"stock": {"method": "none"}, f"TokenCarve keep={args.keep}": {"method": "tokencarve", "keep": args.keep}}
    results = {name: [] for name in ab}
    for _ in range(args.rounds):
        for name, extra in ab.items():
            results[name].append(
                run_load(url, [p | extra for p in payloads[: args.requests]], args.concurrency, args.time_limit)
            )
    serve.shutdown()

    print(f"# Serve load benchmark\n\n{environment()}")
    print(
        f"model {Path(args.model).name}, one replica: max_batch_size {args.max_batch_size}, max_ongoing_requests "
        f"{settings['max_ongoing_requests']}, max_queued_requests {args.max_queued_requests}, retry_after_s 2, "
        f"{args.max_new_tokens} max new tokens, method {DEFAULT_METHOD} keep {args.keep}; loopback HTTP\n"
    )
    print(
        "| load | clients | requests | answers by status | 503s with Retry-After | other errors | lost "
        "| 200s per second | p50 latency s | p99 latency s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(capacity_row("steady", args.concurrency, steady))
    print(capacity_row("overload", overload_clients, overload))
    if not args.rounds:
        return
    print(f"\nA/B: {args.requests} requests x {args.rounds} rounds per setting, {args.concurrency} clients\n")
    print("| setting | requests/s | vs stock | p50 latency s | p99 latency s | failed |")
    print("|---|---|---|---|---|---|")
    stock_rate = None
    for name, rounds in results.items():
        merged = LoadReport(sum(r.seconds for r in rounds), [a for r in rounds for a in r.answers])
        rate = merged.ok_per_second
        stock_rate = stock_rate or rate
        failed = sum(len(r.answers) - len(r.ok) + len(r.lost) + r.not_sent for r in rounds)
        print(
            f"| {name} | {rate:.2f} | {rate / stock_rate:.2f}x | {seconds(merged.latency(0.5))} "
            f"| {seconds(merged.latency(0.99))} | {failed} |"
        )


if __name__ == "__main__":
    main()
