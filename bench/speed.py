"""The CPU speed tables (docs/speed_cpu.md): images/s and FLOP rate of this package against timm,
in one run.

    python bench/speed.py                 # the defaults: ~10 min on 2 cores
    python bench/speed.py --models deit_tiny_distilled_patch16_224 --batches 32 --train-models
    python bench/speed.py --help          # every option (the fields of `BenchConfig`)

Writes `bench/results/speed_<vendor>.json` and `.md` (`--out`, `--markdown`; the vendor from
`deit.compiler.cpu_vendor`, so each vendor keeps its latest table) and prints the tables.
Run it on a quiet machine (nothing else busy): the reference's OpenMP threads suffer most from
contention.

Every case is set up first (compiled, warmed), then all are timed in rounds, A B A B ...: each
case runs for at least `min_seconds` per round, the order reverses every round, and a case's
rate is the median over rounds. The timm reference (`timm_worker.py`) runs in worker processes
driven from here, one message at a time, so the two sides alternate on the same cores and share
the same noise; an XLA 2048² matmul is one of the cases, which makes "% of the matmul rate" a
ratio of numbers taken side by side.

Cases: inference (`DeiTOutput.logits`, the averaged heads) per model, batch and dtype; the full
distillation training step (`deit.train.make_train_step`: augmentation, student, frozen ResNet
teacher, hard distillation, AdamW, the state donated); the input pipeline (`deit.data.
train_batches` on generated JPEGs), timed alone after the rounds since it is not a side-by-side
comparison. FLOPs count 2 per multiply-add of every matmul and convolution (`matmul_flops`):
inference is `flops_per_image`, a training step 3× the student's forward plus the teacher's.
`speed_report.py` turns the results into the tables and checks the targets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import speed_report
from timm_worker import TorchWorker, max_rss_mb, run_for

from deit.compiler import compiler_options, cpu_isa, cpu_vendor
from deit.model import create_model, flops_per_image, init_params
from deit.variants import IMAGENET_MEAN, IMAGENET_STD, get_spec, resolve_name

RESULTS = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TI, S = "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224"
IMPLS = ("deit", "timm", "timm-compile")


@dataclass(frozen=True)
class BenchConfig:
    """Images/s and FLOP rate against timm, interleaved, one run; the defaults are the
    tables of docs/speed_cpu.md (DeiT-Ti and DeiT-S distilled)."""

    models: tuple[str, ...] = (TI, S)  # variants timed in inference
    batches: tuple[int, ...] = (1, 8, 32, 64)  # inference batch sizes
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # float32 and/or bfloat16
    train_models: tuple[str, ...] = (TI,)  # variants timed in a training step; none: no step
    train_batch: int = 32
    teacher: str = "resnet18"  # ResNet teacher of the training step
    drop_path: float = 0.1
    timm: bool = True  # the reference (eager, and compiled where asked)
    compile_batches: tuple[int, ...] = (32,)  # torch.compile the reference here; none: never
    compile_train: bool = True  # torch.compile the reference's training step too
    compile_timeout: float = 600.0  # seconds per torch.compile'd case
    rounds: int = 5  # interleaved rounds (the median is reported)
    min_seconds: float = 0.5  # per case and round
    matmul_size: int = 2048
    threads: int = 2  # torch.set_num_threads; XLA uses every core it is given
    pipeline_workers: tuple[int, ...] = (0, 2)  # input pipeline runs; none: no pipeline
    pipeline_batches: int = 16
    pipeline_dir: str | None = None  # generated JPEGs (default: a temporary folder)
    seed: int = 0
    torch_device: str = "cpu"  # where the reference runs: cpu, or cuda (bench/gpu.sh)
    out: str = str(RESULTS / f"speed_{cpu_vendor()}.json")  # the results as JSON
    # the tables as markdown; None: not written
    markdown: str | None = str(RESULTS / f"speed_{cpu_vendor()}.md")

    def __post_init__(self) -> None:
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if self.rounds < 1 or self.min_seconds < 0 or min((*self.batches, self.train_batch)) < 1:
            raise ValueError(
                f"rounds {self.rounds}, min_seconds {self.min_seconds}, batches {self.batches}, "
                f"train_batch {self.train_batch}: expected rounds, batches >= 1, seconds >= 0"
            )


@dataclass
class Case:
    """One timed thing; `rate` is images (for the matmul: calls) per second."""

    kind: str  # "infer", "train" or "matmul"
    impl: str  # "deit", "timm", "timm-compile" or "xla"
    model: str
    batch: int
    dtype: str
    flops: float = 0.0  # per image (per call for the matmul)
    info: dict[str, Any] = field(default_factory=dict)
    rates: list[float] = field(default_factory=list)
    run: Callable[[float], tuple[int, float, int]] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.impl}/{self.model}/b{self.batch}/{self.dtype}"

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "run"}
        out["images_per_s"] = self.rate
        out["gflops_per_s"] = None if self.rate is None else self.rate * self.flops / 1e9
        return out


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    """The jaxprs inside an equation's params (pjit, scan, cond, custom_vjp, ...); jax 0.12 dropped
    `jax.core.jaxprs_in_params`."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "eqns"):
                found.append(item)
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                found.append(item.jaxpr)
    return found


