"""The eigensolver routes behind information_scores (tokencarve.eigh): which one runs where, and that
every route computes the same scores. The CUDA routes run where a GPU is present."""

import pytest
import torch

from tokencarve import eigh, information_scores


def test_auto_uses_torch_except_on_cuda_before_batched_eigh():
    assert eigh.resolve("auto", "cpu", (2, 11), nvmath_installed=True) == "torch"
    assert eigh.resolve("auto", "cuda", (2, 11), nvmath_installed=True) == "nvmath"  # torch loops syevd there
    assert eigh.resolve("auto", "cuda", (2, 11), nvmath_installed=False) == "torch"
    assert eigh.resolve("auto", "cuda", (2, 12), nvmath_installed=True) == "torch"  # batched cuSOLVER in torch
    assert eigh.resolve("cupy", "cuda", (2, 13), nvmath_installed=False) == "cupy"  # asked for: used
    with pytest.raises(ValueError, match="unknown eigh solver"):
        eigh.resolve("magma", "cuda", (2, 11), nvmath_installed=False)
    assert eigh.torch_version("2.11.0+cu130") == (2, 11) and eigh.torch_version("2.13.0") == (2, 13)


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv(eigh.ENVIRONMENT_VARIABLE, "cpu")
    assert eigh.default_solver() == "cpu"
    monkeypatch.setenv(eigh.ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="TOKENCARVE_EIGH"):
        eigh.default_solver()


def routes_here():
    available = ["torch", "cpu"]
    if torch.cuda.is_available():
        available += [name for name in ("nvmath", "cupy") if eigh.installed(name)]
    return available


@pytest.mark.parametrize("solver", routes_here())
def test_every_route_gives_the_same_scores(solver):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 6, 256, generator=generator) * torch.logspace(2, 0, 6).view(1, 6, 1)
    hidden = torch.randn(4, 96, 6, generator=generator) @ directions + torch.randn(4, 96, 256, generator=generator)
    hidden = hidden.to(device)
    u, s, _ = torch.linalg.svd(hidden.double().cpu(), full_matrices=False)
    exact = (u * s.unsqueeze(-2)).abs().sum(-1)
    scores = information_scores(hidden, solver=solver).cpu()
    torch.testing.assert_close(scores, exact, rtol=1e-9, atol=1e-9)
    gram = hidden.double() @ hidden.double().mT
    values, vectors = eigh.gram_eigh(gram, solver)
    torch.testing.assert_close((vectors * values.unsqueeze(-2)) @ vectors.mT, gram, rtol=1e-9, atol=1e-6)


def test_gpu_routes_fall_back_to_torch_off_the_gpu():
    gram = torch.eye(5, dtype=torch.float64).expand(2, 5, 5) * torch.arange(1.0, 6.0, dtype=torch.float64)
    for solver in ("nvmath", "cupy"):
        values, _ = eigh.gram_eigh(gram, solver)
        assert values.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]] * 2
