"""Shared input makers for tests/linear: one table of methods with their gates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anyattn import linear as L


def _lin(q, k, v, g, beta, **kw):
    return L.linear_attention(q, k, v, feature_map=None, **kw)


def _lin_step(q, k, v, g, beta, state, **kw):
    return L.linear_attention_step(q, k, v, state, feature_map=None, **kw)


def _ret(q, k, v, g, beta, **kw):
    return L.retention(q, k, v, g, **kw)


def _ret_step(q, k, v, g, beta, state, **kw):
    return L.retention_step(q, k, v, g, state, **kw)


def _light(q, k, v, g, beta, **kw):
    return L.lightning(q, k, v, g, **kw)


def _light_step(q, k, v, g, beta, state, **kw):
    return L.lightning_step(q, k, v, state, g, **kw)


def _gla(q, k, v, g, beta, **kw):
    return L.gla(q, k, v, g, **kw)


def _gla_step(q, k, v, g, beta, state, **kw):
    return L.gla_step(q, k, v, g, state, **kw)


def _delta(q, k, v, g, beta, **kw):
    return L.delta_rule(q, k, v, beta, **kw)


def _delta_step(q, k, v, g, beta, state, **kw):
    return L.delta_rule_step(q, k, v, beta, state, **kw)


def _gdn(q, k, v, g, beta, **kw):
    return L.gated_delta_rule(q, k, v, g, beta, **kw)


def _gdn_step(q, k, v, g, beta, state, **kw):
    return L.gated_delta_rule_step(q, k, v, g, beta, state, **kw)


def _kda(q, k, v, g, beta, **kw):
    return L.kda(q, k, v, g, beta, **kw)


def _kda_step(q, k, v, g, beta, state, **kw):
    return L.kda_step(q, k, v, g, beta, state, **kw)


# name -> (full fn, step fn, g kind: None | "head" | "token" | "slopes" | "vector", uses beta)
METHODS = {
    "linear": (_lin, _lin_step, None, False),
    "retention_head": (_ret, _ret_step, "head", False),
    "retention": (_ret, _ret_step, "token", False),
    "lightning": (_light, _light_step, "slopes", False),
    "gla": (_gla, _gla_step, "vector", False),
    "delta_rule": (_delta, _delta_step, None, True),
    "gated_delta_rule": (_gdn, _gdn_step, "token", True),
    "kda": (_kda, _kda_step, "vector", True),
}


def make_inputs(method, B=2, H=2, N=17, K=8, V=6, dtype=torch.float64, seed=0, strength=1.0,
                initial_state=True, requires_grad=False, groups=1):
    """Random inputs for a METHODS entry. Keys are L2-normalized for the delta family.
    strength scales the log-decays (g roughly in [-strength * 2, 0]). groups: query heads per
    key/value head (q gets H * groups heads; k, v, gates and state H)."""
    gen = torch.Generator().manual_seed(seed)
    _, _, gkind, uses_beta = METHODS[method]

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q, k, v = rn(B, H * groups, N, K), rn(B, H, N, K), rn(B, H, N, V)
    if uses_beta:
        k = F.normalize(k, dim=-1)
        q = F.normalize(q, dim=-1)
    else:
        q, k = q * 0.5, k * 0.5
    g = None
    if gkind == "head":
        g = -torch.rand(H, generator=gen, dtype=torch.float64) * strength
    elif gkind == "token":
        g = F.logsigmoid(rn(B, H, N) + 1.0) * strength
    elif gkind == "vector":
        g = F.logsigmoid(rn(B, H, N, K) + 1.0) * strength
    elif gkind == "slopes":
        g = torch.rand(H, generator=gen, dtype=torch.float64) * strength + 0.01
    beta = torch.rand(B, H, N, generator=gen, dtype=torch.float64) if uses_beta else None
    S0 = rn(B, H, K, V) * 0.5 if initial_state else None
    out = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=S0)
    for name, x in out.items():
        if x is None:
            continue
        x = x.to(dtype if name in ("q", "k", "v") else (torch.float64 if dtype == torch.float64 else torch.float32))
        if requires_grad:
            x.requires_grad_(True)
        out[name] = x
    return out


def call(method, inp, **kw):
    fn = METHODS[method][0]
    return fn(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], initial_state=inp["initial_state"], **kw)


def step_inputs(method, inp, t):
    gkind = METHODS[method][2]
    g = inp["g"]
    if gkind in ("token", "vector"):
        g = g[:, :, t]
    beta = None if inp["beta"] is None else inp["beta"][:, :, t]
    return inp["q"][:, :, t], inp["k"][:, :, t], inp["v"][:, :, t], g, beta
