"""Benchmark workloads of Local Linear Attention and Parallax (issue 15). B=1, H=8, D=64, causal
(quick: N=128).

* `lla` — `local_linear_attention` blocked (conjugate gradient, default tolerance) against the dense
  per-query solve (`dense`, the exact column) and blocked causal softmax attention (`attention`, the
  baseline: what LLA costs beside the attention it generalizes). N=1024 and N=2048: error and peak
  memory of both forms (the dense form's memory grows as N^2: its (B, H, N, N) weights and (B, H, N, D, D)
  moments); N=16384: the blocked form's forward peak memory (the dense form is skipped: its weights alone
  are B H N^2 4 bytes = 8.6 GB, and forming the per-query moments takes 2 B H N^2 D^2 = 17.6 TFLOP);
  forward only there. Run with `--memory-max 600` so the N=16384 forward (minutes on a 2-core CPU) gets
  its memory measured.
* `parallax` — `parallax_attention` against blocked causal softmax attention (baseline, the same tiling)
  and a dense formula (`dense`, exact column, up to N=4096); N in {4096, 16384}.

FLOPs: LLA per (query, key) pair of the causal half: scores 2D, first moments 2 (D_v + 2D), ~10 CG
matvecs of 4D, output 2D + 2D_v. Parallax: `[q; r] k^T` 4D, `[p; p (r.k)] v` 4 D_v per pair.
"""
from __future__ import annotations

import torch

from ... import attention, local_linear_attention, parallax_attention
from ...masks import Causal
from ..case import Case

B, H, D = 1, 8, 64
CG_ITERS_COUNTED = 10


def _inputs(N, names, seed):
    def make(requires_grad):
        g = torch.Generator().manual_seed(seed)
        x = {n: torch.randn(B, H, N, D, generator=g) for n in names}
        if "r" in x:
            x["r"] = 0.1 * x["r"]
        if requires_grad:
            for t in x.values():
                t.requires_grad_()
        return x
    return make


def _pairs(N):
    return B * H * N * (N + 1) / 2


def _blocked_attention(x):
    return attention(x["q"], x["k"], x["v"], mask=Causal(), method="blocked")


def _lla_case(N, quick):
    contenders = {"blocked": lambda x: local_linear_attention(x["q"], x["k"], x["v"], mode="blocked"),
                  "attention": _blocked_attention}
    skip, forward_only = {}, {}
    if N <= 2048:
        contenders["dense"] = lambda x: local_linear_attention(x["q"], x["k"], x["v"], mode="dense")
    else:
        skip["dense"] = (f"the dense form needs the (B, H, N, N) weights alone: {B * H * N * N * 4 / 1e9:.1f} GB at "
                         f"N={N}, and 2 B H N^2 D^2 = {2 * B * H * N * N * D * D / 1e12:.1f} TFLOP for the moments")
        for n in contenders:
            forward_only[n] = f"forward only at N={N} (the blocked LLA forward alone takes minutes on a 2-core CPU)"
    flops = _pairs(N) * (2 * D + 2 * (D + 2 * D) + CG_ITERS_COUNTED * 4 * D + 4 * D)
    return Case(workload="lla", label=f"N={N} causal, lam=10", params=dict(B=B, H=H, N=N, D=D, lam=10.0),
                flops=flops, make_inputs=_inputs(N, "qkv", 5), contenders=contenders, baseline="attention",
                exact="dense" if "dense" in contenders else None, backward=True, skip=skip, forward_only=forward_only,
                missing={"lla_triton": "the authors' kernels are Triton on CUDA only"})


def _lla_cases(quick):
    return [_lla_case(N, quick) for N in ((128,) if quick else (1024, 2048, 16384))]


def _parallax_dense(x):
    q, k, v, r = x["q"], x["k"], x["v"], x["r"]
    N = q.shape[2]
    s = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    w = p * (1 - r @ k.transpose(-1, -2) + (r * (p @ k)).sum(-1, keepdim=True))
    return w @ v


def _parallax_case(N):
    contenders = {"parallax": lambda x: parallax_attention(x["q"], x["k"], x["v"], x["r"], mask=Causal()),
                  "attention": _blocked_attention}
    skip = {}
    if N <= 4096:
        contenders["dense"] = _parallax_dense
    else:
        skip["dense"] = f"the dense formula holds (B, H, N, N) scores: {B * H * N * N * 4 / 1e9:.1f} GB at N={N}"
    return Case(workload="parallax", label=f"N={N} causal", params=dict(B=B, H=H, N=N, D=D),
                flops=_pairs(N) * 8 * D, make_inputs=_inputs(N, "qkvr", 6), contenders=contenders,
                baseline="attention", exact="dense" if "dense" in contenders else None, backward=True, skip=skip,
                forward_only={"dense": "the dense formula's backward holds several N x N tensors"},
                missing={"parallax_reference": "no public implementation runs on CPU"})


WORKLOADS = {"lla": _lla_cases,
             "parallax": lambda quick: [_parallax_case(N) for N in ((128,) if quick else (4096, 16384))]}
DESCRIPTIONS = {
    "lla": "Local Linear Attention blocked (CG) vs dense per-query solve (error, memory) and blocked attention",
    "parallax": "Parallax attention (one blocked pass) vs blocked causal softmax attention and the dense formula",
}
