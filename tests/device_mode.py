"""`ANYATTN_TEST_DEVICE=cuda` runs the whole suite on a GPU (default: cpu).

`DeviceMode` is a torch function mode that puts the tensors *test code* creates on that device:
a factory call (`torch.randn`, `torch.zeros`, `torch.tensor`, ...) made from a file under `tests/`
without `device=` gets `device=TEST_DEVICE`; one that draws from a CPU `torch.Generator` is drawn on
the CPU (the same numbers as the CPU suite) and then moved. Factory calls made by anyattn itself are
left alone, so a library call that forgets `device=` still fails on a GPU run instead of being hidden.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

TEST_DEVICE = torch.device(os.environ.get("ANYATTN_TEST_DEVICE", "cpu"))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_FACTORIES = _device_constructors()


def _called_from_tests() -> bool:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR):
        f = f.f_back
    return f is not None and os.path.abspath(f.f_code.co_filename).startswith(_TESTS_DIR)


class DeviceMode(TorchFunctionMode):
    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None and _called_from_tests():
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                return func(*args, **kwargs).to(self.device)
            kwargs["device"] = self.device
        return func(*args, **kwargs)