def matmul_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs (2 per multiply-add) of every `dot_general` and convolution in `fn(*args)`."""

    def walk(jaxpr: Any) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
                total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in lc]))
            elif name == "conv_general_dilated":
                rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                per_out = int(np.prod([rhs[i] for i in spec[1:]]))
                total += 2 * int(np.prod(out)) * per_out
            for sub in _sub_jaxprs(eqn.params):
                total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _xla_mib(compiled: Any) -> float | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return (total - stats.alias_size_in_bytes) / 2**20


def _compiled_case(case: Case, jitted: Any, args: tuple, after: Callable[[Any], Any]) -> Case:
    """Lower and compile `jitted(*args)` (timed), run it once, then make `case.run` call it.

    `after(outputs)` returns the next call's arguments' replacement state (training feeds its
    donated state back) or None.
    """
    tick = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    case.info["compile_s"] = time.perf_counter() - tick
    case.info["xla_mib"] = _xla_mib(compiled)
    holder = list(args)

    def call() -> int:
        out = compiled(*holder)
        jax.block_until_ready(out)
        state = after(out)
        if state is not None:
            holder[0] = state
        return case.batch

    tick = time.perf_counter()
    call()
    case.info["first_run_s"] = time.perf_counter() - tick
    case.run = lambda min_seconds: run_for(call, min_seconds)
    return case


def inference_program(
    name: str, batch: int, dtype: str, seed: int = 0, options: dict[str, Any] | None = None
) -> tuple[Case, Any, tuple]:
    """(case, jitted, args): the averaged-heads logits of `name` on a float32 `(batch, S, S, 3)`
    batch; `options` are XLA compiler options (default: the package's, `compiler_options`)."""
    model = create_model(name, dtype=DTYPES[dtype])
    params = init_params(model, seed)
    s = get_spec(name).img_size
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, s, s, 3), jnp.float32)
    fn = jax.jit(
        lambda p, x: model.apply({"params": p}, x).logits,
        compiler_options=compiler_options(DTYPES[dtype]) if options is None else options,
    )
    case = Case("infer", "deit", resolve_name(name), batch, dtype, float(flops_per_image(model)))
    return case, fn, (params, x)


def inference_case(name: str, batch: int, dtype: str, seed: int = 0) -> Case:
    """`inference_program`, compiled and run once."""
    case, fn, args = inference_program(name, batch, dtype, seed)
    return _compiled_case(case, fn, args, lambda out: None)


