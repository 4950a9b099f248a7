"""The config tree's backend-dependent default: the compute dtype."""

import dataclasses

from deit import configs


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_elsewhere():
    cfg = configs.imagenet()
    assert cfg.model.dtype == "auto"
    assert configs.resolve_dtype(cfg, "gpu").model.dtype == "bfloat16"
    assert configs.resolve_dtype(cfg, "cpu").model.dtype == "float32"
    chosen = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    assert configs.resolve_dtype(chosen, "gpu").model.dtype == "float32"
    assert configs.resolve_dtype(cfg, "gpu").optim == cfg.optim
