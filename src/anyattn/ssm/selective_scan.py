"""Mamba's selective scan (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
2023), with the argument conventions of `mamba_ssm.ops.selective_scan_interface.selective_scan_fn`.

    x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t        (per channel d: a state of N numbers)
    y_t = C_t . x_t + D u_t,   then  y *= silu(z)

Chunked parallel form (`mode="chunk"`, the default). Each (d, n) pair is a scalar-decay linear
recurrence whose log-decay `delta_t[d] A[d, n]` is an outer product, so cumulative decays inside a chunk
are `A[d, n] S_t[d]` with `S` the in-chunk cumulative sum of delta (a `(D, L)` cumsum, not `(D, L, N)`).
Inside a chunk of T tokens, with `E_t = exp(A (S_t - S_mid))` taken relative to the chunk's middle token:

    local_t = E_t * cumsum_s(delta_s u_s B_s / E_s)                 (the state from this chunk's inputs)
    y_t     = sum_n C_t E_t (local_t + exp(A S_mid) x_start)         (x_start: state entering the chunk)

Chunk states are combined by a log-depth scan over the chunk axis (decays multiplied in log space).
Channels are processed in blocks so that the `(block, L, N)` temporaries stay in cache; with gradients,
each block is recomputed in backward (activation checkpointing), so memory is `O(B D L)` plus one block.
The factorization needs `|A| * (delta summed over a chunk)` to stay below a dtype limit (60 in fp32,
600 in fp64); the chunk size is halved until it does (down to 1, which is exact), so any input is safe.
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.nn.functional as F

from ..backends import Choice
from ..backends import mamba as mamba_backend
from ..backward_switch import use_autograd
from ._checks import check_float, check_mode, check_positive_int, check_shape, check_tensor, compute_dtype
from .recurrent import selective_scan_recurrent_core

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref", "backend_choice"]

_SPAN_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
_LOG_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
_BLOCK_ELEMS = 1 << 20           # elements of one (block, L, N) temporary (eager)
_BLOCK_ELEMS_COMPILED = 1 << 19  # ... under torch.compile (measured best on a 2-core CPU)


def _chunk_block(u, dt, A, Bc, Cc, h0, T: int):
    """One block of channels. u/dt `(B, g, db, nc, T)`, A `(g, db, N)`, Bc/Cc `(B, g, 1, nc, T, N)`,
    h0 `(B, g, db, N)` or None. Returns y `(B, g, db, nc, T)` and the last state `(B, g, db, N)`."""
    m = (T - 1) // 2
    S = dt.cumsum(-1)                                   # in-chunk cumulative delta (inclusive)
    Smid = S[..., m:m + 1]
    Ae = A[None, :, :, None, :]                         # (1, g, db, 1, N)
    E = torch.exp((S - Smid).unsqueeze(-1) * Ae.unsqueeze(-2))
    W = (dt * u).unsqueeze(-1) * Bc / E
    cs = W.cumsum(-2)                                   # (B, g, db, nc, T, N)
    # chunk-level scan: state after chunk c (from zero) and the log-decay across chunks. (The chunk-end
    # state is formed from small tensors: slicing the big ones would cost full-size zero-filled grads.)
    b = torch.exp((S[..., -1:] - Smid) * Ae) * W.sum(-2)
    start, last = _chunk_scan_states(b, S[..., -1:] * Ae, h0, _LOG_FLOOR[u.dtype])
    xs = start * torch.exp(Smid * Ae)                  # (B, g, db, nc, N)
    y = ((cs + xs.unsqueeze(-2)) * (Cc * E)).sum(-1)
    return y, last


def _chunk_scan_states(b, la, h0, floor):
    """Inclusive log-depth scan over chunks: b `(..., nc, N)` chunk-local end states, la `(..., nc, N)`
    chunk log-decays. Returns the states entering each chunk and the last state."""
    nc = b.shape[-2]
    k = 1
    while k < nc:
        b = torch.cat([b[..., :k, :], b[..., k:, :] + torch.exp(la[..., k:, :].clamp(min=floor)) * b[..., :-k, :]], -2)
        la = torch.cat([la[..., :k, :], la[..., k:, :] + la[..., :-k, :]], -2)
        k *= 2
    start = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., :-1, :]], -2)
    if h0 is None:
        return start, b[..., -1, :]
    pre = torch.cat([torch.zeros_like(la[..., :1, :]), la[..., :-1, :]], -2)
    start = start + torch.exp(pre.clamp(min=floor)) * h0.unsqueeze(-2)
    return start, b[..., -1, :] + torch.exp(la[..., -1, :].clamp(min=floor)) * h0


def _chunk_block_nograd(u, dt, A, Bc, Cc, h0, T: int, start_out=None):
    """`_chunk_block` for inference: the same arithmetic with two in-place `(block, L, N)` buffers.
    `start_out` `(B, g, db, nc, N)`: receives the states entering each chunk (kept for the backward)."""
    m = (T - 1) // 2
    S = dt.cumsum(-1)
    Smid = S[..., m:m + 1]
    Ae = A[None, :, :, None, :]
    X = torch.mul((S - Smid).unsqueeze(-1), Ae.unsqueeze(-2))
    X.exp_()                                            # E
    Y = torch.mul((dt * u).unsqueeze(-1), Bc)
    Y.div_(X)                                           # W = delta u B / E
    b = torch.exp((S[..., -1:] - Smid) * Ae) * Y.sum(-2)  # chunk-local end states
    start, last = _chunk_scan_states(b, S[..., -1:] * Ae, h0, _LOG_FLOOR[u.dtype])
    if start_out is not None:
        start_out.copy_(start)
    Y[..., 0, :] += start * torch.exp(Smid * Ae)        # the entering state, carried by the cumsum
    Y.cumsum_(-2)
    X.mul_(Cc).mul_(Y)
    y = X.sum(-1)
    return y, last


def _chunk_block_functional(u, dt, A, Bc, Cc, h0, T: int):
    """`_chunk_block` written without big-tensor slicing, for `torch.compile` (inference)."""
    m = (T - 1) // 2
    S = dt.cumsum(-1)
    Smid = S[..., m:m + 1]
    Ae = A[None, :, :, None, :]
    E = torch.exp((S - Smid).unsqueeze(-1) * Ae.unsqueeze(-2))
    cs = ((dt * u).unsqueeze(-1) * Bc / E).cumsum(-2)
    b = torch.exp((S[..., -1:] - Smid) * Ae) * cs[..., -1, :]
    start, last = _chunk_scan_states(b, S[..., -1:] * Ae, h0, _LOG_FLOOR[u.dtype])
    y = ((cs + (start * torch.exp(Smid * Ae)).unsqueeze(-2)) * (Cc * E)).sum(-1)
    return y, last


_COMPILED = {}
_AUTO_COMPILE_ELEMS = 1 << 24   # compile="auto": CPU inference calls with B*D*L*N at least this


def _auto_compile_ok(device) -> bool:
    """compile="auto" applies on CPU when torch.compile and a C++ compiler are there (inductor's CPU
    backend), unless ANYATTN_NO_COMPILE=1."""
    if device.type != "cpu" or os.environ.get("ANYATTN_NO_COMPILE", "") not in ("", "0"):
        return False
    if "cxx" not in _COMPILED:
        _COMPILED["cxx"] = hasattr(torch, "compile") and any(
            shutil.which(c) for c in ("g++", "c++", "clang++"))
    return _COMPILED["cxx"]


def _compiled_block():
    """The inference block under `torch.compile` (fused elementwise kernels); None if unavailable."""
    if "fn" not in _COMPILED:
        try:
            _COMPILED["fn"] = torch.compile(_chunk_block_functional, dynamic=False)
        except Exception:  # noqa: BLE001 - no compiler: the eager path is used
            _COMPILED["fn"] = None
    return _COMPILED["fn"]


def _chunk_block_backward(u, dt, A, Bc, Cc, start, T: int, gy, glast):
    """Gradients of `_chunk_block` (shapes as there; `start` `(B, g, db, nc, N)` the states entering each
    chunk, from the forward) for the cotangents gy `(B, g, db, nc, T)` and glast `(B, g, db, N)`:
    (du, ddt, dA, dBc, dCc, dh0). Recomputes the states h_t chunkwise, then the adjoint
    states λ_t = dL/dh_t by the same chunked scan run backwards in time:

        λ_t = C_t gy_t + exp(Δ_{t+1} A) λ_{t+1}      (λ after the last token: glast)
        d(Δ_t u_t B_t) = λ_t,   dC_t = Σ_d gy_t h_t,   and with ℓ_t = Δ_t A:  dℓ_t = λ_t (h_t - Δ_t u_t B_t)
        (= λ_t exp(ℓ_t) h_{t-1}), dΔ_t = Σ_n (A dℓ_t + u_t B_t λ_t),  dA = Σ_t Δ_t dℓ_t.

    Inside a chunk λ_t = (Σ_{t' >= t} E_t' C_t' gy_t' + E_T μ) / E_t with E as in the forward and μ the
    cotangent arriving at the chunk's end from later chunks (a log-depth scan over the flipped chunks)."""
    m = (T - 1) // 2
    S = dt.cumsum(-1)
    Smid = S[..., m:m + 1]
    Ae = A[None, :, :, None, :]                         # (1, g, db, 1, N)
    floor = _LOG_FLOOR[u.dtype]
    E = torch.exp((S - Smid).unsqueeze(-1) * Ae.unsqueeze(-2))
    dtu = dt * u
    e_mid = torch.exp(Smid * Ae)                        # exp(A S_mid)   (B, g, db, nc, N)
    e_end = torch.exp((S[..., -1:] - Smid) * Ae)        # E at the chunk's last token
    la = S[..., -1:] * Ae                               # chunk log-decays
    # states h_t (as the forward): E_t (cumsum_s Δ_s u_s B_s / E_s + start exp(A S_mid))
    h = torch.mul(dtu.unsqueeze(-1), Bc).div_(E)
    h[..., 0, :] += start * e_mid
    h = h.cumsum_(-2).mul_(E)
    # adjoint states λ_t
    lam = torch.mul(Cc, gy.unsqueeze(-1)).mul_(E)       # E_t C_t gy_t
    nu = e_mid * lam.sum(-2)                            # what each chunk sends to the state entering it
    mu, dh0 = _chunk_scan_states(nu.flip(-2), la.flip(-2), glast, floor)
    lam[..., -1, :] += e_end * mu.flip(-2)
    lam = lam.flip(-2).cumsum_(-2).flip(-2).div_(E)
    # gradients
    dCc = (gy.unsqueeze(-1) * h).sum(2, keepdim=True)
    lB = lam * Bc
    dBc = (lam * dtu.unsqueeze(-1)).sum(2, keepdim=True)
    h.sub_(torch.mul(dtu.unsqueeze(-1), Bc)).mul_(lam)  # dℓ_t = λ_t (h_t - Δ_t u_t B_t)
    P = lB.sum(-1)                                      # Σ_n λ_t B_t
    Bsz, g, db, nc = u.shape[:4]
    h = h.view(Bsz, g, db, nc * T, -1)
    ddt = torch.matmul(h, A.unsqueeze(-1)).view(u.shape).addcmul_(u, P)      # Σ_n A dℓ + u Σ_n λ B
    dA = torch.matmul(dt.reshape(Bsz, g, db, 1, nc * T), h).sum(0)[..., 0, :]  # Σ_t Δ dℓ
    return dt * P, ddt, dA, dBc, dCc, dh0


class _ChunkBlockAutograd(torch.autograd.Function):
    """The previous backward: recompute the block with autograd and differentiate it (the oracle of
    `_ChunkBlock`'s hand-written backward, and the timing baseline)."""

    @staticmethod
    def forward(ctx, u, dt, A, Bc, Cc, h0, T):
        ctx.save_for_backward(u, dt, A, Bc, Cc, h0)
        ctx.T = T
        with torch.no_grad():
            return _chunk_block_nograd(u, dt, A, Bc, Cc, h0, T)

    @staticmethod
    def backward(ctx, gy, glast):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:6]
        ins = [None if x is None else x.detach().requires_grad_(bool(n)) for x, n in zip(saved, need)]
        with torch.enable_grad():
            y, last = _chunk_block(*ins, ctx.T)
            wrt = [x for x, n in zip(ins, need) if n and x is not None]
            got = iter(torch.autograd.grad((y, last), wrt, (gy, glast), allow_unused=True)) if wrt else iter(())
        return tuple(next(got) if (n and x is not None) else None for x, n in zip(ins, need)) + (None,)


