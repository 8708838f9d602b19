"""Benchmark workloads of the linear-attention / delta-rule family (`anyattn.linear`).

One module, several workloads: `WORKLOADS = {"gla": ..., "gdn": ..., "kda": ..., "retention": ...,
"linear": ..., "mom": ...}`, each `cases(quick: bool) -> list[Case]`.

`mom` (Mixture-of-Memories, 4 memories routed top-2 plus a shared memory, as published): `chunk`
against `dense_all_memories` (Gated DeltaNet running all 5 memories on every token: the work routing
saves; a different function, so no error column), the token loop `recurrent` (the exact column, up
to N=4096) and causal SDPA (baseline).

Per workload and N (B=1, H=8, D=64; N in {4096, 16384}, quick: {256}):

* a training-shape case: contenders `chunk` (our chunk forward), `sdpa` (exact causal softmax
  attention, `F.scaled_dot_product_attention(q, k, v, is_causal=True)`, the baseline: what the mixer
  replaces), and flash-linear-attention's pure-PyTorch references `fla_naive_chunk` /
  `fla_naive_recurrent` when fla-core is installed (else listed in `missing` with the reason). The
  error column is taken against `fla_naive_chunk` (or `fla_naive_recurrent`) when present.
* a decoding case at N in {1024, 32768} (quick: 256): DECODE_STEPS = 8 consecutive `*_step` calls
  (the state carried along), against 8 one-query SDPA calls over a KV cache of N tokens (`sdpa`,
  baseline); time per token = time / 8. The step does the same work at every N.

FLOPs (useful work of the chunk algorithm, chunk C = 64, per (batch, head), K = D_k, V = D_v;
a (m,k)x(k,n) matmul counts 2mkn):
  decay family (linear, retention, GLA), per chunk: intra `Q K^T` and `A V`: 2 C^2 (K + V);
      state update `K^T V` and inter-chunk read `Q S`: 4 C K V.
  delta family (DeltaNet, Gated DeltaNet, KDA), per chunk: `Q K^T`, `K K^T`: 4 C^2 K;
      triangular solve for W, U: C^2 (K + V); `A_qk Ṽ`: 2 C^2 V; `W S`, `K^T Ṽ`, `Q S`: 6 C K V.
  times N / C chunks, B and H. Decoding: 4 K V per head (decay) or 6 K V (delta) per step, times
  the 8 steps (the SDPA contender is timed on the same case).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import linear as L
from ..case import Case

B, H, D = 1, 8, 64
C = 64
SIZES = (4096, 16384)
DECODE_SIZES = (1024, 32768)   # the step's cost must not grow with the context
QUICK_SIZES = (256,)
# fla's references loop in Python over tokens (naive_recurrent_*) or over chunks and the rows of a
# chunk (naive_chunk_*; naive_chunk_kda also over the tokens of each chunk). Measured on the 2-core
# CPU (shared, one forward at N=16384): naive_recurrent_* 45-210 s, naive_chunk_kda 62 s;
# naive_chunk_gated_delta_rule 13 s, naive_chunk_simple_gla 16 s, naive_chunk_linear_attn 1 s.
# Those above 30 s are skipped at N=16384 with that reason.
FLA_RECURRENT_MAX_N = 4096
FLA_CHUNK_MAX_N = {"kda": 4096, "gdn": 16384, "retention": 16384, "linear": 16384, "gla": 0}
# fla_naive_chunk forward+backward is timed up to this N (backward at N=4096: 0.05-0.5 s, kda 4.7 s;
# at N=16384 gdn 7 s, retention 3 s); fla_naive_recurrent is timed forward only.
FLA_CHUNK_BWD_MAX_N = 4096


def _decay_flops(N, K=D, V=D):
    return B * H * (N / C) * (2 * C * C * (K + V) + 4 * C * K * V)


def _delta_flops(N, K=D, V=D):
    return B * H * (N / C) * (4 * C * C * K + C * C * (K + V) + 2 * C * C * V + 6 * C * K * V)


def _fla(op):
    try:
        from ...linear.fla_reference import load_naive
        return load_naive(op), None
    except Exception as e:  # noqa: BLE001
        return None, f"fla-core reference fla/ops/{op}/naive.py unavailable: {type(e).__name__}: {e}"


def _bt(x):
    return x.transpose(1, 2)


def _inputs(kind: str, N: int, requires_grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    out = {}
    if kind in ("gdn", "kda"):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        out["beta"] = torch.rand(B, H, N, generator=gen)
    if kind == "gla" or kind == "kda":
        out["g"] = F.logsigmoid(torch.randn(B, H, N, D, generator=gen) + 2.0)
    elif kind == "gdn":
        out["g"] = F.logsigmoid(torch.randn(B, H, N, generator=gen) + 2.0)
    elif kind == "retention":
        out["g"] = -L.alibi_slopes(H)
    out.update(q=q, k=k, v=v)
    if requires_grad:
        for name in ("q", "k", "v", "g", "beta"):
            if name in out and not (kind == "retention" and name == "g"):
                out[name] = out[name].detach().requires_grad_()
    return out


def _ours(kind):
    if kind == "gla":
        return lambda i: L.gla(i["q"], i["k"], i["v"], i["g"])
    if kind == "gdn":
        return lambda i: L.gated_delta_rule(i["q"], i["k"], i["v"], i["g"], i["beta"])
    if kind == "kda":
        return lambda i: L.kda(i["q"], i["k"], i["v"], i["g"], i["beta"])
    if kind == "retention":
        return lambda i: L.retention(i["q"], i["k"], i["v"], i["g"])
    return lambda i: L.linear_attention(i["q"], i["k"], i["v"], feature_map="elu1")


def _sdpa(i):
    return F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True)


def _retention_g(i, N):
    return i["g"].view(1, H, 1).expand(B, H, N)


def _peers(kind, N):
    """name -> fn for fla's references, plus missing / skip dicts."""
    peers, missing, skip = {}, {}, {}
    op = {"gla": "gla", "gdn": "gated_delta_rule", "kda": "kda", "retention": "simple_gla",
          "linear": "linear_attn"}[kind]
    mod, why = _fla(op)
    names = ("fla_naive_chunk", "fla_naive_recurrent") if kind != "gla" else ("fla_naive_recurrent",)
    if kind == "gla":
        missing["fla_naive_chunk"] = "fla-core has no naive_chunk_gla (only naive_recurrent_gla)"
    if mod is None:
        for n in names:
            missing[n] = why
        return peers, missing, skip
    if kind == "gdn":
        peers["fla_naive_chunk"] = lambda i: mod.naive_chunk_gated_delta_rule(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(i["g"]), _bt(i["beta"]))[0]
        peers["fla_naive_recurrent"] = lambda i: mod.naive_recurrent_gated_delta_rule(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(i["beta"]), _bt(i["g"]))[0]
    elif kind == "kda":
        peers["fla_naive_chunk"] = lambda i: mod.naive_chunk_kda(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(i["g"]), _bt(i["beta"]))[0]
        peers["fla_naive_recurrent"] = lambda i: mod.naive_recurrent_kda(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(i["g"]), _bt(i["beta"]))[0]
    elif kind == "gla":
        peers["fla_naive_recurrent"] = lambda i: mod.naive_recurrent_gla(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(i["g"]))[0]
    elif kind == "retention":
        peers["fla_naive_chunk"] = lambda i: mod.naive_chunk_simple_gla(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(_retention_g(i, N)))[0]
        peers["fla_naive_recurrent"] = lambda i: mod.naive_recurrent_simple_gla(
            _bt(i["q"]), _bt(i["k"]), _bt(i["v"]), _bt(_retention_g(i, N)))[0]
    else:
        fm = lambda x: F.elu(x) + 1  # noqa: E731
        peers["fla_naive_chunk"] = lambda i: mod.naive_chunk_linear_attn(
            _bt(fm(i["q"])), _bt(fm(i["k"])), _bt(i["v"]))
        peers["fla_naive_recurrent"] = lambda i: mod.naive_recurrent_linear_attn(
            _bt(fm(i["q"])), _bt(fm(i["k"])), _bt(i["v"]))[0]
    # fla's outputs are (B, T, H, D): bring them to (B, H, T, D) so the error column compares like with like.
    peers = {n: (lambda f: (lambda i: _bt(f(i))))(f) for n, f in peers.items()}
    if N > FLA_CHUNK_MAX_N[kind] and "fla_naive_chunk" in peers:
        skip["fla_naive_chunk"] = (f"fla's naive_chunk_kda takes > 30 s per forward at N={N} on a 2-core CPU "
                                   "(Python loop over the tokens of every chunk)")
        del peers["fla_naive_chunk"]
    if N > FLA_RECURRENT_MAX_N and "fla_naive_recurrent" in peers:
        skip["fla_naive_recurrent"] = (f"fla's token-by-token reference takes > 30 s per forward at N={N} "
                                       "on a 2-core CPU")
        del peers["fla_naive_recurrent"]
    return peers, missing, skip


