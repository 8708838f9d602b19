"""Decoding workload: per-token step latency and KV-cache bytes at long context, exact vs TokenSelect,
PCA projection (r = D/2), int8 storage, and the linear-family recurrent step.

`WORKLOADS = {"decode": cases}`. B=1, H=8, D=64, fp32; context N in {1k, 8k, 32k, 128k} (H_kv = 8; at 128k
H_kv = 2, GQA), quick: N = 256 (H_kv = 8 and H_kv = 2, 4 steps per call). One contender call runs
`STEPS` = 8 consecutive one-token decoding steps (queries drift slightly from step to step, as
consecutive queries do), so per-token latency = forward time / 8. Appending the step's key/value is not timed (O(1) per step).

Contenders of the `decode` case (error column against `exact`):
- `exact`: `anyattn.decode` over a plain fp32 `KVCache` (baseline);
- `sdpa`: torch `scaled_dot_product_attention(q, K, V, enable_gqa=...)` on the same cache tensors (peer;
  no per-sequence lengths, no LSE);
- `tokenselect`: published defaults (n_init=128, n_local=512, k=2048, reuse cosine 0.9); the selection
  state is cleared at the start of each call, so each call makes one selection and then reuses it while
  the queries' cosine stays >= 0.9 (on this input: 1 selection + 7 reuses per 8 steps);
- `tokenselect_select`: the same, selecting at every step (reuse disabled): the worst case;
- `pca_r32`: PCA projection at r = D/2 for keys and values, bases calibrated on a separate sample from the
  same generator;
- `int8`: per-token, per-head absmax int8 keys and values.
Cache bytes per contender are in `params["cache_bytes"]` (bytes holding the N cached tokens).

A second case per context, `linear-family step`, times the recurrent one-token steps `gla_step` and
`gated_delta_rule_step` (state `(B, H, D, D)` fp32, whatever the context) against `exact_decode`
(baseline; no error column: they are different mixers). Their state bytes are in params.

The structured input (`concentrated`): per KV head a random orthonormal basis R; ordinary keys are
`mu_K + R (sigma * z)` with z ~ N(0, I) and a decaying spectrum `sigma_i = exp(-i / 8)` (low effective
rank, as LLM keys are); `N_NEEDLES = 16` needle positions (uniform in `[n_init, N - n_local)`) add
`C_NEEDLE = 32` times a unit direction u of the top-8 principal subspace; queries are `S_QUERY = 4` times
`(u + 0.02 noise)` per step, so the needles carry almost all the attention mass (the attention is
concentrated), and consecutive queries have cosine ~0.97. Values: `mu_V + R_V (sigma * z)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...cache import KVCache, TokenSelect, decode, fit_pca
from ..case import Case

B, H, D = 1, 8, 64
STEPS = 8
QUICK_STEPS = 4
CONTEXTS = ((1024, 8), (8192, 8), (32768, 8), (131072, 2))
QUICK_CONTEXTS = ((256, 8), (256, 2))
N_NEEDLES, C_NEEDLE, S_QUERY, SPECTRUM_DECAY = 16, 32.0, 4.0, 8.0
CALIBRATION_TOKENS = 4096
PUBLISHED = TokenSelect()  # 128, 512, 2048, 0.9


def _basis(gen, H_kv):
    return torch.linalg.qr(torch.randn(H_kv, D, D, generator=gen, dtype=torch.float64))[0].float()


def _tokens(gen, H_kv, N, R, mu):
    sigma = torch.exp(-torch.arange(D, dtype=torch.float32) / SPECTRUM_DECAY)
    z = torch.randn(B, H_kv, N, D, generator=gen) * sigma
    return z @ R.transpose(1, 2)[None] + mu[None, :, None]


def concentrated(N: int, H_kv: int, seed: int = 0, n_init: int = PUBLISHED.n_init, n_local: int = PUBLISHED.n_local):
    """The structured decoding input (see the module docstring). Returns dict with k `(B, H_kv, N, D)`, v, the
    per-step queries q `(STEPS, B, H, 1, D)`, needle positions, and calibration keys/values
    `(B, H_kv, CALIBRATION_TOKENS, D)` drawn from the same distribution (without needles)."""
    gen = torch.Generator().manual_seed(seed)
    Rk, Rv = _basis(gen, H_kv), _basis(gen, H_kv)
    mu_k, mu_v = 0.5 * torch.randn(H_kv, D, generator=gen), 0.5 * torch.randn(H_kv, D, generator=gen)
    k, v = _tokens(gen, H_kv, N, Rk, mu_k), _tokens(gen, H_kv, N, Rv, mu_v)
    mix = F.normalize(torch.randn(H_kv, 8, generator=gen), dim=-1)
    u = (Rk[:, :, :8] @ mix[..., None]).squeeze(-1)  # (H_kv, D) unit vectors in the top-8 subspace
    lo, hi = (n_init, N - n_local) if N - n_local - n_init > N_NEEDLES else (0, N)
    needles = lo + torch.randperm(hi - lo, generator=gen)[:N_NEEDLES]
    k[:, :, needles] += C_NEEDLE * u[None, :, None]
    G = H // H_kv
    uq = u.repeat_interleave(G, 0)  # (H, D)
    noise = torch.randn(STEPS, B, H, 1, D, generator=gen)
    q = S_QUERY * (uq[None, None, :, None] + 0.02 * noise)
    ck, cv = _tokens(gen, H_kv, CALIBRATION_TOKENS, Rk, mu_k), _tokens(gen, H_kv, CALIBRATION_TOKENS, Rv, mu_v)
    return {"k": k, "v": v, "q": q, "needles": needles, "calib_k": ck, "calib_v": cv}


def _steps(cache, q, policy=None, reset=False):
    if reset:
        cache.selection = None
    return torch.stack([decode(q[t], cache, policy=policy) for t in range(q.shape[0])])


def _sdpa_steps(x):
    c, q = x["cache"], x["q"]
    g = c.groups[0]
    L = c.max_length
    k, v = g.k[:, :, :L], g.v[:, :, :L]
    return torch.stack([F.scaled_dot_product_attention(q[t], k, v, enable_gqa=q.shape[2] != k.shape[1])
                        for t in range(q.shape[0])])


def _linear_inputs(H_kv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"q": r(STEPS, B, H, D), "k": F.normalize(r(STEPS, B, H, D), dim=-1), "v": r(STEPS, B, H, D),
            "g": F.logsigmoid(r(STEPS, B, H, D) + 3), "gs": F.logsigmoid(r(STEPS, B, H) + 3),
            "beta": torch.rand(STEPS, B, H, generator=gen), "S": r(B, H, D, D) * 0.1}


def _gla_steps(x):
    from ... import linear
    S, outs = x["S"], []
    for t in range(x["q"].shape[0]):
        o, S = linear.gla_step(x["q"][t], x["k"][t], x["v"][t], x["g"][t], S)
        outs.append(o)
    return torch.stack(outs)


def _gdn_steps(x):
    from ... import linear
    S, outs = x["S"], []
    for t in range(x["q"].shape[0]):
        o, S = linear.gated_delta_rule_step(x["q"][t], x["k"][t], x["v"][t], x["gs"][t], x["beta"][t], S)
        outs.append(o)
    return torch.stack(outs)


def _build(N, H_kv, what, steps=STEPS, dtype=torch.float32):
    """The case's inputs with caches, queries and states in `dtype` (the PCA bases are fitted in float32)."""
    data = concentrated(N, H_kv)
    k, v = data["k"].to(dtype), data["v"].to(dtype)
    cache = KVCache(B, H_kv, N, D, dtype=dtype)
    cache.append(k, v)
    out = {"q": data["q"][:steps].to(dtype), "cache": cache}
    if "pca" in what:
        proj = fit_pca(data["calib_k"], data["calib_v"]).with_ranks(D // 2)
        out["pca_cache"] = KVCache(B, H_kv, N, D, compress="pca", projection=proj, dtype=dtype)
        out["pca_cache"].append(k, v)
    if "int8" in what:
        out["int8_cache"] = KVCache(B, H_kv, N, D, quantize="int8", dtype=dtype)
        out["int8_cache"].append(k, v)
    if "linear" in what:
        out.update({"lin_" + a: (b[:steps] if a != "S" else b).to(dtype) for a, b in _linear_inputs(H_kv).items()})
    return out


def _cache_bytes(N, H_kv):
    per = {"exact": 2 * H_kv * D * 4, "int8": 2 * H_kv * (D + 4), "pca_r32": 2 * H_kv * (D // 2) * 4}
    out = {name: per_token * N for name, per_token in per.items()}
    out["sdpa"] = out["tokenselect"] = out["tokenselect_select"] = out["exact"]
    return out


def _lin(fn):
    return lambda x: fn({a[4:]: b for a, b in x.items() if a.startswith("lin_")})


def decode_case(N: int, H_kv: int, quick: bool, names=None, workload: str = "decode") -> Case:
    """The decode case at context N (`names`: the contenders to keep, default all; the caches they do not
    read are not built)."""
    steps = QUICK_STEPS if quick else STEPS
    pol = PUBLISHED if not quick else TokenSelect(n_init=16, n_local=32, k=64)
    always = TokenSelect(pol.n_init, pol.n_local, pol.k, reuse_threshold=2.0)
    attended = min(N, pol.n_init + pol.k + pol.n_local)
    flops = steps * B * H * 4 * N * D
    params = dict(B=B, H=H, H_kv=H_kv, N=N, D=D, steps_per_call=steps, dtype="float32",
                  tokenselect=dict(n_init=pol.n_init, n_local=pol.n_local, k=pol.k,
                                   reuse_threshold=pol.reuse_threshold, attended_tokens=attended),
                  pca_rank=D // 2, cache_bytes=_cache_bytes(N, H_kv),
                  input="concentrated: 16 needle keys aligned with the query + low-rank noise keys")
    contenders = {
        "exact": lambda x: _steps(x["cache"], x["q"], policy="exact"),
        "sdpa": _sdpa_steps,
        "tokenselect": lambda x, p=pol: _steps(x["cache"], x["q"], policy=p, reset=True),
        "tokenselect_select": lambda x, p=always: _steps(x["cache"], x["q"], policy=p, reset=True),
        "pca_r32": lambda x: _steps(x["pca_cache"], x["q"]),
        "int8": lambda x: _steps(x["int8_cache"], x["q"]),
    }
    if names is not None:
        contenders = {n: f for n, f in contenders.items() if n in names}
    what = tuple(w for w, n in (("pca", "pca_r32"), ("int8", "int8")) if n in contenders)
    return Case(workload=workload, label=f"decode N={N} H_kv={H_kv} ({steps} steps)", params=params,
                flops=flops, make_inputs=lambda rg: _build(N, H_kv, what, steps),
                contenders=contenders, baseline="exact", exact="exact", backward=False,
                make_inputs_dtype=lambda rg, dt: _build(N, H_kv, what, steps, dt))


def cases(quick: bool) -> list[Case]:
    out = []
    steps = QUICK_STEPS if quick else STEPS
    for N, H_kv in (QUICK_CONTEXTS if quick else CONTEXTS):
        out.append(decode_case(N, H_kv, quick))
        bytes_ = _cache_bytes(N, H_kv)
        state_bytes = B * H * D * D * 4
        lparams = dict(B=B, H=H, H_kv=H_kv, N=N, D=D, steps_per_call=steps, dtype="float32",
                       cache_bytes={"exact_decode": bytes_["exact"], "gla_step": state_bytes,
                                    "gated_delta_rule_step": state_bytes},
                       note="linear steps read a (B, H, D, D) state whatever N; different mixers, no error column")
        out.append(Case(workload="decode", label=f"linear-family step vs exact decode, N={N} H_kv={H_kv}",
                        params=lparams, flops=steps * B * H * 4 * D * D,
                        make_inputs=lambda rg, N=N, H_kv=H_kv: _build(N, H_kv, ("linear",), steps),
                        contenders={"exact_decode": lambda x: _steps(x["cache"], x["q"], policy="exact"),
                                    "gla_step": _lin(_gla_steps), "gated_delta_rule_step": _lin(_gdn_steps)},
                        baseline="exact_decode", exact=None, backward=False,
                        make_inputs_dtype=lambda rg, dt, N=N, H_kv=H_kv: _build(N, H_kv, ("linear",), steps, dt)))
    return out


WORKLOADS = {"decode": cases}
DESCRIPTIONS = {"decode": "KV-cache decoding: exact vs TokenSelect, PCA r=D/2, int8, and the linear-family step"}
