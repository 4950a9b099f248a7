"""bench/speed.py: a tiny run without the timm reference (the structure of what it returns), its
command line, and the report of a result."""

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import deit
from deit.compiler import cpu_vendor
from deit.teacher import create_teacher

TINY = "deit_test_distilled_patch4_32"
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    """`(speed, speed_report)` from bench/, which is a folder of scripts, not a package: it is on
    `sys.path` only while they are imported (its `data.py` must not shadow anything later)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("speed"), importlib.import_module("speed_report")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench(bench_modules):
    return bench_modules[0]


@pytest.fixture(scope="module")
def bench_report(bench_modules):
    return bench_modules[1]


def test_matmul_flops_counts_the_model_formula(bench):
    model = deit.create_model(TINY)
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert bench.matmul_flops(lambda p, x: model.apply(p, x), params, x) == deit.flops_per_image(
        model
    )
    # A convolution: 2 * output elements * kernel taps * input channels.
    conv = bench.matmul_flops(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID"),
        jnp.zeros((1, 3, 8, 8)),
        jnp.zeros((4, 3, 3, 3)),
    )
    assert conv == 2 * (4 * 6 * 6) * (3 * 3 * 3)


def test_teacher_flops_scale_with_batch_and_pixels(bench):
    teacher = create_teacher("resnet8", 10)

    def flops(batch: int, size: int) -> int:
        x = jnp.zeros((batch, size, size, 3))
        variables = jax.eval_shape(teacher.init, jax.random.PRNGKey(0), x)
        return bench.matmul_flops(lambda v, x: teacher.apply(v, x), variables, x)

    one = flops(1, 32)
    # The stem alone: a 3x3 conv from 3 to 16 channels over 32x32 outputs.
    assert one > 2 * 32 * 32 * 16 * 3 * 3 * 3
    assert flops(3, 32) == 3 * one
    # Convolutions scale with the pixels; the head (a pooled Dense) does not.
    head = 2 * teacher.num_filters * 2 ** (len(teacher.stage_sizes) - 1) * 10
    assert flops(1, 64) - head == pytest.approx(4 * (one - head), rel=1e-6)


def test_config_rejects_bad_values(bench):
    with pytest.raises(ValueError, match="dtype"):
        bench.BenchConfig(dtypes=("float16",))
    with pytest.raises(ValueError, match="rounds"):
        bench.BenchConfig(rounds=0)


def test_command_line_fills_the_config(bench):
    import tyro

    args = ["--models", TINY, "--batches", "2", "4", "--dtypes", "float32", "--train-models"]
    args += ["--no-timm", "--compile-batches", "--rounds", "2", "--markdown", "None"]
    cfg = tyro.cli(bench.BenchConfig, args=args)
    assert cfg.models == (TINY,) and cfg.batches == (2, 4) and cfg.dtypes == ("float32",)
    assert cfg.train_models == () and cfg.compile_batches == () and not cfg.timm
    assert cfg.rounds == 2 and cfg.markdown is None
    assert cfg.out == str(BENCH / "results" / f"speed_{cpu_vendor()}.json")  # README table
    assert tyro.cli(bench.BenchConfig, args=[]) == bench.BenchConfig()


@pytest.mark.slow
def test_tiny_run_structure(tmp_path, capsys, bench, bench_report):
    cfg = bench.BenchConfig(
        models=(TINY,),
        batches=(2,),
        dtypes=("float32",),
        train_models=(TINY,),
        train_batch=2,
        teacher="resnet8",
        timm=False,
        rounds=2,
        min_seconds=0.0,
        matmul_size=64,
        pipeline_workers=(0,),
        pipeline_batches=1,
        pipeline_dir=str(tmp_path / "jpegs"),
        out=str(tmp_path / "speed.json"),
        markdown=str(tmp_path / "speed.md"),
    )
    result = bench.main(cfg)
    out, err = capsys.readouterr()
    assert "round 2/2 done" in err and "| target |" in out
    assert json.loads((tmp_path / "speed.json").read_text())["cases"] == result["cases"]
    assert "`python bench/speed.py" in (tmp_path / "speed.md").read_text()
    json.dumps(result)  # JSON-ready
    kinds = {(c["kind"], c["impl"]) for c in result["cases"]}
    assert kinds == {("matmul", "xla"), ("infer", "deit"), ("train", "deit")}
    for case in result["cases"]:
        assert len(case["rates"]) == 2
        assert case["images_per_s"] > 0 and case["gflops_per_s"] > 0
        assert case["info"]["compile_s"] > 0
    train = next(c for c in result["cases"] if c["kind"] == "train")
    infer = next(c for c in result["cases"] if c["kind"] == "infer")
    assert train["flops"] == 3 * infer["flops"] + train["info"]["teacher_flops"]
    (pipe,) = result["pipeline"]
    assert pipe["workers"] == 0 and pipe["images"] == 2 and pipe["img_size"] == 32
    assert result["max_rss_mib"]["deit"] > 0

    table = bench_report.markdown(result)
    assert table.count("\n") == 3  # header, rule, inference row, train row
    assert "DeiT-test⚗" in table and "—" in table  # no timm column values
    checks = bench_report.targets(result)
    names = [c["target"] for c in checks]
    assert "train DeiT-test⚗ b2 fp32 vs timm fp32" in names
    assert all(set(c) == {"target", "value", "goal", "unit", "met", "ceiling"} for c in checks)
    assert "| target |" in bench_report.format_targets(checks)
    assert "matmul rate" in bench_report.notes(result)


def test_short_names(bench_report):
    assert bench_report.short_name("deit_tiny_distilled_patch16_224") == "DeiT-Ti⚗"
    assert bench_report.short_name("deit_small_patch16_224") == "DeiT-S"


def test_ceiling_is_the_ratio_at_the_matmul_rate(bench_report):
    """deit at 150 of a 300 GFLOP/s matmul and 0.8x timm could reach at most 1.6x timm."""

    def case(kind, impl, rate, gflops=None, model="deit_small_distilled_patch16_224"):
        info = {"compile_s": 1.0, "xla_mib": 1.0}
        return {"kind": kind, "impl": impl, "model": model, "batch": 32, "dtype": "float32"} | {
            "images_per_s": rate, "gflops_per_s": gflops, "info": info
        }  # fmt: skip

    result = {
        "cases": [
            case("matmul", "xla", 1.0, 300.0, model="2048x2048"),
            case("infer", "deit", 20.0, 150.0),
            case("infer", "timm", 25.0),
        ],
        "pipeline": [],
    }
    (row,) = bench_report.rows(result)
    assert row["vs_timm"] == pytest.approx(0.8) and row["matmul_pct"] == pytest.approx(50)
    assert row["ceiling"] == pytest.approx(1.6)
    checks = {c["target"]: c for c in bench_report.targets(result)}
    assert checks["fp32 DeiT-S⚗ b32 vs timm fp32"]["ceiling"] == pytest.approx(1.6)
    assert checks["fp32 DeiT-S⚗ b32 % of matmul"]["ceiling"] is None
    assert "| no | 1.60× |" in bench_report.format_targets(list(checks.values()))


def test_without_torch_it_names_the_extra_to_install(monkeypatch, capsys, bench):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(
        bench.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    with pytest.raises(SystemExit) as stop:
        bench.main(bench.BenchConfig())
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs torch" in err and 'pip install -e ".[test]"' in err
    assert bench.missing_reference(bench.BenchConfig(timm=False)) is None


def test_gpu_report_ratios_and_the_async_timer():
    """bench/gpu.py's page from fixed results: the ratios against timm and the matmul share; and
    `run_async` waits once per batch of calls, growing it until it lasts `min_seconds`."""
    sys.path.insert(0, str(BENCH))
    try:
        gpu, timm_worker = importlib.import_module("gpu"), importlib.import_module("timm_worker")
    finally:
        sys.path.remove(str(BENCH))
    case = lambda impl, rate, lever=None, kind="infer", model=gpu.S: {
        "kind": kind, "impl": impl, "model": model, "batch": 256, "dtype": "bfloat16",
        "flops": 1e9, "info": {"compile_s": 3.0}, "images_per_s": rate,
        "gflops_per_s": rate, "lever": lever or impl, "error": None,
    }  # fmt: skip
    matmul = case("xla", 1.0, kind="matmul", model="8192x8192") | {"gflops_per_s": 400_000.0}
    table = {
        "plan": {"rounds": 3},
        "cases": [matmul, case("deit", 40_000.0), case("timm", 20_000.0),
                  case("timm-compile", 32_000.0), case("deit", 30_000.0, "before")],
    }  # fmt: skip
    page = gpu.report({"table": table})
    assert "| inference DeiT-S⚗ b256 | 40,000 | 20,000 | 32,000 | 2.00× | 1.25× | 10.0% |" in page
    assert "| infer DeiT-S⚗ b256 | before | 30,000 | 0.75× | 3.0 |" in page
    clock = {"calls": 0, "syncs": 0}

    def call() -> int:
        clock["calls"] += 1
        return 2

    images, _seconds, calls = timm_worker.run_async(call, lambda: clock.update(
        syncs=clock["syncs"] + 1), 0.0)  # fmt: skip
    assert (images, calls) == (2, 1) and clock == {"calls": 2, "syncs": 2}


def test_host_stages_table_and_old_against_new(tmp_path):
    """bench/host_stages.py at its smallest: every stage and case has a positive time, the
    report names the CPU, and the process's cores are given back."""
    spec = importlib.util.spec_from_file_location("host_stages", BENCH / "host_stages.py")
    host_stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host_stages)
    cores = os.sched_getaffinity(0)
    args = ["--images", "4", "--rounds", "1", "--large", "1.5", "--out", str(tmp_path)]
    assert host_stages.main(args) == 0
    assert os.sched_getaffinity(0) == cores
    (report,) = [json.loads(p.read_text()) for p in tmp_path.glob("host_stages_*.json")]
    (page,) = tmp_path.glob("host_stages_*.md")
    assert report["machine"]["cpu"] in page.read_text()
    stages = {r["stage"] for r in report["stages"]}
    assert {"file read", "RandAugment (on PIL)", "ShearX"} <= stages
    assert all(r["ms"] > 0 for r in report["stages"] if "IPC" not in r["stage"])
    cases = report["end_to_end"] + report["pipeline"]
    assert len(cases) >= 2 * 3 + 2 and all(r["img_s"] > 0 for r in cases)
    assert cases[0]["case"].startswith("old path") and cases[0]["x_old"] == 1.0
