"""TokenSelect: dynamic token-level KV selection for decoding (Wu et al., 2024, "TokenSelect: Efficient
Long-Context Inference and Length Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection").

Per layer and step, for a sequence of length L:
- the first `n_init` tokens (attention sinks) and the last `n_local` tokens are always kept;
- every other token j (a candidate) gets the per-head soft-vote score
  `score_j = sum_h softmax_j(q_h . k_j)` (softmax over the candidates, no 1/sqrt(d); for GQA every query
  head votes with its KV head's keys; for a prefill chunk the votes of all its queries are summed);
- the `k` candidates with the highest scores are selected (one selection shared by all heads of the
  layer, per sequence), and the step attends exactly to init U top-k U local;
- the selection is reused while the cosine between the current query (all heads, flattened) and the
  query that made the selection stays >= `reuse_threshold` (one-token steps; a prefill chunk always
  selects). The paper's Selection Cache; the reused indices never overlap the moving local window.

Published defaults (the paper's settings): n_init=128, n_local=512, k=2048, reuse_threshold=0.9.
When every sequence has at most `k` candidates the step is exact (it attends to everything).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validate import check_positive_int

# Bound on the score tensor (elements) before the vote switches to the two-pass chunked form.
SCORE_ELEMENTS = 1 << 24
MIN_SCORE_CHUNK = 1024
# Keys are read (and, for int8, dequantized) this many at a time.
KEY_CHUNK = 8192


@dataclass(frozen=True)
class TokenSelect:
    """TokenSelect policy parameters (defaults are the published ones).

    n_init: leading tokens always kept (attention sinks), 128. n_local: trailing tokens always kept, 512.
    k: candidates selected per step, 2048. reuse_threshold: reuse the selection while the query's cosine to
    the selecting query is >= this, 0.9 (set > 1 to select at every step).
    """

    n_init: int = 128
    n_local: int = 512
    k: int = 2048
    reuse_threshold: float = 0.9

    def __post_init__(self):
        check_positive_int("n_init", self.n_init, 0)
        check_positive_int("n_local", self.n_local, 1)
        check_positive_int("k", self.k, 1)
        t = self.reuse_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t:
            raise ValueError(f"reuse_threshold must be a number >= -1 (a cosine; > 1 disables reuse), got {t!r}")

    def candidates(self, lengths: list[int]) -> list[int]:
        """Number of candidate tokens per sequence."""
        return [max(0, L - self.n_init - self.n_local) for L in lengths]


@dataclass
class Selection:
    """Selection state kept in the cache: the selecting query `(B, H*D)` (float32), the selected top-k positions
    `idx (B, k')` (-1 = none), and the kept set init U top-k: its positions `pos (B, S)` (a huge value for
    unused slots) and, per KV-head group, its keys/values `(B, h, S, d)` gathered once at selection time, so a
    reusing step reads them plus the contiguous local window and copies nothing."""

    query: torch.Tensor
    idx: torch.Tensor
    pos: torch.Tensor
    kv: list

    def index_select(self, index: torch.Tensor) -> "Selection":
        return Selection(self.query.index_select(0, index), self.idx.index_select(0, index),
                         self.pos.index_select(0, index),
                         [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv])


def reusable(sel: Selection | None, q: torch.Tensor, threshold: float) -> bool:
    """Whether every sequence's one-token query `(B, H, 1, D)` has cosine >= threshold to the selecting
    query."""
    if sel is None or q.shape[2] != 1 or sel.query.shape != (q.shape[0], q.shape[1] * q.shape[3]):
        return False
    cur = q.reshape(q.shape[0], -1).float()
    cos = torch.nn.functional.cosine_similarity(cur, sel.query, dim=-1, eps=1e-12)
    return bool((cos >= threshold).all())


def _logits(qf: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """qf `(B, h, R, d)`, keys `(B, h, n, d)` -> float32 (or float64) logits `(B, h, R, n)` (no scale)."""
    dt = torch.promote_types(qf.dtype, torch.float32)
    # keys @ q^T reads the keys row by row (a matrix-vector product on the contiguous cache), faster on CPU
    # than q @ keys^T; the result is returned as a transposed view.
    return torch.matmul(keys, qf.transpose(-1, -2)).transpose(-1, -2).to(dt)


def _chunked_logits(qf, read_keys, gi, lo, hi, step=None):
    step = step or (hi - lo)
    parts = [_logits(qf, read_keys(gi, c0, min(hi, c0 + step))) for c0 in range(lo, hi, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def vote(qfs: list[torch.Tensor], read_keys, lengths: torch.Tensor, policy: TokenSelect, n_cand: int,
         key_chunk: int | None = None) -> torch.Tensor:
    """Soft-vote scores over the candidate range `[n_init, n_init + n_cand)`.

    qfs: per KV-head group, the folded queries `(B, h, R, d)` (R = query heads per KV head x chunk length)
    in the group's stored space; read_keys(group_index, lo, hi) -> keys `(B, h, hi-lo, d)`;
    lengths `(B,)`. Returns `(B, n_cand)` float scores; positions that are not candidates of their
    sequence (past `L_b - n_local`) get -1 (below any vote, which is >= 0). key_chunk: read keys this many at a
    time (for int8 caches, whose keys are dequantized on read); None reads a range at once.
    """
    lo, hi = policy.n_init, policy.n_init + n_cand
    if n_cand == 0:
        return torch.zeros(lengths.shape[0], 0, device=lengths.device)
    pos = torch.arange(lo, hi, device=lengths.device)
    valid = pos[None, :] < (lengths - policy.n_local)[:, None]  # (B, n_cand)
    neg = torch.tensor(float("-inf"), device=lengths.device)
    all_valid = bool(valid.all())
    rows = max(q.shape[0] * q.shape[1] * q.shape[2] for q in qfs)
    chunk = max(MIN_SCORE_CHUNK, SCORE_ELEMENTS // max(rows, 1))
    if n_cand <= chunk:
        score = None
        for gi, qf in enumerate(qfs):
            s = _chunked_logits(qf, read_keys, gi, lo, hi, key_chunk)
            if not all_valid:
                s = s.masked_fill(~valid[:, None, None, :], neg)
            p = torch.softmax(s, dim=-1)
            if not all_valid:
                p = p.nan_to_num_(0.0)
            p = p.sum(dim=(1, 2))
            score = p if score is None else score + p
    else:
        # Two passes: the row-wise log-sum-exp over all candidates, then the normalized votes per chunk.
        lses = []
        for gi, qf in enumerate(qfs):
            parts = []
            for c0 in range(lo, hi, chunk):
                c1 = min(hi, c0 + chunk)
                s = _chunked_logits(qf, read_keys, gi, c0, c1, key_chunk)
                s = s.masked_fill(~valid[:, None, None, c0 - lo:c1 - lo], neg)
                parts.append(torch.logsumexp(s, dim=-1))
            lses.append(torch.logsumexp(torch.stack(parts), dim=0))
        pieces = []
        for c0 in range(lo, hi, chunk):
            c1 = min(hi, c0 + chunk)
            acc = None
            for gi, qf in enumerate(qfs):
                s = _chunked_logits(qf, read_keys, gi, c0, c1, key_chunk)
                s = s.masked_fill(~valid[:, None, None, c0 - lo:c1 - lo], neg)
                lse = lses[gi]
                lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
                p = torch.exp(s - lse[..., None]).sum(dim=(1, 2))
                acc = p if acc is None else acc + p
            pieces.append(acc)
        score = torch.cat(pieces, dim=-1)
    return score if all_valid else torch.where(valid, score, torch.full_like(score, -1.0))


def select(scores: torch.Tensor, policy: TokenSelect) -> torch.Tensor:
    """Top-k absolute positions `(B, k')` from `vote` scores (-1 entries become position -1)."""
    kk = min(policy.k, scores.shape[-1])
    top, arg = torch.topk(scores, kk, dim=-1, sorted=False)
    pos = arg + policy.n_init
    return torch.where(top >= 0, pos, torch.full_like(pos, -1))


BIG = 1 << 62


def kept(idx: torch.Tensor, lengths: torch.Tensor, policy: TokenSelect):
    """The kept set init U top-k per sequence. idx `(B, k')` selected positions (-1 = none), lengths `(B,)`.
    Returns `(gather_idx, pos)`, both `(B, n_init + k')`: gather_idx is a valid index (0 for unused slots), pos
    the key position or `BIG` for unused slots (so a causal test `pos <= query position` drops them)."""
    B = lengths.shape[0]
    init = torch.arange(policy.n_init, device=lengths.device)[None, :].expand(B, -1)
    pos = torch.cat([init, idx], dim=1)
    ok = torch.cat([init < lengths[:, None], idx >= policy.n_init], dim=1)
    return torch.where(ok, pos, torch.zeros_like(pos)), torch.where(ok, pos, torch.full_like(pos, BIG))


def local_start(lengths: torch.Tensor, policy: TokenSelect) -> torch.Tensor:
    """First position of each sequence's local window, `max(n_init, L - n_local)` `(B,)`; the kept set's
    tokens at or past it are attended as part of the window (never twice)."""
    return torch.clamp(lengths - policy.n_local, min=policy.n_init)
