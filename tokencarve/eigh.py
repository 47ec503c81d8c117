"""The symmetric eigensolver behind `information_scores`: one batched call per group of images.

The information score needs the eigenvectors and eigenvalues of B Gram matrices (576 x 576 for
LLaVA-1.5) in float64. What makes that fast differs by stack:

    torch   `torch.linalg.eigh` on the batch. On the CPU, and on CUDA from torch 2.12 on (which routes
            batched eigh to cuSOLVER's `cusolverDnXsyevBatched`, one launch for the whole batch).
            torch <= 2.11 loops `syevd` over the batch for n > 32: ~6 ms per 576 x 576 image.
    nvmath  the same `cusolverDnXsyevBatched` through nvmath-python's bindings (`pip install
            tokencarve[cuda]`), for CUDA builds of torch that do not batch it themselves.
    cupy    CuPy's `cupy.linalg.eigh` on the batch (its own batched Jacobi where cuSOLVER allows).
    cpu     copy the Gram matrices to the host and solve them there (LAPACK, all cores).

`solver="auto"` (the default, or the TOKENCARVE_EIGH environment variable) picks torch, except on
CUDA with torch < 2.12 where nvmath is used if it is installed. Every route returns what
`torch.linalg.eigh` returns (ascending eigenvalues, eigenvectors in columns), in the input's dtype
and on its device, so the scores are the same up to the solver's rounding; tests/test_core.py and
benchmarks/bench_information_score.py check that.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

SOLVERS = ("auto", "torch", "nvmath", "cupy", "cpu")
BATCHED_TORCH = (2, 12)  # the first torch release whose CUDA eigh is batched for any n
ENVIRONMENT_VARIABLE = "TOKENCARVE_EIGH"


def default_solver() -> str:
    solver = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if solver not in SOLVERS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={solver!r}; choose one of {SOLVERS}")
    return solver


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@lru_cache(maxsize=None)
def installed(module: str) -> bool:
    """Whether `module` can be imported (asked once per process: gram_eigh runs on every carve)."""
    return importlib.util.find_spec(module) is not None


def resolve(solver: str, device_type: str, version: tuple[int, int], nvmath_installed: bool) -> str:
    """The concrete route for `solver` on a device type and torch version ("auto" decides here)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown eigh solver {solver!r}; choose one of {SOLVERS}")
    if solver != "auto":
        return solver
    if device_type == "cuda" and version < BATCHED_TORCH and nvmath_installed:
        return "nvmath"
    return "torch"


def gram_eigh(gram: torch.Tensor, solver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [B, n], eigenvectors [B, n, n]) of symmetric `gram` [B, n, n], as torch.linalg.eigh."""
    route = resolve(solver or default_solver(), gram.device.type, torch_version(), installed("nvmath"))
    off_the_gpu = gram.device.type != "cuda" and route in ("nvmath", "cupy")  # CUDA-only routes: torch's
    if route == "torch" or off_the_gpu:
        return torch.linalg.eigh(gram)
    if route == "cpu":
        values, vectors = torch.linalg.eigh(gram.cpu())
        return values.to(gram.device), vectors.to(gram.device)
    if route == "cupy":
        return _cupy_eigh(gram)
    return _nvmath_eigh(gram)


def _cupy_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import cupy

    with cupy.cuda.ExternalStream(torch.cuda.current_stream(gram.device).cuda_stream):
        values, vectors = cupy.linalg.eigh(cupy.from_dlpack(gram.contiguous()))
    return torch.from_dlpack(values), torch.from_dlpack(vectors)


@lru_cache(maxsize=None)
def _cusolver_handle(device_index: int) -> int:
    from nvmath.bindings import cusolverDn

    with torch.cuda.device(device_index):
        return cusolverDn.create()


def _nvmath_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cusolverDnXsyevBatched on torch's current stream. cuSOLVER is column-major: a symmetric input
    reads the same either way, and the eigenvectors come back in its columns, i.e. in the rows of the
    row-major result, hence the transpose."""
    import numpy as np
    from nvmath import CudaDataType
    from nvmath.bindings import cublas, cusolver, cusolverDn

    if gram.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the nvmath eigh route takes float32 or float64, not {gram.dtype}")
    matrices = gram.contiguous().clone()  # overwritten with the eigenvectors
    batch, n, _ = matrices.shape
    values = torch.empty(batch, n, dtype=gram.dtype, device=gram.device)
    info = torch.zeros(batch, dtype=torch.int32, device=gram.device)
    data_type = CudaDataType.CUDA_R_64F if gram.dtype == torch.float64 else CudaDataType.CUDA_R_32F
    handle = _cusolver_handle(gram.device.index or 0)
    cusolverDn.set_stream(handle, torch.cuda.current_stream(gram.device).cuda_stream)
    params = cusolverDn.create_params()
    try:
        common = (handle, params, cusolver.EigMode.VECTOR, cublas.FillMode.LOWER, n)
        arrays = (data_type, matrices.data_ptr(), n, data_type, values.data_ptr(), data_type)
        device_bytes, host_bytes = cusolverDn.xsyev_batched_buffer_size(*common, *arrays, batch)
        device_work = torch.empty(max(1, device_bytes), dtype=torch.uint8, device=gram.device)
        host_work = np.empty(max(1, host_bytes), dtype=np.uint8)
        cusolverDn.xsyev_batched(
            *common,
            *arrays,
            device_work.data_ptr(),
            device_bytes,
            host_work.ctypes.data,
            host_bytes,
            info.data_ptr(),
            batch,
        )
    finally:
        cusolverDn.destroy_params(params)
    return values, matrices.mT
