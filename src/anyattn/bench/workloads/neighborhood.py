"""Neighborhood attention (NATTEN semantics) in 1-D, 2-D and 3-D: anyattn's tiled engine against
compiled FlexAttention with a block mask, NATTEN's CPU path and dense-masked torch SDPA. `anyattn` calls
`anyattn.neighborhood`; `auto` calls `anyattn.attention` with the `masks.Neighborhood` spec (what auto picks)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..case import Case
from ..peers import add_flex

DESCRIPTIONS = {
    "na1d": "1-D neighborhood attention, N=16384 kernel 257 (and 4N for the memory-linear check), B=1 H=8 D=64",
    "na2d": "2-D neighborhood attention, 128x128 kernel 13 (and 256x256), B=1 H=8 D=64",
    "na3d": "3-D neighborhood attention, 16x32x32 kernel (3,7,7) (and 16x64x64), B=1 H=8 D=64",
}

DENSE_LIMIT_BYTES = 4e9  # skip peers that materialize N x N (mask or scores) beyond this


def na_flops(B, H, spatial, kernel, D):
    """Useful forward FLOPs: every query meets prod(kernel) keys; 2 matmuls of 2*D FLOPs per pair."""
    return 4.0 * B * H * math.prod(spatial) * math.prod(kernel) * D


def _inputs(B, H, spatial, D, seed=0):
    def make(requires_grad):
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(B, H, *spatial, D, generator=g).requires_grad_(requires_grad) for n in "qkv"}
    return make


def _flat(x):
    B, H, D = x.shape[0], x.shape[1], x.shape[-1]
    return x.reshape(B, H, -1, D)


def _natten(spatial, kernel):
    try:
        import natten
    except Exception as e:  # noqa: BLE001 - any import failure means the peer is missing
        return None, f"natten not importable: {type(e).__name__}: {e}"
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]

    def run(x):
        q, k, v = (x[n].movedim(1, -2) for n in "qkv")  # NATTEN's layout (B, *spatial, H, D)
        return fn(q, k, v, kernel_size=kernel).movedim(-2, 1)
    return run, None


def _case(workload, spatial, kernel, *, B=1, H=8, D=64, label="", flex=True):
    from ...masks.neighborhood import Neighborhood
    N = math.prod(spatial)
    kernel_t = kernel if isinstance(kernel, tuple) else (kernel,) * len(spatial)
    dense_state = {}

    def dense_mask(device):
        if "m" not in dense_state:
            dense_state["m"] = Neighborhood(spatial, kernel).dense(1, 1, N, N, device)
        return dense_state["m"]

    def dense_sdpa(x):
        q, k, v = (_flat(x[n]) for n in "qkv")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(q.device)).reshape(x["q"].shape)

    spec = Neighborhood(spatial, kernel)

    def auto(x):  # the generic entry point: method="auto" with the mask spec on flattened tokens
        import anyattn
        return anyattn.attention(_flat(x["q"]), _flat(x["k"]), _flat(x["v"]), mask=spec).reshape(x["q"].shape)

    contenders = {
        "anyattn": lambda x: anyattn_neighborhood(x["q"], x["k"], x["v"], kernel),
        "auto": auto,
        "sdpa_dense": dense_sdpa,
    }
    case = Case(workload, label or f"{'x'.join(map(str, spatial))} kernel {kernel}",
                {"B": B, "H": H, "D": D, "spatial": list(spatial), "N": N, "kernel": list(kernel_t)},
                na_flops(B, H, spatial, kernel_t, D), _inputs(B, H, spatial, D), contenders,
                baseline="anyattn", exact="sdpa_dense")
    # Dense SDPA on CPU turns the (N, N) bool mask into a float one and keeps (N, N) per head block.
    dense_bytes = N * N * (1 + 4)
    if dense_bytes > DENSE_LIMIT_BYTES:
        del contenders["sdpa_dense"]
        case.skip["sdpa_dense"] = f"the N x N mask takes {dense_bytes / 1e9:.1f} GB (> 4 GB)"
        case.exact = None
    if flex and N * N > 2 ** 31:
        case.skip["flex"] = (f"create_block_mask materializes the {N} x {N} mask on CPU "
                             f"({N * N * 8 / 1e9:.0f} GB as int64); run at N only")
    elif flex:
        from ...masks.neighborhood import Neighborhood
        spec = Neighborhood(spatial, kernel)
        add_flex(case, N, N, mask_mod=lambda b, h, q, kv: spec.allowed(b, h, q, kv, N, N),
                 prepare=lambda x: (_flat(x["q"]), _flat(x["k"]), _flat(x["v"])))
    else:
        case.skip["flex"] = "not compiled in quick mode (compiling takes 10-40 s)"
    nat, why = _natten(spatial, kernel)
    if nat is None:
        case.missing["natten"] = why
    else:
        scores = B * H * N * N * 4
        if scores > DENSE_LIMIT_BYTES:
            case.skip["natten"] = (f"NATTEN's CPU path (eager FlexAttention) materializes the {scores / 1e9:.1f} GB "
                                   "score matrix (> 4 GB)")
        else:
            contenders["natten"] = nat
            case.forward_only["natten"] = "NATTEN's CPU path is forward only"
    return case


def anyattn_neighborhood(q, k, v, kernel):
    from ...softmax.neighborhood import neighborhood
    return neighborhood(q, k, v, kernel)


def _family(workload, base, bigger, kernel, quick_spatial, quick_kernel):
    def cases(quick: bool):
        if quick:
            return [_case(workload, quick_spatial, quick_kernel, H=2, D=16, flex=False)]
        small = _case(workload, base, kernel, label=f"{'x'.join(map(str, base))} kernel {kernel} (N)")
        big = _case(workload, bigger, kernel, label=f"{'x'.join(map(str, bigger))} kernel {kernel} (4N)")
        return [small, big]
    return cases


WORKLOADS = {
    "na1d": _family("na1d", (16384,), (65536,), 257, (256,), 17),
    "na2d": _family("na2d", (128, 128), (256, 256), 13, (16, 16), 5),
    "na3d": _family("na3d", (16, 32, 32), (16, 64, 64), (3, 7, 7), (4, 8, 8), (3, 3, 3)),
}
