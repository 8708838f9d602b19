"""The ANYATTN_TEST_DEVICE mechanism (tests/device_mode.py), exercised on the `meta` device."""
import torch

import anyattn
from device_mode import DeviceMode


def test_test_code_factories_land_on_the_test_device():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(3, generator=torch.Generator().manual_seed(0))
    with DeviceMode(torch.device("meta")):
        x = torch.randn(3, generator=g)  # drawn on the CPU (same numbers), then moved
        y = torch.zeros(2)
        z = torch.ones(2, device="cpu")  # an explicit device is kept
    assert x.device.type == "meta" and y.device.type == "meta" and z.device.type == "cpu"
    assert want.shape == x.shape


def test_library_factories_are_left_alone():
    """anyattn's own factory calls are not redirected: one that forgot device= would fail on a GPU run."""
    with DeviceMode(torch.device("meta")):
        slopes = anyattn.linear.alibi_slopes(4)  # builds on the host on purpose
    assert slopes.device.type == "cpu"
