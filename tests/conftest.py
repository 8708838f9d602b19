import os

import pytest
import torch
from hypothesis import settings

from device_mode import TEST_DEVICE, DeviceMode
# Tests never read a tune cache of the machine (`anyattn tune`): auto's built-in rules are what they check;
# tests/test_tune.py points the cache at temporary files.
os.environ["ANYATTN_TUNE_CACHE"] = "none"

# Keep property-based tests fast and deterministic on 2 cores.
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# Tests use small tensors: one intra-op thread is faster than two, and on a loaded machine it avoids
# OpenMP threads waiting on each other (20x slowdowns of tiny ops were measured with 2 threads).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: checks CPU-specific behaviour (skipped when "
                                       "ANYATTN_TEST_DEVICE is not cpu)")
    config.addinivalue_line("markers", "cuda_only: needs a CUDA device (skipped without one)")
    if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("ANYATTN_TEST_DEVICE=cuda but torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TEST_DEVICE.type != "cpu" and item.get_closest_marker("cpu_only"):
            item.add_marker(pytest.mark.skip(reason=f"CPU-specific check (ANYATTN_TEST_DEVICE={TEST_DEVICE})"))
        if item.get_closest_marker("cuda_only") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True, scope="session")
def _test_device_mode():
    """With ANYATTN_TEST_DEVICE=cuda, tensors that tests create land on the GPU (see device_mode.py)."""
    if TEST_DEVICE.type == "cpu":
        yield
        return
    with DeviceMode(TEST_DEVICE):
        yield


@pytest.fixture
def device() -> torch.device:
    """The device the suite runs on (ANYATTN_TEST_DEVICE, default cpu)."""
    return TEST_DEVICE
