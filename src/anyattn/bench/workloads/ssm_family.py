"""Benchmark workloads of the SSM / long-convolution family (`anyattn.ssm`).

`WORKLOADS = {"mamba": ..., "ssd": ..., "longconv": ...}`, each `cases(quick: bool) -> list[Case]`.

* mamba: `selective_scan` with Mamba's arguments (delta softplus + bias, D, z), B=1, D=1024,
  N=16, L in {4096, 16384} (quick: 256). Contenders: `chunk` (our parallel form as called by
  default: at these sizes its inference kernel runs under torch.compile, first-call compile time
  reported as setup; forward+backward uses the eager recomputing path), `chunk_eager`
  (`compile=False`), `recurrent` (the
  token loop, `mode="recurrent"`, the baseline and the exact column), `sdpa` (exact causal softmax
  attention of matching width, B=1, H=8, D=64 at the same L: what the mixer replaces).
  FLOPs: 6 B D L N (decay, input, state update, read-out per state element and token).
* ssd: Mamba-2's SSD, B=1, H=8, P=64, N=64, L in {4096, 16384}: `chunk`, `recurrent` (baseline,
  exact), `sdpa`. FLOPs as the scalar-decay chunk algorithm (C = 64): per chunk and head
  2 C^2 (N + P) + 4 C N P.
* longconv: FFT `long_conv` with a full-length kernel, B=1, D=512, L in {4096, 16384, 65536}:
  `fft` (ours), `conv1d` (direct depthwise `F.conv1d`, the baseline and exact column), `sdpa`.
  FLOPs: three real FFTs of n = 2L points (2.5 n log2 n each) and the spectral product (6 n/2),
  per channel.
* SDPA's output has another shape, so it sits in a companion case per L ("L=... vs sdpa", baseline
  `sdpa`) rather than in the case whose error column is taken against the reference.
* each workload also has a decoding case per L: our one-token step with a state after L tokens
  (`step`), against SDPA of one query over a KV cache of L tokens (`sdpa`, baseline). SSM steps cost
  the same at every L (the long-convolution step is O(D L_k) in its kernel length, here L_k = L).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ... import ssm
from ..case import Case

SIZES = {"mamba": (4096, 16384), "ssd": (4096, 16384), "longconv": (4096, 16384, 65536)}
QUICK = (256,)
SDPA_B, SDPA_H, SDPA_D = 1, 8, 64
MAMBA_D, MAMBA_N = 1024, 16
SSD_H, SSD_P, SSD_N = 8, 64, 64
LC_D = 512
# Above these lengths a single call takes well over 30 s on a 2-core CPU (measured: the token loop
# of `selective_scan` ~0.2 ms/token forward, its autograd graph holds O(L) step tensors; direct conv1d
# with a 65536-tap kernel is ~4.4e12 multiply-adds; causal SDPA at 65536 is ~2.2e12).
RECURRENT_BACKWARD_MAX_L = 4096
CONV1D_MAX_L = 16384
CONV1D_BACKWARD_MAX_L = 4096
SDPA_MAX_L = 16384


def _sdpa_inputs(L, gen, requires_grad):
    q, k, v = (torch.randn(SDPA_B, SDPA_H, L, SDPA_D, generator=gen).requires_grad_(requires_grad) for _ in range(3))
    return {"q": q, "k": k, "v": v}


def _sdpa(i):
    return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True)


def _sdpa_decode(i):
    return F.scaled_dot_product_attention(i["q1"], i["kc"], i["vc"])


def _decode_sdpa_inputs(L, gen):
    return {"q1": torch.randn(SDPA_B, SDPA_H, 1, SDPA_D, generator=gen),
            "kc": torch.randn(SDPA_B, SDPA_H, L, SDPA_D, generator=gen),
            "vc": torch.randn(SDPA_B, SDPA_H, L, SDPA_D, generator=gen)}


# ------------------------------------------------------------------------------------------ mamba

def _mamba_inputs(L, requires_grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Dm, N = MAMBA_D, MAMBA_N
    dt_bias = torch.exp(torch.rand(Dm, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    out = {"u": torch.randn(1, Dm, L, generator=gen), "delta": torch.randn(1, Dm, L, generator=gen) * 0.1,
           "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dm, 1),
           "B": torch.randn(1, N, L, generator=gen), "C": torch.randn(1, N, L, generator=gen),
           "D": torch.ones(Dm), "z": torch.randn(1, Dm, L, generator=gen),
           "delta_bias": dt_bias + torch.log(-torch.expm1(-dt_bias))}
    if requires_grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    out.update(_sdpa_inputs(L, gen, requires_grad))
    return out


def _mamba_call(mode, compile="auto"):
    return lambda i: ssm.selective_scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"],
                                        True, mode=mode, compile=compile)


def _timed_first_call(fn):
    """fn plus a record of its first call's duration (the torch.compile warm-up), for `setup_seconds`."""
    rec = {}

    def wrapped(i):
        if "s" in rec:
            return fn(i)
        t = time.perf_counter()
        out = fn(i)
        rec["s"] = time.perf_counter() - t
        return out
    return wrapped, (lambda: rec.get("s"))


