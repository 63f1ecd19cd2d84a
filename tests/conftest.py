import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _test_threads() -> int:
    """Torch threads of the suite: ``SFVIDEO_TEST_THREADS`` (default 1).

    One thread by default: the models are tiny, so thread start-up costs more than it saves, and CI has 2 cores
    shared by everything. The suite must pass with any count (``SFVIDEO_TEST_THREADS=2 make test``): oneDNN picks
    kernels by shape, thread count and instruction set, so no test may depend on which kernel runs.
    """
    raw = os.environ.get("SFVIDEO_TEST_THREADS", "1")
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
