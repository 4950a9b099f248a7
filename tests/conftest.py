"""Test set-up. JAX must see its device count before its backend starts, so this runs first."""

import os

# Two fake CPU devices: every training test then exercises the sharded batch path.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# `deit train` keeps compiled programs in $DEIT_HOME/jax-cache by default; tests that want a
# shared cache say so (`runs.compile_cache`), so a compilation that differs still shows.
os.environ.setdefault("DEIT_COMPILE_CACHE", "0")


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
