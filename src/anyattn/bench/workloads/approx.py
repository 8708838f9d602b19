"""Approximate softmax attention: every approximate method's time, peak memory and error against exact
torch SDPA, side by side (CPU fp32, B=1, H=8, D=64; N in {4096, 16384, 65536}).

- non-causal at N=4096 and 16384 (forward and forward+backward) and N=65536 (forward only; exact SDPA is
  skipped there: one call takes ~16x the N=16384 time, minutes on CPU, so that case has no error column);
- causal at N=16384 for the methods that honour a causal mask (hyper, performer, kernel_rpe, sea).
Inputs are iid Gaussian q, k, v: attention is then nearly uniform and the exact output is small
(norm ~ 1/sqrt(N)), so relative errors are pessimistic compared with trained models' peaked attention
(see the MiniLM cosines in docs/approx.md). Every method runs with its documented defaults except
`kernel_rpe` (num_features=32 to keep its FFT passes short; its error grows accordingly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..case import Case

DESCRIPTIONS = {"approx": "approximate softmax (hyper, nystrom, soft, performer, kernel_rpe, sea) vs exact SDPA: "
                          "time, peak memory, relative error; B=1 H=8 D=64, N in {4096, 16384, 65536}"}

NON_CAUSAL = ("hyper", "nystrom", "soft", "performer", "kernel_rpe", "sea")
CAUSAL = ("hyper", "performer", "kernel_rpe", "sea")
OPTIONS = {"kernel_rpe": {"num_features": 32}}


def _inputs(B, H, N, D, seed=0):
    def make(requires_grad):
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(B, H, N, D, generator=g).requires_grad_(requires_grad) for n in "qkv"}
    return make


def _method(name, causal, opts):
    import anyattn
    import anyattn.approx  # noqa: F401  (registers the approximate methods)
    from anyattn.masks import Causal

    mask = Causal() if causal else None
    return lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, method=name, **opts)


def _case(B, H, N, D, causal, *, backward, exact, quick):
    contenders = {}
    skip = {}
    if exact:
        contenders["sdpa"] = lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)
    else:
        skip["sdpa"] = (f"exact SDPA skipped at N={N} (at full size N=65536 one call takes ~16x the N=16384 time, "
                        "minutes on CPU): this case reports time and memory only")
    for name in (CAUSAL if causal else NON_CAUSAL):
        contenders[name] = _method(name, causal, OPTIONS.get(name, {}))
    flops = 2.0 * B * H * N * N * 2 * D / (2 if causal else 1)
    return Case(workload="approx", label=f"N={N} {'causal' if causal else 'non-causal'}",
                params={"B": B, "H": H, "N": N, "D": D, "causal": causal, "options": OPTIONS,
                        "flops_note": "useful FLOPs of exact attention (the approximations do fewer)"},
                flops=flops, make_inputs=_inputs(B, H, N, D), contenders=contenders,
                baseline="sdpa" if exact else "performer", exact="sdpa" if exact else None,
                backward=backward, skip=skip)


def cases(quick: bool) -> list[Case]:
    B, H, D = 1, 8, 64
    if quick:
        return [_case(1, 2, 256, 16, False, backward=True, exact=True, quick=True),
                _case(1, 2, 256, 16, True, backward=False, exact=False, quick=True)]
    return [_case(B, H, 4096, D, False, backward=True, exact=True, quick=False),
            _case(B, H, 16384, D, False, backward=True, exact=True, quick=False),
            _case(B, H, 16384, D, True, backward=True, exact=True, quick=False),
            _case(B, H, 65536, D, False, backward=False, exact=False, quick=False)]


WORKLOADS = {"approx": cases}
