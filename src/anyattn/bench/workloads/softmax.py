"""Exact softmax attention: anyattn's engines against torch SDPA, FlexAttention and the dense reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..case import Case
from ..peers import add_flex, attention_flops

DESCRIPTIONS = {
    "softmax": "exact attention, B=1 H=8 D=64, N in {1024, 4096, 16384}, causal and not",
    "overhead": "per-call overhead of auto over calling torch SDPA directly, N=128 (decoding-sized calls)",
    "memory": "forward+backward peak memory of blocked vs reference vs SDPA at N=8192",
}


def _inputs(B, H, N, D, seed=0):
    def make(requires_grad):
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(B, H, N, D, generator=g).requires_grad_(requires_grad) for n in "qkv"}
    return make


def _case(workload, B, H, N, D, causal, *, flex=True, reference=True, backward_for=None,
          no_flex_reason="compiled FlexAttention takes > 30 s per call at this size on CPU; skipped to keep "
                         "the report short"):
    import anyattn
    from anyattn import masks
    mask = masks.Causal() if causal else None
    contenders = {
        "torch_sdpa": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal),
        "sdpa": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, method="sdpa"),
        "auto": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask),
        "blocked": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, method="blocked"),
        "reference": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, method="reference"),
    }
    case = Case(workload, f"N={N} {'causal' if causal else 'non-causal'}",
                {"B": B, "H": H, "N": N, "D": D, "causal": causal},
                attention_flops(B, H, N, N, D, D, causal), _inputs(B, H, N, D), contenders,
                baseline="torch_sdpa", exact="torch_sdpa")
    scores_gb = B * H * N * N * 4 / 1e9
    if not reference or scores_gb > 2.5:
        del contenders["reference"]
        case.skip["reference"] = f"dense scores alone take {scores_gb:.1f} GB (x2-3 with softmax and backward)"
    if flex:
        add_flex(case, N, N, mask_mod=(lambda b, h, q, k: q >= k) if causal else None)
    else:
        case.skip["flex"] = no_flex_reason
    if backward_for is not None:
        for name in list(contenders):
            if name not in backward_for and name not in case.forward_only:
                case.forward_only[name] = "forward only at this size to keep the default report short"
    return case


def cases(quick: bool):
    if quick:
        return [_case("softmax", 1, 2, 128, 16, c, flex=False, no_flex_reason="not compiled in quick mode "
                      "(compiling takes 10-30 s)") for c in (False, True)]
    out = []
    for N in (1024, 4096, 16384):
        for causal in (False, True):
            big = N >= 16384
            out.append(_case("softmax", 1, 8, N, 64, causal, flex=not big))
            if big:  # forward+backward is measured at N <= 4096 here and at N=8192 by workload `memory`
                out[-1].backward = False
            if big:
                del out[-1].contenders["sdpa"]
                out[-1].skip["sdpa"] = "the same kernel as torch_sdpa; measured at N <= 4096"
    return out


def overhead_cases(quick: bool):
    """50 back-to-back calls per timing, so the per-call overhead of auto over torch SDPA is
    (auto - torch_sdpa) / 50."""
    import anyattn
    N, calls = 128, 50
    mk = _inputs(1, 8, N, 64)
    out = []
    for causal in (False, True):
        mask = anyattn.masks.Causal() if causal else None
        contenders = {
            "torch_sdpa": lambda x, c=causal: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=c),
            "auto": lambda x, m=mask: anyattn.attention(x["q"], x["k"], x["v"], mask=m),
        }
        looped = {n: (lambda f: (lambda x: [f(x) for _ in range(calls)][-1]))(f) for n, f in contenders.items()}
        out.append(Case("overhead", f"N={N} {'causal' if causal else 'non-causal'} x {calls} calls",
                        {"B": 1, "H": 8, "N": N, "D": 64, "calls": calls, "causal": causal},
                        calls * attention_flops(1, 8, N, N, 64, 64, causal), mk, looped,
                        baseline="torch_sdpa", exact="torch_sdpa", backward=False))
    return out


def memory_cases(quick: bool):
    N = 1024 if quick else 8192
    case = _case("memory", 1, 8, N, 64, True, flex=False, no_flex_reason="FlexAttention has no backward on CPU")
    for name in ("sdpa", "auto"):
        del case.contenders[name]
    return [case]


WORKLOADS = {"softmax": cases, "overhead": overhead_cases, "memory": memory_cases}