def mamba_cases(quick: bool):
    cases = []
    for L in (QUICK if quick else SIZES["mamba"]):
        chunk, setup = _timed_first_call(_mamba_call("chunk"))
        contenders = {"chunk": chunk, "chunk_eager": _mamba_call("chunk", compile=False),
                      "recurrent": _mamba_call("recurrent")}
        fwd_only = {}
        if L > RECURRENT_BACKWARD_MAX_L:
            fwd_only["recurrent"] = (f"the token-loop oracle's autograd graph holds {L} step tensors; backward at "
                                     f"L={L} takes > 30 s on CPU")
        cases.append(Case("mamba", f"L={L}", {"B": 1, "D": MAMBA_D, "N": MAMBA_N, "L": L},
                          6.0 * MAMBA_D * L * MAMBA_N, lambda rg, L=L: _mamba_inputs(L, rg), contenders,
                          baseline="recurrent", exact="recurrent", forward_only=fwd_only,
                          setup_seconds={"chunk": setup}))
        chunk2, setup2 = _timed_first_call(_mamba_call("chunk"))
        cases.append(Case("mamba", f"L={L} vs sdpa", {"B": 1, "D": MAMBA_D, "N": MAMBA_N, "L": L, "vs": "sdpa"},
                          6.0 * MAMBA_D * L * MAMBA_N, lambda rg, L=L: _mamba_inputs(L, rg),
                          {"chunk": chunk2, "sdpa": _sdpa}, baseline="sdpa", setup_seconds={"chunk": setup2}))
        cases.append(_mamba_decode_case(L))
    return cases


def _mamba_decode_case(L):
    def make(rg, L=L):
        gen = torch.Generator().manual_seed(1)
        Dm, N = MAMBA_D, MAMBA_N
        i = {"state": torch.randn(1, Dm, N, generator=gen), "u": torch.randn(1, Dm, generator=gen),
             "delta": torch.randn(1, Dm, generator=gen) * 0.1, "A": -torch.arange(1, N + 1.0).repeat(Dm, 1),
             "B": torch.randn(1, N, generator=gen), "C": torch.randn(1, N, generator=gen), "D": torch.ones(Dm),
             "z": torch.randn(1, Dm, generator=gen), "delta_bias": torch.full((Dm,), -4.0)}
        i.update(_decode_sdpa_inputs(L, gen))
        return i
    step = lambda i: ssm.selective_scan_step(i["state"], i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"],
                                             i["delta_bias"], True)
    return Case("mamba", f"decode L={L}", {"B": 1, "D": MAMBA_D, "N": MAMBA_N, "L": L, "decode": True},
                6.0 * MAMBA_D * MAMBA_N, make, {"step": step, "sdpa": _sdpa_decode}, baseline="sdpa", backward=False)


# -------------------------------------------------------------------------------------------- ssd

def _ssd_inputs(L, requires_grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    H, P, N = SSD_H, SSD_P, SSD_N
    out = {"x": torch.randn(1, L, H, P, generator=gen), "dt": torch.rand(1, L, H, generator=gen) * 0.1,
           "A": -torch.rand(H, generator=gen) * 15 - 1, "B": torch.randn(1, L, 1, N, generator=gen) / N ** 0.5,
           "C": torch.randn(1, L, 1, N, generator=gen) / N ** 0.5, "D": torch.ones(H)}
    if requires_grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    out.update(_sdpa_inputs(L, gen, requires_grad))
    return out


def _ssd_call(mode):
    return lambda i: ssm.ssd(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], mode=mode)


