"""DeiT-Ti at full size against timm: logits at other input sizes (`dynamic_img_size=True`),
`forward_features`, pre-logits and `forward_intermediates`, as max |Δ| rows for docs/parity.md.

    python bench/features_parity.py          # ~30 s of one core; needs torch and timm

timm's `deit_tiny_distilled_patch16_224` and `deit_tiny_patch16_224` are built with random
weights (`pretrained=False`, every tensor perturbed by N(0, 0.02²) so each carries signal),
converted with `deit.convert.from_torch`, and run on the same batch of 2 random images, float32.
"""

from __future__ import annotations

import jax
import numpy as np
import timm
import torch

import deit
from deit import convert
from deit.features import forward_features, forward_intermediates, pre_logits

SIZES = [(224, 224), (160, 160), (288, 384)]


def main() -> None:
    for name in ("deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"):
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.02 * torch.randn(p.shape))
        model = deit.create_model(name, dynamic_img_size=True)
        sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
        variables = {"params": convert.from_torch(sd, model)}
        logits = deit.jit(lambda v, x, m=model: m.apply(v, x).logits)
        for h, w in SIZES:
            x = np.random.default_rng(h + w).normal(size=(2, 3, h, w)).astype(np.float32)
            xt, xj = torch.from_numpy(x), x.transpose(0, 2, 3, 1)
            with torch.no_grad():
                want = ref(xt).numpy()
                tokens = ref.forward_features(xt)
                pre = ref.forward_head(tokens, pre_logits=True).numpy()
                maps = ref.forward_intermediates(xt, indices=[3, -1], norm=True)[1]
            got = {
                "logits": (np.asarray(logits(variables, xj)), want),
                "forward_features": (forward_features(model, variables, xj), tokens.numpy()),
                "pre-logits": (pre_logits(model, variables, xj), pre),
                "intermediates [3, -1], norm, NCHW": (
                    np.stack(forward_intermediates(model, variables, xj, [3, -1], norm=True)[1]),
                    np.stack([m.numpy() for m in maps]),
                ),
            }
            row = " | ".join(
                f"{float(np.abs(np.asarray(a) - b).max()):.2e}" for a, b in got.values()
            )
            print(f"| {name} | {h}x{w} | {row} |")
    print(f"(columns: {', '.join(got)}; jax {jax.__version__}, timm {timm.__version__})")


if __name__ == "__main__":
    main()
