"""One call of a state-passing op on a rank's rows, described so the algorithms of
`anyattn.distributed.linear` can cut it by sequence (segments), by heads (Ulysses, pipeline) and
summarize it (`local_map`).

A problem holds named tensor arguments (`Arg`: which dim is the sequence, which the heads or
channels) and knows how to `run` its single-process op with an initial state and how to build its
segment's affine map (`anyattn.distributed.state.Affine`) together with a `finish(S_in) -> o` that
turns the entering state into the outputs:

* `LinearProblem`: the canonical linear family `(q, k, v, g, beta)`, run by the public op that has
  those gates (`linear_attention` with identity features, `retention`, `gla`, `delta_rule`,
  `gated_delta_rule`, `kda`). Decay ops: one run from the zero state, `M` = the product of decays,
  `corr(S_in) = (scale q ⊙ e^{cumsum g}) S_in`. Delta rules: one run with `D_k` extra value columns
  (zeros) and initial state `[0 | I]`: the final state is `[S_ext | M]` and the extra output columns
  are the rows `scale q_t^T P_t` that multiply S_in (P_t: product of the transitions up to t).
* `MoMProblem`: Mixture-of-Memories; the augmented run gives every memory's `[S_ext | M]`, the
  outputs come from a rerun with the entering state (the weighted reads mix the memories).
* `ScanProblem`: Mamba's selective scan (channels play the heads); `M = exp(A * sum delta)`, the
  correction is a scan of zero input from S_in.

Inputs are already validated and in the compute dtype (fp32, fp64 for fp64 inputs) where it matters.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from .. import linear as _L
from ..linear import chunk as _chunk
from ..ssm import selective_scan as _selective_scan
from .state import Affine


@dataclass
class Arg:
    """A tensor argument: `seq` its sequence dim (None: a parameter, the same on every rank), `head`
    its head / channel dim (None: shared by every head), `groups`: that dim holds groups of heads (the
    selective scan's grouped B, C). Per-token tensors have the batch at dim 0."""

    value: torch.Tensor
    seq: int | None
    head: int | None
    groups: bool = False      # the head dim holds groups, each shared by a contiguous block of heads


class Problem:
    """Base: `args` (name -> Arg), `run(a, S0) -> (o, S)`, `local_map(a) -> (Affine, finish)`.
    Outputs have the sequence at `out_seq` and heads at `out_head`; states `(B, heads, ...)`."""

    out_seq = 2
    out_head = 1
    state_head = 1

    def __init__(self, args: dict):
        self.args = {n: a for n, a in args.items() if a.value is not None}

    def values(self) -> dict:
        return {n: a.value for n, a in self.args.items()}

    def run(self, a: dict, S0):  # pragma: no cover - abstract
        raise NotImplementedError

    def local_map(self, a: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def map_shape(self, a: dict):  # pragma: no cover - abstract
        """(kind, shape of M) of `local_map(a)`'s Affine, without computing it."""
        raise NotImplementedError

    def state_shape(self, a: dict) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dtype(self) -> torch.dtype:
        """States are fp32 (fp64 for fp64 inputs), whatever the input dtype."""
        return torch.float64 if self.args[next(iter(self.args))].value.dtype == torch.float64 else torch.float32

    def length(self, a: dict) -> int:
        name, arg = next((n, x) for n, x in self.args.items() if x.seq is not None)
        return a[name].shape[arg.seq]

    def heads(self) -> int:
        """Number of state heads (what Ulysses and the pipeline split)."""
        return self.state_shape(self.values())[self.state_head]

    # ------------------------------------------------------------------------------------ cutting
    def slice_seq(self, a: dict, lo: int, n: int) -> dict:
        return {k: (x.narrow(self.args[k].seq, lo, n) if self.args[k].seq is not None else x) for k, x in a.items()}

    def head_sizes(self) -> dict:
        return {n: a.value.shape[a.head] for n, a in self.args.items() if a.head is not None}

    def slice_block(self, a: dict, b0: int, nb: int, part: int, parts: int) -> dict:
        """Batch rows `[b0, b0 + nb)` and head block `part` of `parts` (each head dim cut in `parts`
        equal blocks; shared tensors whole)."""
        out = {}
        for k, x in a.items():
            arg = self.args[k]
            if arg.seq is not None:
                x = x.narrow(0, b0, nb)
            if arg.head is not None:
                size = x.shape[arg.head] // parts
                x = x.narrow(arg.head, part * size, size)
            out[k] = x
        return out


def _grouped_read(qt, S):
    """`qt (B, H_q, n, K)` rows times the state of their key/value head `S (B, H, K, V)`."""
    B, Hq, n, K = qt.shape
    H = S.shape[1]
    return (qt.to(S.dtype).reshape(B, H, Hq // H, n, K) @ S[:, :, None]).reshape(B, Hq, n, S.shape[-1])


def _identity_columns(S_shape_kv, K, dtype, device):
    """Initial state `[0 | I]`: zeros for the value columns, the identity for K extra columns."""
    lead, V = S_shape_kv[:-2], S_shape_kv[-1]
    eye = torch.eye(K, dtype=dtype, device=device).expand(*lead, K, K)
    return torch.cat([torch.zeros(*lead, K, V, dtype=dtype, device=device), eye], -1)


def _linear_fn(delta: bool, gkind):
    if not delta:
        if gkind is None:
            return lambda q, k, v, **kw: _L.linear_attention(q, k, v, None, **kw)
        return _L.retention if gkind == "scalar" else _L.gla
    if gkind is None:
        return _L.delta_rule
    return _L.gated_delta_rule if gkind == "scalar" else _L.kda


class LinearProblem(Problem):
    """q `(B, H_q, n, K)`, k `(B, H, n, K)`, v `(B, H, n, V)`, g None | `(B, H, n)` | `(B, H, n, K)`,
    beta None | `(B, H, n)` (all in the compute dtype); the op is chosen by (g's kind, beta)."""

    def __init__(self, q, k, v, g=None, beta=None, *, scale: float, mode: str = "chunk", chunk_size: int = 64):
        super().__init__({"q": Arg(q, 2, 1), "k": Arg(k, 2, 1), "v": Arg(v, 2, 1), "g": Arg(g, 2, 1),
                          "beta": Arg(beta, 2, 1)})
        self.delta = beta is not None
        self.gkind = None if g is None else ("scalar" if g.dim() == 3 else "vector")
        self.fn = _linear_fn(self.delta, self.gkind)
        self.scale, self.mode, self.chunk_size = scale, mode, chunk_size

    @property
    def phased(self) -> bool:
        """The delta rules' chunk engine splits into a state-independent phase and a state scan."""
        return self.delta and self.mode == "chunk"

    def prepare(self, a):
        """Phase 1 (`linear.chunk.delta_prepare`) for every row: `(shape, groups)`."""
        dt = self.state_dtype()
        k = a["k"]
        q = a["q"].to(dt).reshape(k.shape[0], k.shape[1], a["q"].shape[1] // k.shape[1], *a["q"].shape[2:])
        g = a.get("g")
        return _chunk.delta_prepare(q, k.to(dt), a["v"].to(dt), a["beta"].to(dt), self.scale,
                                    None if g is None else g.to(dt), self.chunk_size)

    @staticmethod
    def scan(groups, S, rows: slice):
        """Phase 2 (`linear.chunk.delta_scan`) for the flattened (batch, head) `rows` from S `(rows, K, V)`."""
        return _chunk.delta_scan(groups, S, rows)

    @staticmethod
    def finish(shape, o_rows):
        """`(B * H, NC, Gq * C, V)` scanned rows -> o `(B, H_q, n, V)`."""
        o = _chunk.delta_finish(shape, o_rows)
        return o.reshape(o.shape[0], o.shape[1] * o.shape[2], *o.shape[3:])

    def run(self, a, S0):
        gates = [a[n] for n in ("g", "beta") if n in a]
        return self.fn(a["q"], a["k"], a["v"], *gates, scale=self.scale, initial_state=S0, output_final_state=True,
                       mode=self.mode, chunk_size=self.chunk_size)

    def state_shape(self, a):
        k, v = a["k"], a["v"]
        return (k.shape[0], k.shape[1], k.shape[-1], v.shape[-1])

    def map_shape(self, a):
        B, H, _, K = a["k"].shape
        if self.delta:
            return "matrix", (B, H, K, K)
        if self.gkind is None:
            return None, None
        return "scale", ((B, H, 1, 1) if self.gkind == "scalar" else (B, H, K, 1))

    def local_map(self, a):
        q, k, v = a["q"], a["k"], a["v"]
        if self.delta:
            B, H, n, V = v.shape
            K = k.shape[-1]
            v_aug = torch.cat([v, v.new_zeros(B, H, n, K)], -1)
            sdt = self.state_dtype()
            o_aug, S_aug = self.run({**a, "v": v_aug}, _identity_columns((B, H, K, V), K, sdt, v.device))
            o0, qt = o_aug.split([V, K], -1)
            S_ext, M = S_aug.split([V, K], -1)
            return Affine("matrix", M, S_ext), lambda S_in: o0 + _grouped_read(qt, S_in)
        o0, S_ext = self.run(a, None)
        qt = self.scale * q.to(S_ext.dtype)
        B, H = k.shape[:2]
        if self.gkind is None:
            amap = Affine(None, None, S_ext)
        else:
            Gc = a["g"].to(S_ext.dtype).cumsum(2)
            G = qt.shape[1] // H
            if self.gkind == "scalar":
                decay = torch.exp(Gc).repeat_interleave(G, 1)[..., None]
                M = torch.exp(Gc[:, :, -1]).reshape(B, H, 1, 1)
            else:
                decay = torch.exp(Gc).repeat_interleave(G, 1)
                M = torch.exp(Gc[:, :, -1]).unsqueeze(-1)
            qt = qt * decay
            amap = Affine("scale", M, S_ext)
        return amap, lambda S_in: o0 + _grouped_read(qt, S_in)


class MoMProblem(Problem):
    """Mixture-of-Memories: q `(B, H, n, K)`, k `(B, H, M, n, K)`, v `(B, H, M, n, V)`, g, beta
    `(B, H, M, n)`, weights `(B, n, M)` (shared by the heads) or `(B, H, n, M)`."""

    def __init__(self, q, k, v, g, beta, weights, *, scale: float, mode: str = "chunk", chunk_size: int = 64):
        w = Arg(weights, 1, None) if weights.dim() == 3 else Arg(weights, 2, 1)
        super().__init__({"q": Arg(q, 2, 1), "k": Arg(k, 3, 1), "v": Arg(v, 3, 1), "g": Arg(g, 3, 1),
                          "beta": Arg(beta, 3, 1), "weights": w})
        self.scale, self.mode, self.chunk_size = scale, mode, chunk_size

    def run(self, a, S0):
        return _L.mom(a["q"], a["k"], a["v"], a["g"], a["beta"], a["weights"], scale=self.scale, initial_state=S0,
                      output_final_state=True, mode=self.mode, chunk_size=self.chunk_size)

    def state_shape(self, a):
        k, v = a["k"], a["v"]
        return (k.shape[0], k.shape[1], k.shape[2], k.shape[-1], v.shape[-1])

    def map_shape(self, a):
        B, H, M, _, K = a["k"].shape
        return "matrix", (B, H, M, K, K)

    def local_map(self, a):
        k, v = a["k"], a["v"]
        B, H, M, n, V = v.shape
        K = k.shape[-1]
        v_aug = torch.cat([v, v.new_zeros(B, H, M, n, K)], -1)
        _, S_aug = self.run({**a, "v": v_aug}, _identity_columns((B, H, M, K, V), K, self.state_dtype(), v.device))
        S_ext, Mt = S_aug.split([V, K], -1)
        return Affine("matrix", Mt, S_ext), lambda S_in: self.run(a, S_in)[0]


class ScanProblem(Problem):
    """Mamba's selective scan (`anyattn.ssm.selective_scan` arguments; u in the compute dtype).
    Channels D play the heads: u, delta, z `(B, D, n)`, A `(D, N)`, D, delta_bias `(D,)`; B, C
    `(B, N, n)` or `(B, G, N, n)` (split by groups when G > 1, else shared)."""

    def __init__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *,
                 mode: str = "chunk", chunk_size: int = 32, compile="auto"):
        def bc(X):
            return Arg(X, X.dim() - 1, 1 if X.dim() == 4 and X.shape[1] > 1 else None, groups=True)
        super().__init__({"u": Arg(u, 2, 1), "delta": Arg(delta, 2, 1), "A": Arg(A, None, 0), "B": bc(B),
                          "C": bc(C), "D": Arg(D, None, 0), "z": Arg(z, 2, 1), "delta_bias": Arg(delta_bias, None, 0)})
        self.softplus, self.mode, self.chunk_size, self.compile = delta_softplus, mode, chunk_size, compile

    def _scan(self, a, u, D, S0):
        return _selective_scan(u, a["delta"], a["A"], a["B"], a["C"], D, a.get("z"), a.get("delta_bias"),
                               self.softplus, initial_state=S0, output_final_state=True, mode=self.mode,
                               chunk_size=self.chunk_size, compile=self.compile)

    def run(self, a, S0):
        return self._scan(a, a["u"], a.get("D"), S0)

    def state_shape(self, a):
        u = a["u"]
        return (u.shape[0], u.shape[1], a["A"].shape[-1])

    def map_shape(self, a):
        return "scale", self.state_shape(a)

    def local_map(self, a):
        y0, S_ext = self.run(a, None)
        dt = a["delta"].to(S_ext.dtype)
        if a.get("delta_bias") is not None:
            dt = dt + a["delta_bias"].to(dt.dtype)[:, None]
        if self.softplus:
            dt = F.softplus(dt)
        M = torch.exp(dt.sum(-1)[..., None] * a["A"].to(dt.dtype))          # (B, D, N)
        zero = torch.zeros_like(a["u"])
        return Affine("scale", M, S_ext), lambda S_in: y0 + self._scan(a, zero, None, S_in)[0]

