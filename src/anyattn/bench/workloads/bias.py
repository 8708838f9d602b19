"""Attention with bias: anyattn's routes (lowrank_bias / FlashBias, blocked with an in-tile bias, SDPA with
the bias materialized) against torch SDPA with a dense bias and compiled FlexAttention with the same
score_mod (forward only on CPU), with unbiased SDPA as the speed of light.

Workloads (CPU fp32, B=1, H=8, D=64 at full size):
- alibi:   causal ALiBi, N=8192 (quick: N=256);
- t5:      T5 bidirectional buckets (32 buckets, max_distance 128), non-causal, N=4096;
- swin:    Swin 2-D table on a 64x64 grid (N=4096), non-causal; SVD route with tol=1e-3 (factors computed
           once, as for a trained model at inference: the SVD time is the setup time) and the error it
           reached in `params`;
- spatial: SpatialDistance with 3-D coordinates and a per-head weight, non-causal, N=8192.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..case import Case
from ..peers import add_flex, attention_flops

DESCRIPTIONS = {
    "alibi": "causal ALiBi, B=1 H=8 D=64 N=8192: lowrank_bias (rank-2 factors) vs FlexAttention score_mod, "
             "dense-bias SDPA, unbiased causal SDPA",
    "t5": "T5 bidirectional bucket bias, N=4096: in-tile vs materialized vs FlexAttention",
    "swin": "Swin 2-D relative-position table on a 64x64 grid: truncated SVD (tol=1e-3) vs dense bias",
    "spatial": "squared-distance bias, 3-D coords, per-head weight, N=8192: exact rank-5 factors vs dense bias",
}


def _add_flex(case, score_mod, causal, N, enabled=True):
    if not enabled:
        case.skip["flex"] = "compiled FlexAttention is only run at full size (compile time dominates quick runs)"
        return
    add_flex(case, N, N, mask_mod=(lambda b, h, q, k: q >= k) if causal else None, score_mod=score_mod)


def _qkv(B, H, N, D, extra, seed=0):
    """`make_inputs`: q, k, v and the bias parameters from `extra(generator)` (all take gradients)."""
    def make(requires_grad):
        g = torch.Generator().manual_seed(seed)
        x = {n: torch.randn(B, H, N, D, generator=g) for n in "qkv"}
        x.update(extra(g))
        for t in x.values():
            t.requires_grad_(requires_grad)
        return x
    return make


def _reference(case, contenders, B, H, N, limit_gb=2.0):
    import anyattn
    gb = B * H * N * N * 8 * 3 / 1e9
    if gb > limit_gb:
        case.skip["reference"] = f"float64 dense scores and softmax take about {gb:.1f} GB"
        return
    contenders["reference"] = lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=case._mask,
                                                          bias=case._bias(x), method="reference")


def _case(workload, label, params, B, H, N, D, causal, extra, bias_of, score_mod, dense_bias, *, quick,
          extra_contenders=None, baseline="sdpa_unbiased", exact="blocked"):
    import anyattn
    import anyattn.softmax.lowrank_bias  # noqa: F401  (registers the method)
    from anyattn import masks
    mask = masks.Causal() if causal else None
    c = {
        "sdpa_unbiased": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal),
        "auto": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, bias=bias_of(x)),
        "blocked": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, bias=bias_of(x), method="blocked"),
        "sdpa_dense_bias": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=dense_bias(x)),
    }
    c.update(extra_contenders or {})
    case = Case(workload, label, params, attention_flops(B, H, N, N, D, D, causal), _qkv(B, H, N, D, extra), c,
                baseline=baseline, exact=exact)
    case._mask, case._bias = mask, bias_of
    _reference(case, c, B, H, N)
    _add_flex(case, score_mod, causal, N, enabled=not quick)
    gb = B * H * N * N * 4 / 1e9
    case.params["dense_bias_gb"] = round(gb, 3)
    return case


# --- ALiBi -------------------------------------------------------------------------------------------

def alibi_cases(quick: bool, N: int | None = None):
    import anyattn
    from anyattn import biases, masks
    B, H, N, D = (1, 2, 256, 16) if quick else (1, 8, N or 8192, 64)
    slopes0 = biases.Alibi.geometric(H).slopes

    def extra(g):
        return {"slopes": slopes0.clone()}

    def bias_of(x):
        return biases.Alibi(x["slopes"])

    def dense_bias(x):
        # What a user writes for SDPA: the (H, N, N) bias with the causal mask folded in as -inf.
        i = torch.arange(N)
        d = (i.view(-1, 1) - i.view(1, -1)).float()
        return (-x["slopes"].view(1, -1, 1, 1) * d).masked_fill(d < 0, float("-inf"))

    def score_mod(x):
        s = x["slopes"].detach()
        return lambda score, b, h, q_idx, kv_idx: score - s[h] * (q_idx - kv_idx)

    mask = masks.Causal()
    extra_c = {"lowrank_bias": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=mask, bias=bias_of(x),
                                                           method="lowrank_bias")}
    case = _case("alibi", f"N={N} causal ALiBi", {"B": B, "H": H, "N": N, "D": D, "causal": True},
                 B, H, N, D, True, extra, bias_of, score_mod, dense_bias, quick=quick, extra_contenders=extra_c)
    return [case]


# --- T5 ----------------------------------------------------------------------------------------------

def t5_cases(quick: bool):
    import anyattn
    from anyattn import biases
    B, H, N, D = (1, 2, 256, 16) if quick else (1, 8, 4096, 64)
    nb, maxd = 32, 128

    def extra(g):
        return {"table": torch.randn(nb, H, generator=g) * 0.5}

    def bias_of(x):
        return biases.RelativePosition.t5(x["table"], True, maxd)

    bucket = biases.t5_bucket(torch.arange(N).view(1, -1) - torch.arange(N).view(-1, 1), True, nb, maxd)

    def dense_bias(x):  # HF T5: values = table[buckets].permute
        return x["table"][bucket].permute(2, 0, 1).unsqueeze(0)

    lut = biases.t5_bucket(torch.arange(-(N - 1), N), True, nb, maxd)

    def score_mod(x):
        t = x["table"].detach()
        return lambda score, b, h, q_idx, kv_idx: score + t[lut[kv_idx - q_idx + (N - 1)], h]

    case = _case("t5", f"N={N} T5 bidirectional", {"B": B, "H": H, "N": N, "D": D, "causal": False,
                                                    "buckets": nb, "max_distance": maxd},
                 B, H, N, D, False, extra, bias_of, score_mod, dense_bias, quick=quick)
    case.contenders["sdpa_materialized"] = lambda x: anyattn.attention(x["q"], x["k"], x["v"], bias=bias_of(x),
                                                                       method="sdpa")
    return [case]


# --- Swin --------------------------------------------------------------------------------------------

def swin_table(Wh: int, Ww: int, H: int) -> torch.Tensor:
    """A smooth per-head table `((2Wh-1)(2Ww-1), H)` like trained Swin tables (distance decay plus a slow
    oscillation and small noise); its 2-D bias has a fast-decaying spectrum. Synthetic: a trained model's
    table is not available offline."""
    g = torch.Generator().manual_seed(1)
    dy = torch.arange(-(Wh - 1), Wh).double().view(-1, 1) / Wh
    dx = torch.arange(-(Ww - 1), Ww).double().view(1, -1) / Ww
    heads = []
    for h in range(H):
        a, b, f = 1.0 + h / H, 0.3 * (h % 3), 1.0 + (h % 2)
        t = -a * (dy ** 2 + dx ** 2) + b * torch.cos(torch.pi * f * dy) * torch.cos(torch.pi * f * dx)
        heads.append(t + 1e-5 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    return torch.stack(heads, -1).reshape(-1, H).float()


def swin_cases(quick: bool):
    import anyattn
    from anyattn import biases
    B, H, D, (Wh, Ww) = (1, 2, 16, (8, 8)) if quick else (1, 8, 64, (64, 64))
    N = Wh * Ww
    table0 = swin_table(Wh, Ww, H)
    tol = 1e-3

    def extra(g):
        return {"table": table0.clone()}

    def bias_of(x):
        return biases.RelativePosition.swin(x["table"], (Wh, Ww))

    index = bias_of({"table": table0})._index(0, N, 0, N, N, N, torch.device("cpu"))

    def dense_bias(x):  # Swin: table[relative_position_index].permute(2, 0, 1)
        return x["table"][index].permute(2, 0, 1).unsqueeze(0)

    pre = {}

    def factored(x):
        """Factors computed once per table (inference); later calls reuse them."""
        if "lr" not in pre:
            t0 = time.perf_counter()
            pre["lr"] = biases.lowrank(bias_of({"table": table0}), N, N, tol=tol)
            pre["s"] = time.perf_counter() - t0
        return pre["lr"].bias

    dense_pre = {}

    def dense_once(x):
        if "b" not in dense_pre:
            dense_pre["b"] = dense_bias({"table": table0}).contiguous()
        return dense_pre["b"]

    def score_mod(x):
        t = x["table"].detach()
        return lambda score, b, h, q_idx, kv_idx: score + t[
            (q_idx // Ww - kv_idx // Ww + Wh - 1) * (2 * Ww - 1) + (q_idx % Ww - kv_idx % Ww + Ww - 1), h]

    extra_c = {
        "lowrank_svd": lambda x: anyattn.attention(x["q"], x["k"], x["v"], bias=factored(x), method="lowrank_bias"),
        "sdpa_dense_bias_cached": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                            attn_mask=dense_once(x)),
    }
    case = _case("swin", f"{Wh}x{Ww} grid Swin table", {"B": B, "H": H, "N": N, "D": D, "causal": False,
                                                         "grid": [Wh, Ww], "tol": tol},
                 B, H, N, D, False, extra, bias_of, score_mod, dense_bias, quick=quick, extra_contenders=extra_c,
                 baseline="sdpa_dense_bias", exact="sdpa_dense_bias")
    case.setup_seconds["lowrank_svd"] = lambda: pre.get("s")
    case.setup_seconds["sdpa_dense_bias_cached"] = 0.0
    case.forward_only["lowrank_svd"] = "factors precomputed from a fixed table (inference); the SVD route " \
                                       "differentiates through the projection when trained, see docs/biases.md"
    case.forward_only["sdpa_dense_bias_cached"] = "cached bias of a fixed table (inference)"

    class _Err:  # the reached error, known once the factors exist
        def __repr__(self):
            lr = pre.get("lr")
            return "pending" if lr is None else f"rank {lr.rank}, rel_fro {lr.rel_error:.3g}"
    case.params["svd"] = _Err()
    return [case]


# --- SpatialDistance ---------------------------------------------------------------------------------

def spatial_cases(quick: bool):
    import anyattn
    from anyattn import biases
    B, H, N, D = (1, 2, 256, 16) if quick else (1, 8, 8192, 64)

    def extra(g):
        return {"coords": torch.rand(N, 3, generator=g) * 4, "weight": torch.rand(H, generator=g) + 0.5}

    def bias_of(x):
        return biases.SpatialDistance(x["coords"], x["weight"])

    def dense_bias(x):  # what a user writes: -w_h |x_i - x_j|^2 through cdist
        return -x["weight"].view(1, -1, 1, 1) * torch.cdist(x["coords"], x["coords"]).square().unsqueeze(0)

    def score_mod(x):
        c, w = x["coords"].detach(), x["weight"].detach()
        return lambda score, b, h, q_idx, kv_idx: score - w[h] * (
            (c[q_idx, 0] - c[kv_idx, 0]) ** 2 + (c[q_idx, 1] - c[kv_idx, 1]) ** 2 + (c[q_idx, 2] - c[kv_idx, 2]) ** 2)

    extra_c = {"lowrank_bias": lambda x: anyattn.attention(x["q"], x["k"], x["v"], bias=bias_of(x),
                                                           method="lowrank_bias")}
    case = _case("spatial", f"N={N} 3-D squared distance", {"B": B, "H": H, "N": N, "D": D, "causal": False, "d": 3},
                 B, H, N, D, False, extra, bias_of, score_mod, dense_bias, quick=quick, extra_contenders=extra_c,
                 baseline="sdpa_dense_bias")
    return [case]


WORKLOADS = {"alibi": alibi_cases, "t5": t5_cases, "swin": swin_cases, "spatial": spatial_cases}