def _chunk_size_for(dt, A, T: int) -> int:
    """Largest T' <= T (halving) with |A| * sum(delta over any chunk) under the dtype's limit."""
    limit = _SPAN_LIMIT[dt.dtype]
    amax = A.detach().abs().amax(-1)                    # (G, Dg)
    dt = dt.detach()
    L = dt.shape[-1]
    while T > 1:
        nc = -(-L // T)
        d = F.pad(dt, (0, nc * T - L)) if nc * T != L else dt
        span = (d.reshape(*dt.shape[:-1], nc, T).sum(-1).amax(-1) * amax).max()
        if float(span) <= limit:
            break
        T //= 2
    return T


def selective_scan_chunk_core(u, dt, A, Bt, Ct, h0=None, chunk_size: int = 32, compile="auto", autograd=False):
    """Canonical tensors (compute dtype): u/dt `(B, G, Dg, L)`, A `(G, Dg, N)`, Bt/Ct `(B, G, L, N)`,
    h0 `(B, G, Dg, N)` or None. Returns y `(B, G, Dg, L)` and the last state `(B, G, Dg, N)`.
    `autograd=True`: the blocks' backward recomputes them under autograd (the previous backward, kept as
    the oracle of the hand-written one)."""
    Bsz, G, Dg, L = u.shape
    N = A.shape[-1]
    T = _chunk_size_for(dt, A, max(1, min(chunk_size, 1 << max(0, (L - 1).bit_length()))))
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        u, dt = F.pad(u, (0, pad)), F.pad(dt, (0, pad))   # delta = 0: decay 1, no input
        Bt, Ct = F.pad(Bt, (0, 0, 0, pad)), F.pad(Ct, (0, 0, 0, pad))
    u = u.reshape(Bsz, G, Dg, nc, T)
    dt = dt.reshape(Bsz, G, Dg, nc, T)
    if not autograd:  # (B, G, L, N) with N innermost: every (block, L, N) product then runs contiguous
        Bt, Ct = Bt.contiguous(), Ct.contiguous()
    Bc = Bt.reshape(Bsz, G, 1, nc, T, N)
    Cc = Ct.reshape(Bsz, G, 1, nc, T, N)
    use_ckpt = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (u, dt, A, Bt, Ct, h0))
    if compile == "auto":
        compile = (not use_ckpt) and Bsz * G * Dg * L * N >= _AUTO_COMPILE_ELEMS and _auto_compile_ok(u.device)
    fused = _compiled_block() if (compile and not use_ckpt) else None
    db = max(1, (_BLOCK_ELEMS_COMPILED if fused is not None else _BLOCK_ELEMS) // (Bsz * nc * T * N))
    if db >= Dg:  # blocks of whole groups
        gb = max(1, db // Dg)
        slices = [(slice(g0, min(G, g0 + gb)), slice(0, Dg)) for g0 in range(0, G, gb)]
    else:         # blocks of channels inside one group
        slices = [(slice(g, g + 1), slice(d0, min(Dg, d0 + db))) for g in range(G) for d0 in range(0, Dg, db)]
    if use_ckpt and autograd:
        y, last = _blocks_autograd(u, dt, A, Bc, Cc, h0, T, slices, db >= Dg)
    elif use_ckpt:
        y, last = _ChunkScan.apply(u, dt, A, Bc, Cc, h0, T, slices)
    else:
        def kernel(*args):
            nonlocal fused
            if fused is not None:
                try:
                    return fused(*args)
                except Exception:  # noqa: BLE001 - compilation failed: fall back to eager for good
                    _COMPILED["fn"] = fused = None
            return _chunk_block_nograd(*args)
        y, last = _run_blocks(kernel, u, dt, A, Bc, Cc, h0, T, slices)
    y = y.reshape(Bsz, G, Dg, nc * T)[..., :L]
    return y, last


def _run_blocks(kernel, u, dt, A, Bc, Cc, h0, T, slices, start=None):
    """Run `kernel` (no autograd) on each channel block, its results written into place (and the states
    entering each chunk into `start`, if given)."""
    Bsz, G, Dg = u.shape[:3]
    y = torch.empty_like(u)
    last = u.new_empty(Bsz, G, Dg, A.shape[-1])
    for gs, ds in slices:
        args = (u[:, gs, ds], dt[:, gs, ds], A[gs, ds], Bc[:, gs], Cc[:, gs], None if h0 is None else h0[:, gs, ds], T)
        y[:, gs, ds], last[:, gs, ds] = kernel(*args) if start is None else kernel(*args, start[:, gs, ds])
    return y, last


class _ChunkScan(torch.autograd.Function):
    """The chunked scan over all channel blocks with a hand-written backward: the forward runs the in-place
    inference kernel block by block and keeps only the inputs; the backward recomputes each block's states
    and runs its adjoint scan (`_chunk_block_backward`), writing the gradients into place. Memory for
    training is O(inputs) plus one block's temporaries."""

    @staticmethod
    def forward(ctx, u, dt, A, Bc, Cc, h0, T, slices):
        start = u.new_empty(*u.shape[:4], A.shape[-1])                 # the states entering each chunk
        y, last = _run_blocks(_chunk_block_nograd, u, dt, A, Bc, Cc, h0, T, slices, start)
        ctx.save_for_backward(u, dt, A, Bc, Cc, start)
        ctx.T, ctx.slices, ctx.has_h0 = T, slices, h0 is not None
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, dt, A, Bc, Cc, start = ctx.saved_tensors
        du, ddt, dA = torch.empty_like(u), torch.empty_like(dt), torch.empty_like(A)
        dBc, dCc = torch.zeros_like(Bc), torch.zeros_like(Cc)
        dh0 = u.new_empty(*u.shape[:3], A.shape[-1]) if ctx.has_h0 else None
        for gs, ds in ctx.slices:
            g = _chunk_block_backward(u[:, gs, ds], dt[:, gs, ds], A[gs, ds], Bc[:, gs], Cc[:, gs],
                                      start[:, gs, ds], ctx.T, gy[:, gs, ds], glast[:, gs, ds])
            du[:, gs, ds], ddt[:, gs, ds], dA[gs, ds] = g[0], g[1], g[2]
            dBc[:, gs] += g[3]
            dCc[:, gs] += g[4]
            if dh0 is not None:
                dh0[:, gs, ds] = g[5]
        return du, ddt, dA, dBc, dCc, dh0, None, None


def _blocks_autograd(u, dt, A, Bc, Cc, h0, T, slices, whole_groups):
    """The previous training path: one `_ChunkBlockAutograd` per block, results concatenated (the oracle
    and timing baseline of `_ChunkScan`)."""
    G = u.shape[1]
    ys, lasts = [], []
    for gs, ds in slices:
        y, last = _ChunkBlockAutograd.apply(u[:, gs, ds], dt[:, gs, ds], A[gs, ds], Bc[:, gs], Cc[:, gs],
                                            None if h0 is None else h0[:, gs, ds], T)
        ys.append(y)
        lasts.append(last)
    if whole_groups:
        return torch.cat(ys, 1), torch.cat(lasts, 1)
    nb = len(ys) // G
    return (torch.cat([torch.cat(ys[g * nb:(g + 1) * nb], 2) for g in range(G)], 1),
            torch.cat([torch.cat(lasts[g * nb:(g + 1) * nb], 2) for g in range(G)], 1))


def _check_bc(name, X, u, Bsz, Dm, N, L):
    check_tensor(name, X)
    check_float(name, X, u)
    if X.dim() == 3:
        check_shape(name, X, (Bsz, N, L), "(B, N, L)")
        return X.unsqueeze(1)
    if X.dim() == 4:
        G = X.shape[1]
        if X.shape[0] != Bsz or X.shape[2] != N or X.shape[3] != L or G == 0 or Dm % G != 0:
            raise ValueError(f"{name} must have shape (B, N, L) = {(Bsz, N, L)} or (B, G, N, L) with D = {Dm} "
                             f"divisible by G, got {tuple(X.shape)}")
        return X
    raise ValueError(f"{name} must have shape (B, N, L) = {(Bsz, N, L)} or (B, G, N, L) (input-dependent, as in "
                     f"Mamba), got shape {tuple(X.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                   initial_state=None, output_final_state: bool = False, return_last_state: bool | None = None,
                   mode: str = "chunk", chunk_size: int = 32, compile="auto", backend: str = "auto"):
    """Mamba's selective scan, `mamba_ssm.selective_scan_fn`-compatible.

    u, delta `(B, D, L)`; A `(D, N)` real (negative for a stable scan); B, C `(B, N, L)` or grouped
    `(B, G, N, L)` (channel d uses group `d // (D / G)`); D `(D,)`; z `(B, D, L)`; delta_bias `(D,)`
    (added to delta before the optional softplus); initial_state `(B, D, N)`.
    Returns y `(B, D, L)` in u's dtype, or `(y, last_state)` with last_state `(B, D, N)` in fp32
    (fp64 for fp64 inputs) if `output_final_state` (alias: mamba_ssm's `return_last_state`).
    mode "chunk" (parallel, see module doc) or "recurrent" (the token loop, the oracle).
    `compile=True` runs the inference (no-grad) chunk kernel under `torch.compile` (fused loops; the
    first call per shape compiles, and the eager path is the fallback where compilation fails);
    `"auto"` (default) does so for CPU calls without gradients with `B*D*L*N >= 2**24` when a C++
    compiler is present (`ANYATTN_NO_COMPILE=1` turns it off); `False`: always eager.
    backend: "auto" (mamba-ssm's fused CUDA kernel when installed and the call fits, see `backend_choice`;
    else anyattn's engine), "anyattn" or "mamba".
    """
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if return_last_state is not None:
        output_final_state = bool(return_last_state)
    check_tensor("u", u, 3)
    check_float("u", u)
    Bsz, Dm, L = u.shape
    if Bsz == 0 or Dm == 0 or L == 0:
        raise ValueError(f"u must be non-empty (B, D, L), got shape {tuple(u.shape)}")
    check_float("delta", delta, u)
    check_shape("delta", delta, (Bsz, Dm, L), "(B, D, L)")
    check_tensor("A", A)
    if A.is_complex():
        raise TypeError(f"A must be real (complex A is not supported), got {A.dtype}")
    check_float("A", A, u)
    if A.dim() != 2 or A.shape[0] != Dm or A.shape[1] == 0:
        raise ValueError(f"A must have shape (D, N) with D = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    Bg = _check_bc("B", B, u, Bsz, Dm, N, L)
    Cg = _check_bc("C", C, u, Bsz, Dm, N, L)
    if Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"B and C must have the same number of groups G, got B: {Bg.shape[1]}, C: {Cg.shape[1]}")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None:
            check_float(name, X, u)
            check_shape(name, X, (Dm,), "(D,)")
    if z is not None:
        check_float("z", z, u)
        check_shape("z", z, (Bsz, Dm, L), "(B, D, L)")
    if initial_state is not None:
        check_float("initial_state", initial_state, u)
        check_shape("initial_state", initial_state, (Bsz, Dm, N), "(B, D, N)")
    check_mode(mode)
    check_positive_int("chunk_size", chunk_size)
    if mode == "chunk" and backend_choice(u, initial_state, backend).backend == "mamba":
        return mamba_backend.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, output_final_state)

    cd = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    G = Bg.shape[1]
    Dg = Dm // G
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uc = u.to(cd)
    args = (uc.view(Bsz, G, Dg, L), dt.view(Bsz, G, Dg, L), A.to(cd).view(G, Dg, N),
            Bg.to(cd).transpose(-1, -2), Cg.to(cd).transpose(-1, -2),
            None if initial_state is None else initial_state.to(cd).view(Bsz, G, Dg, N))
    if mode == "recurrent":
        y, last = selective_scan_recurrent_core(*args)
    else:
        y, last = selective_scan_chunk_core(*args, chunk_size=chunk_size, compile=compile, autograd=use_autograd())
    y = y.reshape(Bsz, Dm, L)
    if D is not None:
        y = y + D.to(cd)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(u.dtype)
    return (y, last.reshape(Bsz, Dm, N)) if output_final_state else y


BACKENDS = ("auto", "anyattn", "mamba")


def backend_choice(u, initial_state=None, backend: str = "auto") -> Choice:
    """Which implementation `selective_scan(mode="chunk", backend=backend)` uses for inputs like u, and why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    why = mamba_backend.unavailable(u, initial_state)
    if backend == "mamba" and why is not None:
        raise ValueError(f"backend='mamba' cannot run this scan: {why}")
    if backend != "anyattn" and why is None:
        return Choice("mamba", f"mamba-ssm's fused selective_scan_fn on {u.device.type}")
    return Choice("anyattn", "anyattn's chunked scan" + ("" if backend == "anyattn" else f" (mamba-ssm not used: {why})"))


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Drop-in for `mamba_ssm.selective_scan_fn` (same positional arguments; chunked CPU/GPU path)."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          output_final_state=bool(return_last_state))


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, output_final_state=False):
    """The step-by-step recurrence with `selective_scan`'s signature (it is `mode="recurrent"`)."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=initial_state,
                          output_final_state=output_final_state, mode="recurrent")
