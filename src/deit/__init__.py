"""DeiT — Data-efficient Image Transformers with the distillation token, in JAX/Flax.

The names below load on first use (PEP 562), so `import deit.data` in a grain worker process
does not pay for importing JAX and Flax.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

_EXPORTS = {
    "DeiT": "deit.model",
    "DeiTOutput": "deit.model",
    # With `pretrained=True` it needs the weights layer, which sits above the network's.
    "create_model": "deit.pretrained",
    "deit_forward": "deit.model",
    "flops_per_image": "deit.model",
    "forward_features": "deit.features",
    "forward_head": "deit.features",
    "forward_intermediates": "deit.features",
    "pre_logits": "deit.features",
    "forward_with_attention": "deit.model",
    "init_params": "deit.model",
    "param_count": "deit.model",
    "resample_pos_embed": "deit.model",
    "VARIANTS": "deit.variants",
    "ModelSpec": "deit.variants",
    "get_spec": "deit.variants",
    "load_pretrained": "deit.pretrained",
    "load_teacher": "deit.teacher_source",
    "jit": "deit.compiler",
    "PRETRAINED": "deit.pretrained",
}
_SUBMODULES = (
    "convert",
    "data",
    "evaluate",
    "export",
    "features",
    "train",
    "run",
    "visualize",
    "parallel",
    "pretrained",
    "recipes",
    "teacher",
)


def list_models() -> list[str]:
    """All registered variant names (timm's names and the tiny test variants)."""
    from deit.variants import VARIANTS

    return list(VARIANTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"deit.{name}") is not None:  # deit.model, deit.data, ...
        return importlib.import_module(f"deit.{name}")
    raise AttributeError(f"module 'deit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, *_SUBMODULES, "list_models", "__version__"])


__all__ = [*_EXPORTS, "list_models"]
__version__ = "0.1.0"