def _train_case(kind, N):
    contenders = {"chunk": _ours(kind), "sdpa": _sdpa}
    peers, missing, skip = _peers(kind, N)
    contenders.update(peers)
    exact = "fla_naive_chunk" if "fla_naive_chunk" in peers else (
        "fla_naive_recurrent" if "fla_naive_recurrent" in peers else None)
    flops = _delta_flops(N) if kind in ("gdn", "kda") else _decay_flops(N)
    forward_only = {}
    if "fla_naive_recurrent" in peers:
        forward_only["fla_naive_recurrent"] = ("its backward runs through N Python token steps: 7-13 s at N=4096 "
                                               "on the 2-core CPU")
    if "fla_naive_chunk" in peers and N > FLA_CHUNK_BWD_MAX_N:
        forward_only["fla_naive_chunk"] = f"its backward takes 3-7 s at N={N} on the 2-core CPU"
    return Case(workload=kind, label=f"N={N} causal", params=dict(B=B, H=H, N=N, D=D, chunk_size=C),
                flops=flops, make_inputs=lambda rg, _k=kind, _n=N: _inputs(_k, _n, rg),
                contenders=contenders, baseline="sdpa", exact=exact, backward=True,
                forward_only=forward_only, missing=missing, skip=skip)


DECODE_STEPS = 8   # consecutive tokens per timed call, as in a decoding loop


