"""Structured, hierarchical and 2-D mixers (issue 16), B=1, H=8, D=64 fp32 unless said:

* combiner: causal Combiner-Fixed (segment sqrt(N)) against causal torch SDPA at N=16384, and alone at
  N=65536 (forward only: the 4N forward peak memory, subquadratic when within 8x of the N figure); a
  N=2048 case against the dense row-stochastic matrix (exact column, baseline combiner).
* local_global: 64x64 grid, window 8, 256 global tokens: `local_global_attention` (row-major tokens; and
  `morton`, tokens kept in Z-order, output un-permuted for the error column) against SDPA with the
  equivalent dense (N+M)^2 mask (baseline and exact column) and compiled FlexAttention with its block mask.
  Outputs are `[grid tokens; global tokens]` concatenated.
* chimera: 32 variates x 1024 steps, B=1, channels D x states N in {(64, 16), (8, 16), (4, 4)}: the row
  algorithm (`mode="rows"`, V scans on `selective_scan`) against the wavefront loop (`mode="wavefront"`,
  V + T - 1 steps vectorized over each anti-diagonal: baseline and exact column); at (8, 16) also the
  cell-by-cell double loop (forward only).
* simplicial: windowed 2-simplicial attention, w1 = w2 = 32, causal: N=256 in float64 against the dense
  trilinear loop (exact column); N in {2048, 4096, 8192} (linear in N: compare the forward times) with
  causal torch SDPA of the same shape for scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..case import Case
from ..peers import add_flex

DESCRIPTIONS = {
    "combiner": "Combiner-Fixed causal vs causal SDPA at N=16384 (+ N=65536 memory), B=1 H=8 D=64",
    "local_global": "local (8x8 windows on 64x64) + 256 global tokens vs dense-masked SDPA and FlexAttention",
    "chimera": "Chimera 2-D SSM, 32 variates x 1024 steps: row algorithm vs wavefront loop",
    "simplicial": "windowed 2-simplicial attention (32, 32): N=256 fp64 vs dense loop, N=2048..8192 (linearity)",
}

B, H, D = 1, 8, 64


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# ------------------------------------------------------------------------------------------- combiner
def _combiner_case(N, *, sdpa=True, matrix=False, backward=True, quick=False):
    from ...softmax.combiner import combiner, combiner_matrix, default_segment_size
    h, d = (2, 16) if quick else (H, D)
    s = default_segment_size(N)
    R = -(-N // s)

    def make(rg):
        g = torch.Generator().manual_seed(0)
        return {n: _randn(g, B, h, N, d).requires_grad_(rg) for n in "qkv"}

    contenders = {"combiner": lambda x: combiner(x["q"], x["k"], x["v"])}
    if sdpa:
        contenders["sdpa_causal"] = lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    if matrix:
        contenders["dense_matrix"] = lambda x: combiner_matrix(x["q"], x["k"]) @ x["v"]
    flops = 2.0 * B * h * N * (s + R) / 2 * 2 * d      # local (causal) + summaries (earlier segments), 2 matmuls
    case = Case("combiner", f"N={N} causal (segment {s})", {"B": B, "H": h, "D": d, "N": N, "segment": s},
                flops, make, contenders, baseline="sdpa_causal" if sdpa else "combiner",
                exact="dense_matrix" if matrix else None, backward=backward)
    if not sdpa:
        case.skip["sdpa_causal"] = ("another function (its error column would be meaningless): timed at N=16384"
                                    if matrix else f"causal SDPA at N={N} takes > 1 min per call on CPU; the speed "
                                    "figure is at N=16384")
    if matrix:
        case.forward_only["dense_matrix"] = "the oracle: dense N x N matrix"
    return case


def combiner_cases(quick: bool):
    if quick:
        return [_combiner_case(256, sdpa=False, matrix=True, quick=True), _combiner_case(256, quick=True)]
    return [_combiner_case(2048, sdpa=False, matrix=True), _combiner_case(16384),
            _combiner_case(65536, sdpa=False, backward=False)]


# --------------------------------------------------------------------------------------- local_global
def local_global_cases(quick: bool):
    from ...grid_order import grid_order
    from ...softmax.local_global import local_global_attention, local_global_mask
    grid, w, M = ((8, 8), 4, 8) if quick else ((64, 64), 8, 256)
    h, d = (2, 16) if quick else (H, D)
    N = grid[0] * grid[1]
    perm, inv = grid_order(*grid, "morton")
    mask = local_global_mask(grid, w, M)

    def make(rg):
        g = torch.Generator().manual_seed(0)
        x = {n: _randn(g, B, h, N, d).requires_grad_(rg) for n in "qkv"}
        x.update({n + "g": _randn(g, B, h, M, d).requires_grad_(rg) for n in "qkv"})
        return x

    def ours(x):
        out, out_g = local_global_attention(x["q"], x["k"], x["v"], x["qg"], x["kg"], x["vg"], grid=grid, window=w)
        return torch.cat([out, out_g], 2)

    def morton(x):
        q, k, v = (x[n].index_select(2, perm) for n in "qkv")
        out, out_g = local_global_attention(q, k, v, x["qg"], x["kg"], x["vg"], grid=grid, window=w, order="morton")
        return torch.cat([out.index_select(2, inv), out_g], 2)

    def joint(x):
        return (torch.cat([x["q"], x["qg"]], 2), torch.cat([x["k"], x["kg"]], 2), torch.cat([x["v"], x["vg"]], 2))

    def dense(x):
        return F.scaled_dot_product_attention(*joint(x), attn_mask=mask)

    flops = 2.0 * B * h * (N * (w * w + M) + M * M) * 2 * d
    case = Case("local_global", f"{grid[0]}x{grid[1]} window {w} + {M} global",
                {"B": B, "H": h, "D": d, "grid": list(grid), "window": w, "global": M}, flops, make,
                {"local_global": ours, "local_global_morton": morton, "sdpa_dense_mask": dense},
                baseline="sdpa_dense_mask", exact="sdpa_dense_mask")
    if quick:
        case.skip["flex"] = "not compiled in quick mode (compiling takes 10-40 s)"
    else:
        n_all = N + M
        add_flex(case, n_all, n_all, mask_mod=lambda b, hh, qi, ki: mask[qi, ki], prepare=joint)
    return [case]


# -------------------------------------------------------------------------------------------- chimera
def _chimera_inputs(Dm, N, V, T):
    def make(rg):
        g = torch.Generator().manual_seed(0)
        u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
        x = {"x": _randn(g, B, Dm, V, T), "dt": u(B, Dm, V, T) * 0.1 + 0.01, "dv": u(B, Dm, V, T) * 0.1 + 0.01,
             "A1": -u(Dm, N) * 2 - 0.1, "A2": _randn(g, Dm, N) * 0.3, "A3": _randn(g, Dm, N) * 0.3,
             "A4": -u(Dm, N) * 2 - 0.1}
        x.update({n: _randn(g, B, N, V, T) for n in ("B1", "B2", "C1", "C2")})
        x["D"] = _randn(g, Dm)
        return {k: t.requires_grad_(rg) for k, t in x.items()}
    return make


def _cell_loop(x):
    """The literal double loop over cells (v outer, t inner), one cell per step."""
    A1, A2, A3, A4 = x["A1"], x["A2"], x["A3"], x["A4"]
    Bs, Dm, V, T = x["x"].shape
    N = A1.shape[1]
    zero = x["x"].new_zeros(Bs, Dm, N)
    prev1, prev2 = [zero] * T, [zero] * T          # row v - 1
    rows = []
    for v in range(V):
        h1, h2, cur1, cur2, ys = zero, zero, [], [], []
        for t in range(T):
            a, b, xx = x["dt"][:, :, v, t, None], x["dv"][:, :, v, t, None], x["x"][:, :, v, t, None]
            h1 = torch.exp(a * A1) * h1 + a * (A2 * h2 + x["B1"][:, None, :, v, t] * xx)
            h2 = torch.exp(b * A4) * prev2[t] + b * (A3 * prev1[t] + x["B2"][:, None, :, v, t] * xx)
            cur1.append(h1)
            cur2.append(h2)
            ys.append((h1 * x["C1"][:, None, :, v, t]).sum(-1) + (h2 * x["C2"][:, None, :, v, t]).sum(-1))
        prev1, prev2 = cur1, cur2
        rows.append(torch.stack(ys, -1))
    return torch.stack(rows, 2) + x["D"][:, None, None] * x["x"]


def chimera_cases(quick: bool):
    from ...ssm.chimera import chimera
    V, T = (3, 16) if quick else (32, 1024)
    configs = [(4, 4)] if quick else [(64, 16), (8, 16), (4, 4)]
    cases = []
    for Dm, N in configs:
        def run(mode):
            return lambda x: chimera(x["x"], x["dt"], x["dv"], (x["A1"], x["A2"], x["A3"], x["A4"]), x["B1"], x["B2"],
                                     x["C1"], x["C2"], x["D"], mode=mode)
        contenders = {"rows": run("rows"), "wavefront": run("wavefront")}
        case = Case("chimera", f"V={V} T={T} D={Dm} N={N}", {"B": B, "V": V, "T": T, "D": Dm, "N": N},
                    20.0 * B * Dm * N * V * T, _chimera_inputs(Dm, N, V, T), contenders,
                    baseline="wavefront", exact="wavefront")
        if quick or (Dm, N) == (8, 16):
            contenders["cell_loop"] = _cell_loop
            case.forward_only["cell_loop"] = "V * T Python steps: timed forward only"
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------- simplicial
def _simplicial_case(N, w, dtype, *, ref, h, d):
    from ...softmax.simplicial import simplicial_attention, simplicial_attention_ref

    def make(rg):
        g = torch.Generator().manual_seed(0)
        return {n: _randn(g, B, h, N, d, dtype=dtype).requires_grad_(rg) for n in ("q", "k1", "k2", "v1", "v2")}

    args = lambda x: (x["q"], x["k1"], x["k2"], x["v1"], x["v2"])  # noqa: E731
    contenders = {"simplicial": lambda x: simplicial_attention(*args(x), window=(w, w))}
    if ref:
        contenders["dense_loop"] = lambda x: simplicial_attention_ref(*args(x), window=(w, w))
    else:
        contenders["sdpa_causal"] = lambda x: F.scaled_dot_product_attention(x["q"], x["k1"], x["v1"], is_causal=True)
    flops = 2.0 * B * h * N * w * w * 2 * d + B * h * N * w * d
    case = Case("simplicial", f"N={N} window ({w}, {w}) {str(dtype).replace('torch.', '')}",
                {"B": B, "H": h, "D": d, "N": N, "w1": w, "w2": w, "dtype": str(dtype)}, flops, make, contenders,
                baseline="dense_loop" if ref else "simplicial", exact="dense_loop" if ref else None)
    if ref:
        case.forward_only["dense_loop"] = "the oracle: N dense (N x N) trilinear forms"
    else:
        case.skip["dense_loop"] = "the dense loop is O(N^3 D): run at N=256 only"
    return case


def simplicial_cases(quick: bool):
    if quick:
        return [_simplicial_case(24, 4, torch.float64, ref=True, h=2, d=8), _simplicial_case(64, 4, torch.float32,
                                                                                              ref=False, h=2, d=8)]
    return [_simplicial_case(256, 32, torch.float64, ref=True, h=H, d=D)] + \
        [_simplicial_case(N, 32, torch.float32, ref=False, h=H, d=D) for N in (2048, 4096, 8192)]


WORKLOADS = {"combiner": combiner_cases, "local_global": local_global_cases, "chimera": chimera_cases,
             "simplicial": simplicial_cases}
