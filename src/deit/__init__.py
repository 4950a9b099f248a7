"""DeiT — Data-efficient Image Transformers with the distillation token, in JAX/Flax."""

from deit.model import (
    DeiT,
    DeiTOutput,
    create_model,
    deit_forward,
    flops_per_image,
    forward_with_attention,
    init_params,
    param_count,
    resample_pos_embed,
)
from deit.variants import VARIANTS, ModelSpec, get_spec


def list_models() -> list[str]:
    """All registered variant names (timm's names and the tiny test variants)."""
    return list(VARIANTS)


__all__ = [
    "VARIANTS",
    "DeiT",
    "DeiTOutput",
    "ModelSpec",
    "create_model",
    "deit_forward",
    "flops_per_image",
    "forward_with_attention",
    "get_spec",
    "init_params",
    "list_models",
    "param_count",
    "resample_pos_embed",
]
__version__ = "0.1.0"