def _decode_inputs(kind, N, requires_grad):
    gen = torch.Generator().manual_seed(1)
    i = _inputs(kind, DECODE_STEPS, False, seed=2)                   # per-token inputs (B, H, steps, ...)
    i["state"] = torch.randn(B, H, D, D, generator=gen) * 0.1
    i["k_cache"] = torch.randn(B, H, N, D, generator=gen)
    i["v_cache"] = torch.randn(B, H, N, D, generator=gen)
    return i


def _at(kind, i, t):
    """Token t's inputs (retention's g is per head, the same at every step)."""
    return {n: (x[:, :, t] if n in ("q", "k", "v", "beta") or (n == "g" and kind != "retention") else x)
            for n, x in i.items() if n not in ("state", "k_cache", "v_cache")}


def _one_step(kind):
    if kind == "gla":
        return lambda x, S: L.gla_step(x["q"], x["k"], x["v"], x["g"], S)
    if kind == "gdn":
        return lambda x, S: L.gated_delta_rule_step(x["q"], x["k"], x["v"], x["g"], x["beta"], S)
    if kind == "kda":
        return lambda x, S: L.kda_step(x["q"], x["k"], x["v"], x["g"], x["beta"], S)
    if kind == "retention":
        return lambda x, S: L.retention_step(x["q"], x["k"], x["v"], x["g"], S)
    return lambda x, S: L.linear_attention_step(x["q"], x["k"], x["v"], S, "elu1")


def _step(kind):
    """DECODE_STEPS consecutive `*_step` calls, the state carried from one to the next."""
    one = _one_step(kind)

    def run(i):
        S, outs = i["state"], []
        for t in range(DECODE_STEPS):
            o, S = one(_at(kind, i, t), S)
            outs.append(o)
        return torch.stack(outs, 2)
    return run


def _sdpa_decode(i):
    """DECODE_STEPS one-query SDPA calls over the KV cache of N tokens (one per decoded token)."""
    return torch.stack([F.scaled_dot_product_attention(i["q"][:, :, t:t + 1], i["k_cache"], i["v_cache"])[:, :, 0]
                        for t in range(DECODE_STEPS)], 2)


def _decode_case(kind, N):
    per_head = (6 if kind in ("gdn", "kda") else 4) * D * D
    return Case(workload=kind, label=f"decode {DECODE_STEPS} tokens, context N={N}",
                params=dict(B=B, H=H, N=N, D=D, decode=True, steps=DECODE_STEPS),
                flops=B * H * per_head * DECODE_STEPS, make_inputs=lambda rg, _k=kind, _n=N: _decode_inputs(_k, _n, rg),
                contenders={"step": _step(kind), "sdpa": _sdpa_decode}, baseline="sdpa", exact=None,
                backward=False)


MOM_MEMORIES, MOM_TOP_K = 4, 2    # MoM's published setting: 4 memories, top-2, plus the shared memory