def ssd_cases(quick: bool):
    cases = []
    C = 64
    for L in (QUICK if quick else SIZES["ssd"]):
        flops = SSD_H * (L / C) * (2 * C * C * (SSD_N + SSD_P) + 4 * C * SSD_N * SSD_P)
        cases.append(Case("ssd", f"L={L}", {"B": 1, "H": SSD_H, "P": SSD_P, "N": SSD_N, "L": L}, flops,
                          lambda rg, L=L: _ssd_inputs(L, rg),
                          {"chunk": _ssd_call("chunk"), "recurrent": _ssd_call("recurrent")},
                          baseline="recurrent", exact="recurrent"))
        cases.append(Case("ssd", f"L={L} vs sdpa", {"B": 1, "H": SSD_H, "P": SSD_P, "N": SSD_N, "L": L, "vs": "sdpa"},
                          flops, lambda rg, L=L: _ssd_inputs(L, rg), {"chunk": _ssd_call("chunk"), "sdpa": _sdpa},
                          baseline="sdpa"))

        def make(rg, L=L):
            gen = torch.Generator().manual_seed(1)
            H, P, N = SSD_H, SSD_P, SSD_N
            i = {"state": torch.randn(1, H, P, N, generator=gen), "x": torch.randn(1, H, P, generator=gen),
                 "dt": torch.rand(1, H, generator=gen) * 0.1, "A": -torch.rand(H, generator=gen) * 15 - 1,
                 "B": torch.randn(1, 1, N, generator=gen), "C": torch.randn(1, 1, N, generator=gen), "D": torch.ones(H)}
            i.update(_decode_sdpa_inputs(L, gen))
            return i
        step = lambda i: ssm.ssd_step(i["state"], i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"])
        cases.append(Case("ssd", f"decode L={L}", {"B": 1, "H": SSD_H, "P": SSD_P, "N": SSD_N, "L": L, "decode": True},
                          4.0 * SSD_H * SSD_P * SSD_N, make, {"step": step, "sdpa": _sdpa_decode}, baseline="sdpa",
                          backward=False))
    return cases


# ------------------------------------------------------------------------------------------ longconv

def _lc_inputs(L, requires_grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {"u": torch.randn(1, LC_D, L, generator=gen),
           "kernel": torch.randn(LC_D, L, generator=gen) * torch.exp(-torch.arange(L) / (L / 8)) / 8,
           "D": torch.ones(LC_D)}
    if requires_grad:
        out = {k: v.requires_grad_() for k, v in out.items()}
    if L <= SDPA_MAX_L:
        out.update(_sdpa_inputs(L, gen, requires_grad))
    return out


def _conv1d(i):
    return ssm.long_conv_ref(i["u"], i["kernel"], i["D"])


def _fft(i):
    return ssm.long_conv(i["u"], i["kernel"], i["D"])


def longconv_cases(quick: bool):
    cases = []
    for L in (QUICK if quick else SIZES["longconv"]):
        n = 2 * L
        flops = LC_D * (3 * 2.5 * n * math.log2(n) + 3 * n)
        contenders = {"fft": _fft}
        skip, fwd_only = {}, {}
        if L <= CONV1D_MAX_L:
            contenders["conv1d"] = _conv1d
            if L > CONV1D_BACKWARD_MAX_L:
                fwd_only["conv1d"] = (f"direct conv1d with a {L}-tap kernel takes minutes forward+backward on CPU "
                                      f"(forward alone > 30 s)")
        else:
            skip["conv1d"] = f"direct conv1d with a {L}-tap kernel is {LC_D * L * L / 2:.1e} multiply-adds (> 30 s on CPU)"
        if L > SDPA_MAX_L:
            skip["sdpa"] = f"causal SDPA at L={L} is {2 * SDPA_H * L * L * SDPA_D:.1e} FLOPs (> 30 s on CPU)"
        has_conv = "conv1d" in contenders
        cases.append(Case("longconv", f"L={L}", {"B": 1, "D": LC_D, "L": L}, flops,
                          lambda rg, L=L: _lc_inputs(L, rg), contenders,
                          baseline="conv1d" if has_conv else "fft", exact="conv1d" if has_conv else None, skip=skip,
                          forward_only=fwd_only))
        if L <= SDPA_MAX_L:
            cases.append(Case("longconv", f"L={L} vs sdpa", {"B": 1, "D": LC_D, "L": L, "vs": "sdpa"}, flops,
                              lambda rg, L=L: _lc_inputs(L, rg), {"fft": _fft, "sdpa": _sdpa}, baseline="sdpa"))

        def make(rg, L=L):
            gen = torch.Generator().manual_seed(1)
            st = ssm.LongConvState(torch.randn(1, LC_D, L, generator=gen), t=L)
            i = {"state": st, "u": torch.randn(1, LC_D, generator=gen),
                 "kernel": torch.randn(LC_D, L, generator=gen) / L, "D": torch.ones(LC_D)}
            i.update(_decode_sdpa_inputs(L, gen))
            return i
        step = lambda i: ssm.long_conv_step(i["u"], i["kernel"], i["state"], i["D"])
        cases.append(Case("longconv", f"decode L={L}", {"B": 1, "D": LC_D, "L": L, "L_k": L, "decode": True},
                          2.0 * LC_D * L, make, {"step": step, "sdpa": _sdpa_decode}, baseline="sdpa", backward=False))
    return cases


WORKLOADS = {"mamba": mamba_cases, "ssd": ssd_cases, "longconv": longconv_cases}
DESCRIPTIONS = {
    "mamba": "Mamba selective scan: chunked parallel scan vs the token loop vs causal SDPA; decode steps",
    "ssd": "Mamba-2 SSD (via retention): chunk vs recurrent vs causal SDPA; decode steps",
    "longconv": "FFT long convolution vs direct conv1d vs causal SDPA; streaming decode steps",
}
