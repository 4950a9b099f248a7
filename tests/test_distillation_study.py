"""bench/distillation_study.py without training: which runs it starts, that a rerun skips the
finished ones and resumes a stopped one, and the report it writes."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def study_module(bench_module):
    return bench_module("distillation_study")


def fake_runs(module, monkeypatch):
    """Teachers and students that only write what a finished one leaves; the calls made."""
    calls = []

    def train_teacher(cfg, cell):
        calls.append(("teacher", cfg.data.label_fraction, cfg.seed, False))
        (cell / "teacher" / "final").mkdir(parents=True)
        (cell / "teacher" / "final" / "config.json").write_text("{}")

    def train_and_evaluate(cfg, resume=False):
        kind = cfg.loss.distillation
        calls.append((kind, cfg.data.label_fraction, cfg.seed, resume))
        assert cfg.data.subset_seed == cfg.seed and cfg.data.subset_repeats == round(
            1 / cfg.data.label_fraction
        )
        if kind != "none":  # the cell's own teacher, shared by soft and hard
            assert Path(cfg.teacher.path) == Path(cfg.output).parent / "teacher"
        top1 = {"none": 80.0, "soft": 82.0, "hard": 81.0}[kind] + cfg.seed
        summary = {"val": {h: {"top1": top1} for h in ("cls", "dist", "avg")}}
        if kind != "none":
            summary["teacher"] = {"top1": 90.0}
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "results.json").write_text(json.dumps(summary))
        return summary

    tokens = {"input": 0.1, "layers": [0.5, 0.9], "output": 0.95, "heads": 0.2, "agreement": 97}
    monkeypatch.setattr(module, "train_teacher", train_teacher)
    monkeypatch.setattr(module, "train_and_evaluate", train_and_evaluate)
    monkeypatch.setattr(module, "token_story", lambda folder, images: tokens)
    return calls


def test_a_rerun_skips_finished_runs_and_resumes_a_stopped_one(study_module, tmp_path, monkeypatch):
    calls = fake_runs(study_module, monkeypatch)
    study = study_module.Study(
        fractions=(0.5, 1.0), seeds=(0, 1), out=str(tmp_path / "runs"), results=str(tmp_path)
    )
    study_module.main(study)
    assert len(calls) == 2 * 2 * 4  # per fraction and seed: the teacher, hard, soft, none
    assert calls[:4] == [(kind, 0.5, 0, False) for kind in ("teacher", "hard", "soft", "none")]
    calls.clear()
    study_module.main(study)
    assert calls == []  # everything finished: nothing runs again
    stopped = tmp_path / "runs" / "f1.00" / "seed1" / "soft"
    (stopped / "results.json").unlink()
    (stopped / "checkpoints" / "40").mkdir(parents=True)  # a checkpoint of a stopped run
    study_module.main(study)
    assert calls == [("soft", 1.0, 1, True)]

    table = (tmp_path / "distillation_study.md").read_text()
    # soft − none is +2 on both seeds: a zero-width interval, beyond noise.
    assert "| 50% (718 of 1,437) | 90.00 ± 0.00 | 80.50 ± 0.71 |" in table
    assert "+2.00 [+2.00, +2.00] *" in table and "+1.00 [+1.00, +1.00] *" in table
    assert "| 100% | soft | 0.10 | 0.50 | 0.90 | 0.95 | 0.20 | 97.0 |" in table
    runs = json.loads((tmp_path / "distillation_study.json").read_text())["runs"]
    assert len(runs) == 12 and (tmp_path / "distillation_study.png").stat().st_size > 0


def test_quick_is_a_small_study_of_its_own(study_module):
    quick = study_module.Study(quick=True).sized()
    assert quick.out.endswith("-quick") and len(quick.seeds) >= 2 and quick.epochs <= 2