def train_program(
    name: str, batch: int, dtype: str, teacher: str | None = "resnet18", drop_path: float = 0.1,
    seed: int = 0, donate: bool = True, remat: bool = False, teacher_dtype: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Case, Any, tuple]:  # fmt: skip
    """(case, jitted, args): one hard-distillation training step of `name` with a `teacher`
    ResNet at `batch` (None: no teacher, no distillation); the teacher computes in
    `teacher_dtype` (default: the student's `dtype`). `options` as in `inference_program`."""
    from deit.augment import ErasingConfig, MixupConfig
    from deit.losses import LossConfig
    from deit.optim import OptimConfig, create_optimizer
    from deit.teacher import Teacher, create_teacher
    from deit.train_step import StepConfig, init_state, make_train_step

    spec = get_spec(name)
    model = create_model(name, dtype=DTYPES[dtype], drop_path_rate=drop_path, remat=remat)
    s, k = spec.img_size, spec.num_classes
    image = jnp.zeros((1, s, s, 3), jnp.float32)
    t, teacher_flops = None, 0
    if teacher is not None:
        t_model = create_teacher(teacher, k, dtype=DTYPES[teacher_dtype or dtype])
        t_vars = jax.jit(t_model.init)(jax.random.PRNGKey(seed + 1), image)
        t = Teacher.from_resnet(t_model, t_vars, IMAGENET_MEAN, IMAGENET_STD)
        teacher_flops = matmul_flops(lambda v, x: t_model.apply(v, x), t_vars, image)
    tx, schedule = create_optimizer(OptimConfig(), batch, 1000)
    loss = LossConfig("hard" if teacher is not None else "none")
    cfg = StepConfig(k, IMAGENET_MEAN, IMAGENET_STD, MixupConfig(), ErasingConfig(), loss)
    state = init_state(model, tx, cfg, seed, (s, s, 3))
    rng = np.random.default_rng(seed)
    data = {
        "image": jnp.asarray(rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, k, (batch,), dtype=np.int32)),
    }
    step = jax.jit(
        make_train_step(model, tx, schedule, cfg),
        donate_argnums=0 if donate else (),
        compiler_options=compiler_options(DTYPES[dtype]) if options is None else options,
    )
    student = flops_per_image(model)
    case = Case("train", "deit", resolve_name(name), batch, dtype, 3.0 * student + teacher_flops)
    case.info.update(teacher=teacher, teacher_flops=teacher_flops, donate=donate, remat=remat)
    return case, step, (state, data, t)


def train_case(
    name: str, batch: int, dtype: str, teacher: str = "resnet18", drop_path: float = 0.1,
    seed: int = 0, donate: bool = True, remat: bool = False, teacher_dtype: str | None = None,
) -> Case:  # fmt: skip
    """`train_program`, compiled and run once."""
    case, step, args = train_program(
        name, batch, dtype, teacher, drop_path, seed, donate, remat, teacher_dtype
    )
    return _compiled_case(case, step, args, lambda out: out[0])


