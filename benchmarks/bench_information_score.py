"""Ways to compute TokenCarve's information score on a GPU: time and agreement with the SVD definition.

    python benchmarks/bench_information_score.py            # [B, 576, 4096] bf16 hidden states, as LLaVA-1.5-7B
    python benchmarks/bench_information_score.py --batches 8,64,256 --json $OUT/eigh.json   # the GPU session

The score is sv_i = sum_j |U_ij| S_j of the layer-K visual hidden states (ALGORITHM.md). Every route
below computes the same quantity; they differ in precision and in how the GPU's solvers batch. Agreement
is measured against a float64 SVD on two kinds of input: Gaussian noise (a flat spectrum) and a
"realistic" one (a few dominant directions and heavy per-channel outliers, as LLM hidden states have),
at the first batch size (the solvers are deterministic per matrix, so agreement does not depend on
the batch); time is measured at every batch size. The library's routes (tokencarve.eigh: torch,
nvmath's cusolverDnXsyevBatched, CuPy, the host) run through `information_scores(solver=...)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py

from common import environment, header, median_seconds, write_results  # noqa: E402

from tokencarve import eigh, information_scores  # noqa: E402
from tokencarve.testing import llava15_config  # noqa: E402


def gram_eigh(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    h = hidden.to(dtype)
    eigenvalues, left = torch.linalg.eigh(h @ h.mT)
    return (left * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)).abs().sum(-1).double()


def gram_eigh_streams(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One eigh per image, each from its own thread on its own CUDA stream, so the latency-bound
    solvers overlap (eigh checks its result on the host, which would serialise a single thread)."""
    h = hidden.to(dtype)
    gram = h @ h.mT
    out = torch.empty(h.shape[:2], dtype=torch.float64, device=h.device)
    main = torch.cuda.current_stream()

    def one(b: int) -> torch.cuda.Stream:
        stream = torch.cuda.Stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            values, vectors = torch.linalg.eigh(gram[b])
            out[b] = (vectors * values.clamp_min(0).sqrt()).abs().sum(-1).double()
        return stream

    with ThreadPoolExecutor(h.shape[0]) as pool:
        for stream in pool.map(one, range(h.shape[0])):
            main.wait_stream(stream)
    return out


def host_pool(hidden: torch.Tensor) -> torch.Tensor:
    """One float64 eigh per image on the host, spread over a pool of one-thread workers (all cores)."""
    h = hidden.double()
    gram = (h @ h.mT).cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one LAPACK thread per worker: the pool is the parallelism
    try:
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            parts = list(pool.map(torch.linalg.eigh, gram.unbind(0)))
    finally:
        torch.set_num_threads(threads)
    values, vectors = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)).abs().sum(-1).to(hidden.device)


def svd_route(hidden: torch.Tensor, driver: str | None) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(hidden.float(), full_matrices=False, driver=driver)
    return (u * s.unsqueeze(-2)).abs().sum(-1).double()


def with_library(library: str, fn):
    def run(hidden):
        previous = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library(library)
        try:
            return fn(hidden)
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)

    return run


ROUTES = {
    "eigh f64 (ours, torch)": lambda h: information_scores(h, solver="torch"),
    "eigh f64, nvmath cusolverDnXsyevBatched": lambda h: information_scores(h, solver="nvmath"),
    "eigh f64, cupy": lambda h: information_scores(h, solver="cupy"),
    "eigh f64, host, one batched LAPACK call": lambda h: information_scores(h, solver="cpu"),
    "eigh f64, host, pool of 1-thread workers": host_pool,
    "eigh f32": lambda h: gram_eigh(h, torch.float32),
    "eigh f64, stream per image": lambda h: gram_eigh_streams(h, torch.float64),
    "eigh f32, stream per image": lambda h: gram_eigh_streams(h, torch.float32),
    "eigh f64, magma": with_library("magma", lambda h: gram_eigh(h, torch.float64)),
    "eigh f32, magma": with_library("magma", lambda h: gram_eigh(h, torch.float32)),
    "svd f32 (reference's precision)": lambda h: svd_route(h, None),
    "svd f32, gesvdj": lambda h: svd_route(h, "gesvdj"),
}


