"""The method registry (tokencarve.methods): each method's stated properties are what it does, and
the lists the library, the engine and the docs show are the registry's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokencarve
from tokencarve import engine, methods
from tokencarve.eval import report

ROOT = Path(__file__).resolve().parent.parent
N = 576  # a 24 x 24 grid, as LLaVA-1.5's


def _inputs(tokens=N, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, tokens, 32, generator=generator), torch.rand(2, tokens, generator=generator).softmax(-1)


@pytest.mark.parametrize("name", methods.METHODS)
def test_each_methods_properties_are_what_it_does(name):
    method = methods.REGISTRY[name]
    hidden, attention = _inputs()
    result = methods.reduce_tokens(hidden, attention, 48, method=name)
    assert result.index.shape == (2, 48)
    assert bool(result.merged.any()) == method.merges
    _, other_attention = _inputs(seed=1)
    moved = methods.reduce_tokens(hidden, other_attention, 48, method=name)
    assert torch.equal(moved.index, result.index) == (not method.needs_attention)
    not_square = hidden[:, : N - 1], attention[:, : N - 1]
    if method.needs_grid:  # N - 1 tokens are no square: only each token's place says where it is
        with pytest.raises(ValueError, match="square grid"):
            methods.reduce_tokens(*not_square, 48, method=name)
        index = torch.arange(N - 1)
        places = torch.stack([index // 25, index % 25], -1).expand(2, -1, -1)  # a 23 x 25 grid
        assert methods.reduce_tokens(*not_square, 48, method=name, grid=places).index.shape == (2, 48)
    else:
        assert methods.reduce_tokens(*not_square, 48, method=name).index.shape == (2, 48)


def test_every_method_has_one_kind_and_every_list_comes_from_the_registry():
    by_kind = [name for kind in methods.KINDS for name in methods.names(kind)]
    assert sorted(by_kind) == sorted(methods.METHODS) and len(set(by_kind)) == len(by_kind)
    assert tokencarve.METHODS == methods.METHODS
    assert engine.METHODS == ("none", *methods.METHODS)
    assert dict(engine.EngineConfig.__dataclass_fields__["method"].metadata)["choices"] == engine.METHODS
    assert report.REFERENCE_METHODS == methods.names("paper") + methods.names("baseline")
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        methods.get("magic")


def test_the_readme_shows_the_registrys_table():
    readme = (ROOT / "README.md").read_text()
    assert methods.markdown_table() in readme, "paste tokencarve.methods.markdown_table() into README.md:\n" + (
        methods.markdown_table()
    )