def matmul_case(n: int = 2048, dtype: str = "float32", seed: int = 0) -> Case:
    """`(n, n) @ (n, n)`; bfloat16 inputs accumulate in float32 (`preferred_element_type`)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(key_a, (n, n), DTYPES[dtype])
    b = jax.random.normal(key_b, (n, n), DTYPES[dtype])
    fn = jax.jit(
        lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
        compiler_options=compiler_options(DTYPES[dtype]),
    )
    case = Case("matmul", "xla", f"{n}x{n}", 1, dtype, 2.0 * n**3)
    return _compiled_case(case, fn, (a, b), lambda out: None)


def _timm_spec(case: Case, cfg: BenchConfig) -> dict[str, Any]:
    spec = get_spec(case.model)
    return {
        "kind": case.kind,
        "model": case.model,
        "batch": case.batch,
        "dtype": case.dtype,
        "compile": case.impl == "timm-compile",
        "img_size": spec.img_size,
        "num_classes": spec.num_classes,
        "teacher": cfg.teacher,
        "drop_path": cfg.drop_path,
        "device": cfg.torch_device,
    }


def _reference_case(worker: TorchWorker, case: Case, cfg: BenchConfig, timeout: float) -> None:
    info = worker.call("setup", case.key, _timm_spec(case, cfg), timeout=timeout)
    case.info.update(info)
    case.run = lambda min_seconds: tuple(worker.call("run", case.key, min_seconds, timeout=600))


def _try(case: Case, setup: Callable[[], Any], log: Callable[[str], None]) -> None:
    """Run `setup`; a failure is recorded on the case (and in the table), not raised."""
    try:
        setup()
    except (RuntimeError, TimeoutError, ValueError, MemoryError) as err:
        case.info["error"] = f"{type(err).__name__}: {err}"
        case.run = None
        log(f"  {case.key}: {case.info['error']}")


def build_cases(
    cfg: BenchConfig, log: Callable[[str], None]
) -> tuple[list[Case], dict[str, TorchWorker]]:
    """Every case of `cfg`, set up (compiled and run once); the torch workers they use."""
    cases: list[Case] = []
    for dtype in cfg.dtypes:
        cases.append(matmul_case(cfg.matmul_size, dtype, cfg.seed))
    plan = [("infer", m, b, d) for m in cfg.models for b in cfg.batches for d in cfg.dtypes]
    plan += [("train", m, cfg.train_batch, d) for m in cfg.train_models for d in cfg.dtypes]
    for kind, model, batch, dtype in plan:
        log(f"deit  {kind} {model} b{batch} {dtype}")
        if kind == "infer":
            cases.append(inference_case(model, batch, dtype, cfg.seed))
        else:
            cases.append(train_case(model, batch, dtype, cfg.teacher, cfg.drop_path, cfg.seed))
    workers: dict[str, TorchWorker] = {}
    refs: list[tuple[str, tuple]] = []
    if cfg.timm:
        refs += [("timm", p) for p in plan]
        compiled = [p for p in plan if p[0] == "infer" and p[2] in cfg.compile_batches]
        compiled += [p for p in plan if p[0] == "train" and cfg.compile_train]
        refs += [("timm-compile", p) for p in compiled]
    for impl, (kind, model, batch, dtype) in refs:
        if impl not in workers:
            workers[impl] = TorchWorker(cfg.threads)
        case = Case(kind, impl, resolve_name(model), batch, dtype, _flops_like(cases, kind, model))
        timeout = cfg.compile_timeout if impl == "timm-compile" else 600.0
        log(f"{impl}  {kind} {model} b{batch} {dtype}")
        _try(case, lambda c=case, w=workers[impl], t=timeout: _reference_case(w, c, cfg, t), log)
        if "error" in case.info and workers[impl].proc.poll() is not None:
            workers[impl] = TorchWorker(cfg.threads)  # a timeout killed it; the next case retries
        cases.append(case)
    return cases, workers


def _flops_like(cases: list[Case], kind: str, model: str) -> float:
    name = resolve_name(model)
    return next(c.flops for c in cases if c.kind == kind and c.model == name)


def measure(
    cases: list[Case], rounds: int, min_seconds: float, log: Callable[[str], None]
) -> list[float]:
    """Time every live case `rounds` times, interleaved, reversing the order every round.

    Returns the 1-minute load average after each round: other work on the machine shows there.
    """
    loads = []
    for r in range(rounds):
        live = [c for c in cases if c.run is not None]
        for case in live if r % 2 == 0 else live[::-1]:
            _try(case, lambda c=case: c.rates.append(_rate(c.run(min_seconds))), log)
        loads.append(os.getloadavg()[0])
        log(f"round {r + 1}/{rounds} done (load average {loads[-1]:.1f})")
    return loads


def _rate(result: tuple[int, float, int]) -> float:
    images, seconds, _ = result
    return images / seconds


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg: BenchConfig) -> dict[str, Any]:
    import flax
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "cpu": _cpu_name(),
        "isa": cpu_isa(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": cfg.threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": {d: compiler_options(t) for d, t in DTYPES.items()},
        "load_average_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# The input pipeline: generated JPEGs through `deit.data.train_batches`, timed alone after the
# side-by-side rounds. The question is whether the host pipeline (decode, random-resized-crop,
# flip, RandAugment at 224) delivers the images/s the training step consumes.


def make_jpeg_folder(root: str | Path, count: int = 64, seed: int = 0) -> list[str]:
    """`count` JPEGs of ImageNet's typical size (500×375 or 375×500, quality 90) under `root`.

    Smooth colour gradients plus noise, so decoding costs about what a photo costs; files that
    already exist are reused.
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = root / f"img_{i:04d}.jpg"
        if not path.exists():
            h, w = (375, 500) if i % 2 == 0 else (500, 375)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            slope = rng.uniform(-0.4, 0.4, (2, 3))
            image = rng.uniform(0, 255, 3) + np.stack([yy, xx], -1) @ slope
            image += rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def measure_pipeline(
    paths: list[str], workers: int, batch: int, batches: int, img_size: int = 224
) -> dict[str, Any]:
    """Images/s of `deit.data.train_batches` (decode, random-resized-crop, flip, RandAugment
    `rand-m9-mstd0.5-inc1`, batching) over `paths`, `batches` batches of `batch`.

    Timed from the iterator's creation, so worker start-up counts against the rate: grain
    prefetches ahead (threads even with 0 workers), which makes "after the first batch" a
    measure of its buffer rather than of the pipeline.
    """
    from deit.data import DataConfig, Source, train_batches

    n = batch * batches
    files = [paths[i % len(paths)] for i in range(n)]
    source = Source(files, np.zeros(n, np.int32), ["0"])
    cfg = DataConfig(dataset="bench", img_size=img_size, workers=workers, repeats=1)
    tick = time.perf_counter()
    it = train_batches(source, cfg, seed=0, global_batch=batch)
    next(it)
    first = time.perf_counter() - tick
    count = batch + sum(len(b["label"]) for b in it)
    seconds = time.perf_counter() - tick
    del it
    return {
        "workers": workers,
        "batch": batch,
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "img_size": img_size,
        "first_batch_s": first,
    }


