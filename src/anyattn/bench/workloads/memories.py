"""Benchmark workloads of the recurrent memories and linear variants (issue 15): `titans`, `lightnet`,
`flowformer`, `ecoformer`. B=1, H=8, D=64 (quick: N=256).

* `titans` — the Titans linear memory (chunk_size 16, the model's mini-batch): at N=4096 the chunk form
  against its token loop `recurrent` (baseline: the speedup column is the chunk form's speedup over the
  loop), forward and forward+backward; at N=16384 the chunk form alone (baseline itself); read
  forward+backward time and peak memory of `chunk` at N=4096 and N=16384 for the linear-in-N check.
  Causal SDPA is timed beside it (what the memory replaces). A float64 case (N=1024, eta = 0,
  chunk_size = 1) compares against `gated_delta_rule` under the reparametrization (error column).
* `lightnet` — LightNet (through the GLA engine) against `gla` (baseline) on the same shapes, and SDPA.
* `flowformer` — causal flow attention against causal SDPA (baseline), N in {4096, 16384}.
* `ecoformer` — linear attention with EcoFormer's hash features (16 bits, 25 anchors fitted by `fit_ksh`
  on 256 keys, untimed: the fit is a one-time training step), against causal SDPA (baseline).

FLOPs (useful forward work; a (m,k)x(k,n) matmul counts 2mkn; per (batch, head), K = V = D):
  titans, per chunk of C: `Q K^T`, `A E`: 2 C^2 (K + V); `G = L_b L_m`: 2 C^3; `E = K M`: 2 C K V;
      `[Qb Qf] [M; S]`: 4 C K V; the state update `W^T E`: 4 C K V.
  lightnet / flowformer / ecoformer: the decay-family chunk count of `linear_family` (intra-chunk
      2 C^2 (F + V), state 4 C F V per chunk of C = 64, F the feature dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import linear as L
from ..case import Case

B, H, D = 1, 8, 64
SIZES = (4096, 16384)
QUICK = (256,)
TITANS_C = 16
LOOP_MAX_N = 4096      # the token loop (Titans' recurrent mode) is timed up to this N


def _decay_flops(N, Fdim=D, V=D, C=64):
    return B * H * (N / C) * (2 * C * C * (Fdim + V) + 4 * C * Fdim * V)


def _titans_flops(N, C=TITANS_C, K=D, V=D):
    return B * H * (N / C) * (2 * C * C * (K + V) + 2 * C ** 3 + 10 * C * K * V)


def _sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def _qkv(N, requires_grad, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))
    return g, dict(q=q, k=k, v=v)


def _grad(x, requires_grad, names):
    if requires_grad:
        for n in names:
            x[n] = x[n].detach().requires_grad_()
    return x


# ------------------------------------------------------------------------------------------ titans

def _titans_inputs(N, requires_grad, dtype=torch.float32, eta_zero=False):
    g, x = _qkv(N, requires_grad, 1, dtype)
    x["q"], x["k"] = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)
    x["theta"] = torch.rand(B, H, N, generator=g, dtype=dtype) * 0.5
    x["alpha"] = torch.rand(B, H, N, generator=g, dtype=dtype) * 0.1
    x["eta"] = torch.zeros(B, H, N, dtype=dtype) if eta_zero else torch.rand(B, H, N, generator=g, dtype=dtype)
    return _grad(x, requires_grad, ("q", "k", "v", "theta", "alpha", "eta"))


def _titans(mode, C=TITANS_C):
    return lambda x: L.titans(x["q"], x["k"], x["v"], x["theta"], x["alpha"], x["eta"], chunk_size=C, mode=mode)


def _titans_case(N):
    contenders = {"chunk": _titans("chunk"), "sdpa": _sdpa}
    skip, forward_only = {}, {}
    if N <= LOOP_MAX_N:
        contenders["recurrent"] = _titans("recurrent")
        forward_only["recurrent"] = "the token loop's backward (N steps of autograd) is the slow path the chunk form replaces"
    else:
        skip["recurrent"] = f"the token loop is timed up to N={LOOP_MAX_N} (its cost is linear in N)"
    return Case(workload="titans", label=f"N={N} causal, chunk_size {TITANS_C}",
                params=dict(B=B, H=H, N=N, D=D, chunk_size=TITANS_C), flops=_titans_flops(N),
                make_inputs=lambda rg, _n=N: _titans_inputs(_n, rg), contenders=contenders,
                baseline="recurrent" if "recurrent" in contenders else "chunk",
                exact="recurrent" if "recurrent" in contenders else None, backward=True,
                forward_only=forward_only, skip=skip,
                missing={"fla_titans": "fla's ops/titans/naive.py has no backward and its own test is disabled"})


def _titans_gdn_case(N):
    """float64, eta = 0, chunk_size = 1: the reparametrization to Gated DeltaNet (error column)."""
    def gdn(x):
        keep = 1 - x["alpha"]
        return L.gated_delta_rule(x["q"], x["k"], keep[..., None] * x["v"], torch.log(keep), x["theta"] / keep,
                                  scale=D ** -0.5)
    return Case(workload="titans", label=f"N={N} float64, eta=0, chunk_size 1 vs gated_delta_rule",
                params=dict(B=B, H=H, N=N, D=D, chunk_size=1, dtype="float64"), flops=_titans_flops(N, C=1),
                make_inputs=lambda rg, _n=N: _titans_inputs(_n, rg, torch.float64, eta_zero=True),
                contenders={"chunk": _titans("chunk", 1), "gated_delta_rule": gdn}, baseline="gated_delta_rule",
                exact="gated_delta_rule", backward=False)


def _titans_cases(quick):
    sizes = QUICK if quick else SIZES
    return [_titans_case(N) for N in sizes] + [_titans_gdn_case(64 if quick else 1024)]


# ---------------------------------------------------------------------------------------- lightnet

def _lightnet_inputs(N, requires_grad):
    g, x = _qkv(N, requires_grad, 2)
    x["g"] = F.logsigmoid(torch.randn(B, H, N, D, generator=g) + 2.0)       # gla's gates (same shapes)
    return _grad(x, requires_grad, ("q", "k", "v", "g"))


def _lightnet_case(N):
    contenders = {
        "lightnet": lambda x: L.lightnet(F.silu(x["q"]), x["k"], x["v"]),
        "gla": lambda x: L.gla(F.silu(x["q"]), x["k"], x["v"], x["g"], scale=1.0),
        "sdpa": _sdpa,
    }
    return Case(workload="lightnet", label=f"N={N} causal", params=dict(B=B, H=H, N=N, D=D),
                flops=_decay_flops(N), make_inputs=lambda rg, _n=N: _lightnet_inputs(_n, rg),
                contenders=contenders, baseline="gla", backward=True,
                missing={"fla_lightnet": "fla's LightNet layer runs its Triton kernels (no CPU path)"})


# -------------------------------------------------------------------------------------- flowformer

def _flowformer_case(N):
    return Case(workload="flowformer", label=f"N={N} causal", params=dict(B=B, H=H, N=N, D=D),
                flops=_decay_flops(N), make_inputs=lambda rg, _n=N: _grad(_qkv(_n, rg, 3)[1], rg, "qkv"),
                contenders={"flowformer": lambda x: L.flowformer(x["q"], x["k"], x["v"]), "sdpa": _sdpa},
                baseline="sdpa", backward=True)


# --------------------------------------------------------------------------------------- ecoformer

ECO_BITS, ECO_ANCHORS = 16, 25        # EcoFormer's published setting (nbits 16, m 25)


def _ecoformer_case(N, quick=False):
    state = {}
    sample, iterations = (64, 2) if quick else (256, 20)

    def features(x):
        if "fm" not in state:         # fitted once per process on a sample of the keys (untimed warm-up)
            state["fm"] = L.fit_ksh(x["k"][:, :, :sample].detach(), ECO_BITS, ECO_ANCHORS, iterations=iterations)
        return state["fm"]

    def eco(x):
        return L.linear_attention(x["q"], x["k"], x["v"], feature_map=features(x), normalize=True, scale=1.0)

    def make(rg, _n=N):
        x = _grad(_qkv(_n, rg, 4)[1], rg, "qkv")
        features(x)
        return x

    return Case(workload="ecoformer", label=f"N={N} causal, {ECO_BITS} bits", params=dict(B=B, H=H, N=N, D=D, bits=ECO_BITS),
                flops=_decay_flops(N, Fdim=ECO_BITS + 1) + B * H * N * 2 * ECO_ANCHORS * (D + ECO_BITS) * 2,
                make_inputs=make, contenders={"ecoformer": eco, "sdpa": _sdpa}, baseline="sdpa", backward=True)


def _sizes(fn):
    return lambda quick: [fn(N) for N in (QUICK if quick else SIZES)]


def _ecoformer_cases(quick):
    return [_ecoformer_case(N, quick) for N in (QUICK if quick else SIZES)]


WORKLOADS = {"titans": _titans_cases, "lightnet": _sizes(_lightnet_case), "flowformer": _sizes(_flowformer_case),
             "ecoformer": _ecoformer_cases}
DESCRIPTIONS = {
    "titans": "Titans linear memory: chunk form vs its token loop (N=4096), chunk at N=16384, vs Gated DeltaNet (eta=0)",
    "lightnet": "LightNet (additive scan through the GLA engine) vs gla on the same shapes, and causal SDPA",
    "flowformer": "Flowformer causal flow attention vs causal SDPA",
    "ecoformer": "EcoFormer hashed linear attention (16 bits, fit_ksh) vs causal SDPA",
}
