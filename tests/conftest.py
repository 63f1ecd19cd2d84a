import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _test_threads() -> int:
    """Torch threads of the suite: ``SFVIDEO_TEST_THREADS`` (default: the cores this process may use, at most 2).

    Two by default: measured on the 2-core machines (2026-12-03), pytest takes 5 min 44 s at two threads against
    7 min 3 s at one on the AMD EPYC Zen 4, and 7 min 43 s - 8 min 39 s at two against 9 min 26 s at one on the
    AVX2-only EPYC, where one thread and the install would overrun `make test`'s 10 minutes. Capped at 2, the
    counts the suite is checked at. The suite must pass with any count (``SFVIDEO_TEST_THREADS=1 make test``):
    oneDNN picks kernels by shape, thread count and instruction set, so no test may depend on which kernel runs.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    raw = os.environ.get("SFVIDEO_TEST_THREADS", str(min(2, cores)))
    try:
        threads = int(raw)
    except ValueError:
        raise pytest.UsageError(f"SFVIDEO_TEST_THREADS must be a positive integer, got {raw!r}") from None
    if threads < 1:
        raise pytest.UsageError(f"SFVIDEO_TEST_THREADS must be a positive integer, got {raw!r}")
    return threads


TEST_THREADS = _test_threads()
torch.set_num_threads(TEST_THREADS)
# Subprocesses started by tests (the CLI, distributed runs) read their thread count from the environment.
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
os.environ["SFVIDEO_TEST_THREADS"] = str(TEST_THREADS)


@pytest.fixture(autouse=True)
def _restore_threads_and_dtype():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(TEST_THREADS)  # a test (or the code under test, e.g. `bench --threads`) may change it


def pytest_report_header(config):
    return f"sfvideo: torch threads = {TEST_THREADS} (SFVIDEO_TEST_THREADS)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
