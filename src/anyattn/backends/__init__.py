"""Optional fused kernels of other libraries, used when installed and the inputs are on CUDA; anyattn's
own engines stay the fallback (and run everywhere). One module per library, each behind its own import
check, each tested against anyattn's oracle on the same inputs (`tests/backends/`):

- `natten`: NATTEN's neighborhood-attention kernels for `anyattn.neighborhood` / method "neighborhood";
- `fla`: flash-linear-attention's chunk kernels for `linear.gla`, `delta_rule`, `gated_delta_rule`, `kda`;
- `mamba`: mamba-ssm's fused selective scan for `ssm.selective_scan`.
(FlexAttention, part of torch, is the method `flex`: `anyattn.softmax.flex`.)

Each module has `unavailable(...) -> str | None` (why it cannot run a call, None when it can) and the
call itself with the layout conversion. `report(device)` lists what each backend would say on a device.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """Which implementation an op uses (`backend`) and why (`reason`)."""

    backend: str
    reason: str

    def __str__(self):
        return f"{self.backend}: {self.reason}"


def report(device="cuda") -> dict[str, str]:
    """Backend name -> "available" or why it is not usable on `device` (import checks only)."""
    import torch

    from . import fla, mamba, natten
    dev = torch.device(device)
    out = {}
    for name, mod in (("natten", natten), ("fla", fla), ("mamba", mamba)):
        why = mod.import_error()
        if why is None and dev.type != "cuda":
            why = f"used on CUDA only (device {dev.type})"
        out[name] = why or "available"
    return out