def _mom_inputs(N, requires_grad):
    """q (B, H, N, D); per memory (4 routed + 1 shared) k, v, g, beta; router weights (B, N, 5): top-2
    softmax over the 4 routed memories, 1 for the shared one."""
    gen = torch.Generator().manual_seed(3)
    M = MOM_MEMORIES + 1
    q = F.normalize(torch.randn(B, H, N, D, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, H, M, N, D, generator=gen), dim=-1)
    v = torch.randn(B, H, M, N, D, generator=gen)
    g = F.logsigmoid(torch.randn(B, H, M, N, generator=gen) + 2.0)
    beta = torch.rand(B, H, M, N, generator=gen)
    top = torch.randn(B, N, MOM_MEMORIES, generator=gen).topk(MOM_TOP_K, dim=-1)
    routed = torch.zeros(B, N, MOM_MEMORIES).scatter(-1, top.indices, top.values.softmax(-1))
    out = dict(q=q, k=k, v=v, g=g, beta=beta, w=torch.cat([routed, torch.ones(B, N, 1)], -1))
    if requires_grad:
        for name in ("q", "k", "v", "g", "beta"):
            out[name] = out[name].requires_grad_()
    return out


def _mom_case(N):
    M = MOM_MEMORIES + 1

    def mom(mode):
        return lambda i: L.mom(i["q"], i["k"], i["v"], i["g"], i["beta"], i["w"], mode=mode)

    def dense(i):   # every memory on every token: the work routing avoids (a different function)
        return L.gated_delta_rule(i["q"].repeat_interleave(M, 1), i["k"].flatten(1, 2), i["v"].flatten(1, 2),
                                  i["g"].flatten(1, 2), i["beta"].flatten(1, 2))

    def sdpa(i):    # exact causal softmax attention on the first memory's keys and values
        return F.scaled_dot_product_attention(i["q"], i["k"][:, :, 0], i["v"][:, :, 0], is_causal=True)

    contenders = {"chunk": mom("chunk"), "dense_all_memories": dense, "sdpa": sdpa}
    skip = {}
    if N <= FLA_RECURRENT_MAX_N:
        contenders["recurrent"] = mom("recurrent")
    else:
        skip["recurrent"] = f"the token loop takes > 30 s per forward at N={N} on a 2-core CPU"
    return Case(workload="mom", label=f"N={N} causal, {MOM_MEMORIES} memories top-{MOM_TOP_K} + shared",
                params=dict(B=B, H=H, N=N, D=D, memories=MOM_MEMORIES, top_k=MOM_TOP_K, shared=1, chunk_size=C),
                flops=_delta_flops(N) * (MOM_TOP_K + 1), make_inputs=lambda rg, _n=N: _mom_inputs(_n, rg),
                contenders=contenders, baseline="sdpa", exact="recurrent" if "recurrent" in contenders else None,
                backward=True, forward_only={"recurrent": "the token loop's backward is slow"},
                missing={"fla_mom": "fla's MoM is a Triton layer (fla.layers.MomAttention): no CPU path"}, skip=skip)


def _mom_cases(quick: bool) -> list[Case]:
    return [_mom_case(N) for N in (QUICK_SIZES if quick else SIZES)]


def _cases_fn(kind):
    def cases(quick: bool) -> list[Case]:
        sizes, decode_sizes = (QUICK_SIZES, QUICK_SIZES) if quick else (SIZES, DECODE_SIZES)
        return [_train_case(kind, N) for N in sizes] + [_decode_case(kind, N) for N in decode_sizes]
    cases.__doc__ = f"Cases of the {kind!r} linear-family workload."
    return cases


WORKLOADS = {kind: _cases_fn(kind) for kind in ("gla", "gdn", "kda", "retention", "linear")}
WORKLOADS["mom"] = _mom_cases
DESCRIPTIONS = {
    "gla": "Gated Linear Attention chunk forward vs causal SDPA and fla references; decode step",
    "gdn": "Gated DeltaNet chunk forward vs causal SDPA and fla references; decode step",
    "kda": "Kimi Delta Attention chunk forward vs causal SDPA and fla references; decode step",
    "retention": "Retention (scalar decay) chunk forward vs causal SDPA and fla references; decode step",
    "linear": "Linear attention (elu+1) chunk forward vs causal SDPA and fla references; decode step",
    "mom": "Mixture-of-Memories (4 memories, top-2 + shared) chunk forward vs every memory on every token and SDPA",
}
