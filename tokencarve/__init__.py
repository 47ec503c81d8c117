"""TokenCarve: training-free visual-token compression for LLaVA-style and Qwen-VL models (arXiv 2503.10501).

import tokencarve
model = tokencarve.apply(model, tokencarve.CarveConfig(keep=128))   # in place
model.generate(**inputs)                                            # prefill carves 576 -> 128 per image
model.tokencarve.last_stats                                         # tokens and KV bytes kept
tokencarve.remove(model)                                            # stock model again
"""

from .adapter import CarveConfig, CarveStats, ImageCarve, TokenCarver
from .budgets import Adaptive, parse_budget
from .core import CarveResult, carve_tokens, information_scores, stage_sizes
from .families import (
    FAMILIES,
    Family,
    family_for_config,
    family_of,
    max_image_tokens,
    max_tokens_per_image,
    tokens_per_image,
)
from .loading import load_llava, load_processor
from .methods import METHODS, Method, reduce_tokens

__all__ = [
    "FAMILIES",
    "METHODS",
    "Adaptive",
    "CarveConfig",
    "CarveResult",
    "CarveStats",
    "Family",
    "ImageCarve",
    "Method",
    "TokenCarver",
    "apply",
    "carve_tokens",
    "family_for_config",
    "family_of",
    "information_scores",
    "is_applied",
    "load_llava",
    "load_processor",
    "max_image_tokens",
    "parse_budget",
    "max_tokens_per_image",
    "reduce_tokens",
    "remove",
    "stage_sizes",
    "tokens_per_image",
]


def apply(model, config: CarveConfig | None = None):
    """Make `model` (a Llava-, LlavaNext-, LlavaOnevision-, Qwen2VL-, Qwen2_5_VL- or
    Qwen3VLForConditionalGeneration) carve its visual tokens; returns the model.

    The model is changed in place (hooks only, no weights touched); `model.tokencarve` is the
    `TokenCarver` holding the config and the figures of the last forward (`last_stats`).
    """
    if is_applied(model):
        raise ValueError("TokenCarve is already applied to this model; call tokencarve.remove(model) first")
    model.tokencarve = TokenCarver(model, config or CarveConfig())
    return model


def remove(model):
    """Undo `apply`: the model behaves exactly like the stock one again; returns the model."""
    if not is_applied(model):
        raise ValueError("TokenCarve is not applied to this model")
    model.tokencarve.remove()
    del model.tokencarve
    return model


def is_applied(model) -> bool:
    return isinstance(getattr(model, "tokencarve", None), TokenCarver)
