"""Test set-up. JAX must see its device count before its backend starts, so this runs first."""

import os
import shutil
import tempfile

# Two fake CPU devices: every training test then exercises the sharded batch path. The suite
# compiles hundreds of small programs and runs each a few steps: without LLVM's optimisation
# passes XLA compiles them in about half the time. Their results differ from fully optimised
# programs by float rounding only (1e-6 on DeiT-Ti's logits of ~1), inside every parity
# tolerance; every bit-for-bit check compares runs under these same flags (subprocesses get them:
# `runs.xla_flags`), and speed is measured by bench/, at full optimisation, never by a test.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
)
# `deit train` keeps compiled programs in $DEIT_HOME/jax-cache by default; not in tests, which
# share one cache for the whole test run instead: every test process and every `deit train` it
# starts loads a program another one compiled (the suite compiles the same tiny models many
# times over). It is made by the first process (pytest's own, before it starts its workers) and
# removed when that one ends. The uninterrupted reference runs of tests/runs.py share it too: a
# resumed run that traced another program compiles it under another key, so their bit-for-bit
# checks still see it.
os.environ.setdefault("DEIT_COMPILE_CACHE", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deit-tests-jax-cache-")
    os.environ["DEIT_TESTS_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


import pytest
from runs import compile_cache, reference  # noqa: F401 -- fixtures of the end-to-end runs


@pytest.fixture(autouse=True, scope="session")
def _deit_home(tmp_path_factory):
    """Folder indexes (and anything else cached) go to a fresh folder, never ~/.cache/deit."""
    os.environ["DEIT_HOME"] = str(tmp_path_factory.mktemp("deit_home"))


@pytest.fixture
def deit_home(tmp_path, monkeypatch):
    """A per-test DEIT_HOME, for tests that count or break what is cached there. Folders these
    tests write are seconds old at most, so the index's 2 s "racily clean" margin is off here
    (tests/test_data_index.py checks it on its own)."""
    monkeypatch.setenv("DEIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("deit.data.index.RACY_MARGIN_NS", 0)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def bench_module():
    """`bench_module("study_stats")`: a script of bench/ imported as a module (the folder is a set
    of scripts, on sys.path only while importing)."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")

    def load(name: str):
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)

    return load


def pytest_unconfigure(config):
    """The test run's compilation cache goes with the process that made it."""
    if os.environ.get("DEIT_TESTS_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# pytest-xdist hands whole files (`--dist loadfile`) to its workers in collection order
# (`--no-loadscope-reorder`, pyproject.toml): the files of long end-to-end runs go first, so the
# workers end together instead of one of them finishing a long file alone. Only the order.
LONGEST_FIRST = (
    "test_parallel.py",
    "test_resume.py",
    "test_faults.py",
    "test_regnet.py",
    "test_cli.py",
    "test_deit3.py",
    "test_bad_input.py",
    "test_train.py",
    "test_finetune.py",
    "test_data_gpu.py",
    "test_pretrained.py",
    "test_recipes_deit3.py",
    "test_budget.py",
    "test_bench.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
