"""A few training steps of a small DeiT on digits, run in its own process by `test_parallel.py`
(the device count must be fixed before JAX starts). Writes the run folder given as --output.

    python tests/parallel_worker.py --devices 4 --output DIR [--fsdp] [--dtype bfloat16]
        [--distillation soft|hard] [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I]
"""

import argparse
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--distillation", default="none", choices=("none", "soft", "hard"))
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    args = p.parse_args()
    devices = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {devices}"

    import dataclasses

    from deit import configs, data, parallel, recipes
    from deit.losses import LossConfig
    from deit.model import create_model
    from deit.optim import EmaConfig, OptimConfig
    from deit.train import fit

    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    train_src, val_src = data.digits()
    n = args.steps * args.batch
    subset = data.Source(train_src.images[:n], train_src.labels[:n], train_src.classes)
    val = data.Source(val_src.images[:40], val_src.labels[:40], val_src.classes)
    base = recipes.digits()
    cfg = dataclasses.replace(
        base,
        batch_size=args.batch,
        output=args.output,
        loss=LossConfig(distillation=args.distillation),
        parallel=configs.ParallelConfig(fsdp=args.fsdp),
        model=dataclasses.replace(base.model, dtype=args.dtype),
        data=dataclasses.replace(base.data, img_size=16),
        optim=OptimConfig(lr=3e-3, warmup_epochs=0, epochs=1),
        ema=EmaConfig(enabled=False),
        log_every=1,
    )
    # Wide enough that FSDP has arrays above its size threshold to split.
    model = create_model(
        "deit_test_distilled_patch4_32",
        img_size=16,
        embed_dim=128,
        mlp_dim=512,
        num_heads=4,
        drop_path_rate=0.1,
        dtype=args.dtype,
    )
    teacher = None
    if args.distillation != "none":
        # A fixed random ResNet-8: every process builds the same one, on its own devices.
        import jax
        import jax.numpy as jnp

        from deit.teacher import Teacher, create_teacher

        net = create_teacher("resnet8", 10, small_input=True)
        # Jitted: an eager init compiles each initializer per shape (~10 s of a run).
        variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(
            jax.random.PRNGKey(7)
        )
        teacher = Teacher.from_resnet(net, variables, base.data.mean, base.data.std, 16)
    fit(model, cfg, subset, val, teacher=teacher)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
