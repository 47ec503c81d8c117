"""Ways to compute TokenCarve's information score on a GPU: time and agreement with the SVD definition.

    python benchmarks/bench_information_score.py            # [8, 576, 4096] bf16 hidden states, as LLaVA-1.5-7B

The score is sv_i = sum_j |U_ij| S_j of the layer-K visual hidden states (ALGORITHM.md). Every route
below computes the same quantity; they differ in precision and in how the GPU's solvers batch. Agreement
is measured against a float64 SVD on two kinds of input: Gaussian noise (a flat spectrum) and a
"realistic" one (a few dominant directions and heavy per-channel outliers, as LLM hidden states have).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import torch
from bench_gpu import timed  # this folder is on sys.path when the script runs

from tokencarve import information_scores


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


def gram_eigh_cpu(hidden: torch.Tensor) -> torch.Tensor:
    h = hidden.double()
    eigenvalues, left = torch.linalg.eigh((h @ h.mT).cpu())
    return (left * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)).abs().sum(-1).to(hidden.device)


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
    "eigh f64 (ours)": information_scores,
    "eigh f32": lambda h: gram_eigh(h, torch.float32),
    "eigh f64, stream per image": lambda h: gram_eigh_streams(h, torch.float64),
    "eigh f32, stream per image": lambda h: gram_eigh_streams(h, torch.float32),
    "eigh f64, magma": with_library("magma", lambda h: gram_eigh(h, torch.float64)),
    "eigh f32, magma": with_library("magma", lambda h: gram_eigh(h, torch.float32)),
    "eigh f64 on the CPU": gram_eigh_cpu,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--keep", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    routes = ROUTES if device == "cuda" else {k: v for k, v in ROUTES.items() if "magma" not in k and "stream" not in k}
    print(
        f"| route | batch-{args.batch} ms | ms per image | max rel. error (noise / realistic) "
        f"| top-{args.keep} agreement (noise / realistic) |\n|---|---|---|---|---|"
    )
    data = {kind: inputs(kind, args.batch, args.tokens, args.dim, device) for kind in ("noise", "realistic")}
    exact = {}
    for kind, hidden in data.items():
        u, s, _ = torch.linalg.svd(hidden.double().cpu(), full_matrices=False)
        exact[kind] = (u * s.unsqueeze(-2)).abs().sum(-1).to(device)
    for name, fn in routes.items():
        try:
            seconds = timed(lambda: fn(data["realistic"]), device, args.repeats)
            checks = [agreement(fn(data[kind]), exact[kind], args.keep) for kind in data]
        except Exception as error:  # a solver this build lacks: say so and go on
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:80]} | | | |")
            continue
        print(
            f"| {name} | {seconds * 1e3:.2f} | {seconds * 1e3 / args.batch:.2f} | {checks[0][0]:.1e} / {checks[1][0]:.1e} "
            f"| {100 * checks[0][1]:.2f} % / {100 * checks[1][1]:.2f} % |",
            flush=True,
        )


if __name__ == "__main__":
    main()