def inputs(kind: str, batch: int, tokens: int, dim: int, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(batch, tokens, dim, generator=g)
    if kind == "realistic":
        directions = torch.randn(batch, 8, dim, generator=g) * torch.logspace(2, 0, 8).view(1, 8, 1)
        weights = torch.randn(batch, tokens, 8, generator=g)
        outliers = torch.zeros(dim)
        outliers[torch.randperm(dim, generator=g)[:4]] = 200.0
        noise = weights @ directions + noise + outliers
    return noise.to(device, torch.bfloat16)


def agreement(scores: torch.Tensor, exact: torch.Tensor, keep: int) -> tuple[float, float]:
    """(max relative error, share of the exact top-`keep` tokens this route also ranks top-`keep`)."""
    error = ((scores - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    top = scores.topk(keep, dim=-1).indices
    exact_top = exact.topk(keep, dim=-1).indices
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, exact_top))
    return error, shared / exact_top.numel()


def time_route(fn, hidden: torch.Tensor, repeats: int) -> float:
    """Seconds per image of `fn` on the batch `hidden`."""
    return median_seconds(lambda: fn(hidden), repeats, str(hidden.device)) / hidden.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8", help="batch sizes to time (agreement: at the first)")
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=llava15_config("7b").text_config.hidden_size)
    p.add_argument("--keep", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--out", help="also write the table to this Markdown file")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_only = ("magma", "stream", "nvmath", "cupy")
    routes = ROUTES if device == "cuda" else {k: v for k, v in ROUTES.items() if not any(g in k for g in gpu_only)}
    batches = [int(b) for b in args.batches.split(",")]
    data = {kind: inputs(kind, batches[0], args.tokens, args.dim, device) for kind in ("noise", "realistic")}
    exact = {}
    for kind, hidden in data.items():
        u, s, _ = torch.linalg.svd(hidden.double().cpu(), full_matrices=False)
        exact[kind] = (u * s.unsqueeze(-2)).abs().sum(-1).to(device)
    env = environment(device)
    lines = [header(env), ""]
    emit = lambda line: (print(line, flush=True), lines.append(line))  # noqa: E731
    emit(
        f"| route | {' | '.join(f'ms per image at batch {b}' for b in batches)} | max rel. error (noise / realistic) "
        f"| top-{args.keep} agreement (noise / realistic) |\n|---|{'---|' * len(batches)}---|---|"
    )
    results = []
    for name, fn in routes.items():
        try:
            checks = [agreement(fn(data[kind]), exact[kind], args.keep) for kind in data]
            per_image = {}
            for batch in batches:
                repeats = args.repeats if batch <= 64 else 2
                per_image[batch] = time_route(fn, inputs("realistic", batch, args.tokens, args.dim, device), repeats)
        except Exception as error:  # a solver this build lacks: say so and go on
            emit(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} |")
            results.append({"route": name, "error": f"{type(error).__name__}: {error}"})
            continue
        results.append(
            {
                "route": name,
                "ms_per_image": {str(b): t * 1e3 for b, t in per_image.items()},
                "max_relative_error": {"noise": checks[0][0], "realistic": checks[1][0]},
                f"top{args.keep}_agreement": {"noise": checks[0][1], "realistic": checks[1][1]},
            }
        )
        times = " | ".join(f"{t * 1e3:.3f}" for t in per_image.values())
        emit(
            f"| {name} | {times} | {checks[0][0]:.1e} / {checks[1][0]:.1e} "
            f"| {100 * checks[0][1]:.2f} % / {100 * checks[1][1]:.2f} % |",
        )
    if args.json or args.out:
        record = {
            "environment": env,
            "nvmath": eigh.installed("nvmath"),
            "cupy": eigh.installed("cupy"),
            "shape": [args.tokens, args.dim],
            "keep": args.keep,
            "routes": results,
        }
        write_results("\n".join(lines), record, args.out, args.json)


if __name__ == "__main__":
    main()