# ---------------------------------------------------------------------------------------------
# The whole run


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Set up every case, time them interleaved, then time the input pipeline; the results as a
    JSON-ready dict (see `speed_report.markdown` for the table)."""
    tick, env = time.perf_counter(), environment(cfg)
    cases, workers = build_cases(cfg, log)
    try:
        loads = measure(cases, cfg.rounds, cfg.min_seconds, log)
        processes, versions = {"deit": max_rss_mb()}, {}
        for impl, worker in workers.items():
            try:
                stats = worker.call("stats", timeout=60)
                processes[impl] = stats.pop("max_rss_mb")
                versions.update(stats)
            except (RuntimeError, TimeoutError) as err:
                log(f"{impl} worker: {err}")
    finally:
        for worker in workers.values():
            worker.close()
    pipeline = []
    if cfg.pipeline_workers:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_jpeg_folder(cfg.pipeline_dir or tmp)
            size = get_spec(cfg.train_models[0]).img_size if cfg.train_models else 224
            for w in cfg.pipeline_workers:
                log(f"input pipeline, {w} workers")
                pipeline.append(
                    measure_pipeline(paths, w, cfg.train_batch, cfg.pipeline_batches, size)
                )
    return {
        "config": dataclasses.asdict(cfg),
        "environment": env | versions,
        "cases": [c.to_json() for c in cases],
        "pipeline": pipeline,
        "max_rss_mib": processes,
        "load_average_per_round": loads,
        "seconds": time.perf_counter() - tick,
    }


def missing_reference(cfg: BenchConfig) -> str | None:
    """Why the timm reference cannot run (torch or timm not installed), or None."""
    if not cfg.timm:
        return None
    absent = [name for name in ("torch", "timm") if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return (
        f"bench/speed.py: the timm reference needs {' and '.join(absent)}, which are not "
        'installed; install the test extra (pip install -e ".[test]") or run without it '
        "(--no-timm)"
    )


def main(cfg: BenchConfig) -> dict[str, Any]:
    """`run_bench`, then the tables and targets printed and written to `cfg.out` (JSON) and
    `cfg.markdown`; progress goes to stderr. Without torch/timm (and `timm` on) one line on
    stderr names the extra to install, and the exit status is 2."""
    problem = missing_reference(cfg)
    if problem:
        print(problem, file=sys.stderr)
        raise SystemExit(2)
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    result["command"] = shlex.join(["python", "bench/speed.py", *sys.argv[1:]])
    result["targets"] = speed_report.targets(result)
    text = speed_report.report(result)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(result, indent=2))
    if cfg.markdown:
        Path(cfg.markdown).write_text(text + "\n")
    print(text)
    print(f"results: {Path(cfg.out).absolute()}")
    return result


if __name__ == "__main__":
    import tyro

    main(tyro.cli(BenchConfig))
