"""Shared test setup: float64 reference math, deterministic seeds, small helpers."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (README: `pytest -n 2` on 2 cores) each worker gets one thread: two workers with two
# threads each oversubscribe the cores and small ops then wait on each other (seen: 10-100x slower).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str):
    """A repository script that is not part of the package (``benchmarks/*.py``, ``csrc/build.py``), loaded as a
    fresh module on every call."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error |a - b| / |b| (b is the reference)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture
def one_thread():
    """Run single-threaded: small rollouts are faster (and steadier) on one thread of a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_wan_pipeline(tmp_path_factory):
    """A tiny random diffusers Wan2.1 pipeline folder (tests/fixtures/tiny_wan_pipeline.py), read-only for tests."""
    from fixtures.tiny_wan_pipeline import save_tiny_wan_pipeline

    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole module (module-scoped fixtures that build or train models need it too):
    tiny models and float64 convolutions run up to ~100x faster on one thread of a busy 2-core box than on
    two (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trained_once(tmp_path_factory, name: str, train) -> Path:
    """``train(folder)``'s run folder, trained once per test run: under pytest-xdist the first worker to ask
    trains it and the others wait (a file lock in the base temp folder the workers share)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / "run" / "phases" / "teacher" / "done.json").is_file():
            folder.mkdir(exist_ok=True)
            train(folder)
    return folder / "run"


@pytest.fixture(scope="session")
def world_model_run(tmp_path_factory):
    """The run folder of the trained tiny world model (tests/fixtures/world_model.py), trained once per test run."""
    from fixtures.world_model import train_world_model

    return _trained_once(tmp_path_factory, "world_model", train_world_model)


@pytest.fixture(scope="session")
def class_model_run(tmp_path_factory):
    """The run folder of the trained tiny class-conditioned teacher (tests/fixtures/class_model.py), trained once
    per test run."""
    from fixtures.class_model import train_class_model

    return _trained_once(tmp_path_factory, "class_model", train_class_model)
