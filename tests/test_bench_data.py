"""bench/data.py's parts at their smallest: a case in a fresh interpreter (`data_cases`), the
steady-state summary (`data_measure`) and its markdown (`data_report`), without a pipeline."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def parts():
    """`(data_cases, data_measure, data_report)`; bench/ is on `sys.path` only while they are
    imported (its `data.py` must not shadow anything later)."""
    sys.path.insert(0, str(BENCH))
    try:
        return tuple(
            importlib.import_module(n) for n in ("data_cases", "data_measure", "data_report")
        )
    finally:
        sys.path.remove(str(BENCH))


def test_a_case_runs_in_a_fresh_interpreter_and_reports_its_marks(parts, tmp_path):
    cases = parts[0]
    for split, per_class in (("train", 3), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                (tmp_path / split / name / f"{i}.JPEG").write_bytes(b"")
    r = cases.run_case(cases.SCAN, {"dataset": str(tmp_path)}, src=None, cwd=tmp_path, timeout=60)
    assert "error" not in r and r["files"] == 8
    assert r["marks"]["scan"] <= r["marks"]["first_batch"] and r["process_s"] > 0
    failed = cases.run_case("raise KeyError('x')", {}, src=None, cwd=tmp_path, timeout=60)
    assert failed["error"] == "KeyError: 'x'"


def _run(name, workers, rate, late, rnd=0):
    return {
        "pipeline": name,
        "workers": workers,
        "round": rnd,
        "marks": {"first_batch": 1.0 + rnd},
        "images_per_s": rate,
        "late_images_per_s": late,
        "window_busy_cores": 1.0,
        "batch": [[4, 32, 32, 3], "uint8"],
    }


def test_throughput_summary_takes_medians_flags_a_draining_buffer_and_rates_against_timm(parts):
    _, measure, report = parts
    raw = [
        _run("ours (folder)", 0, 100.0, 100.0),
        _run("ours (folder)", 0, 300.0, 100.0, rnd=1),  # median 200 > 1.15 x 100: buffered
        _run("timm", 0, 50.0, 50.0),
        {"pipeline": "timm", "workers": 0, "round": 1, "error": "boom"},
    ]
    args = argparse.Namespace(workers=[0])
    ours, timm = measure._throughput_summary(raw, ["ours (folder)", "timm"], args)
    assert (ours["images_per_s"], ours["late_images_per_s"], ours["buffered"]) == (200, 100, True)
    assert ours["first_batch_s"] == 1.5 and ours["vs_timm"] == 100 / 50
    assert (timm["runs"], timm["error"], timm["vs_timm"]) == (1, "boom", None)
    cfg = {"before": "x", "after": "y", "rounds": 2, "img_size": 32, "batch": 4, "warmup": 1}
    cfg["batches"] = 2
    machine = {"cpu": "CPU-X", "usable_cores": 1, "cpu_count": 2, "python": "3"}
    machine["versions"] = dict.fromkeys(
        ("numpy", "pillow", "grain", "torch", "torchvision", "timm")
    )
    text = report.markdown(
        {
            "machine": machine,
            "config": cfg,
            "folders": {},
            "throughput_size": "20",
            "throughput": {"pack": None, "raw": raw, "summary": [ours, timm]},
        }
    )
    assert "| ours (folder) | 0 | 1.50 | 200 † (100) | 100 | 1.0 | 2.00× | — |" in text
    assert "CPU: CPU-X" in text and "- timm: boom" in text
