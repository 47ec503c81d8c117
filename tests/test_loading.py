"""load_llava: the one place the evaluation CLI and the pipeline engine resolve device and dtype."""

import pytest
import torch

from tokencarve import load_llava
from tokencarve.loading import resolve_dtype


def test_auto_loads_float32_on_this_cpu_with_left_padding(tiny_model_dir):
    model, processor = load_llava(str(tiny_model_dir))
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert not model.training
    assert processor.tokenizer.padding_side == "left"


def test_an_explicit_dtype_is_honoured(tiny_model_dir):
    model, _ = load_llava(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_auto_means_bfloat16_on_a_gpu_and_an_unknown_dtype_is_a_clear_error():
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="float8.*auto, bfloat16, float16, float32"):
        resolve_dtype("float8", "cpu")
