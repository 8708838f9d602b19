"""Every mask and bias kind, built by name for a global problem (B, H, N): shared by the sub-block and the
distributed tests (names pickle, so gloo workers build the same specs)."""
from __future__ import annotations

import torch

from anyattn import biases as Bi
from anyattn import masks as M

MASKS = ["none", "causal", "causal_top_left", "window", "window_causal", "key_padding", "document",
         "document_unsorted", "dense", "mask_mod", "neighborhood", "causal_and_document", "window_or_padding"]
BIASES = ["none", "alibi", "t5_bi", "t5_causal", "swin", "spatial", "spatial_batched", "dense", "factored",
          "bias_mod", "sum"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mod_fn(b, h, q, k):
    return ((q - k) % 3 != 1) | (h == 1) | (k == 0)


def make_mask(kind: str, B: int, H: int, N: int, seed: int = 0):
    g = _gen(seed)
    if kind == "none":
        return None
    if kind == "causal":
        return M.Causal()
    if kind == "causal_top_left":
        return M.Causal("top_left")
    if kind == "window":
        return M.SlidingWindow(3, 2)
    if kind == "window_causal":
        return M.SlidingWindow(4, 0)
    if kind == "key_padding":  # batch 0 sees no key at all: fully masked rows
        return M.KeyPadding(torch.tensor([0] + [int(x) for x in torch.randint(1, N + 1, (B - 1,), generator=g)]))
    if kind == "document":  # sorted ids, documents cut mid-shard
        cuts = torch.zeros(N, dtype=torch.long)
        if N > 1:
            cuts[torch.randint(1, N, (max(1, N // 5),), generator=g)] = 1
        return M.Document(cuts.cumsum(0))
    if kind == "document_unsorted":
        return M.Document(torch.randint(0, 3, (B, N), generator=g))
    if kind == "dense":
        m = torch.rand(B, H, N, N, generator=g) < 0.6
        m[:, :, 1] = False  # a fully masked query row
        return M.Dense(m)
    if kind == "mask_mod":
        return M.MaskMod(_mod_fn)
    if kind == "neighborhood":
        return M.Neighborhood((N,), kernel_size=min(N, 5), dilation=1)
    if kind == "causal_and_document":
        return M.Causal() & make_mask("document", B, H, N, seed)
    if kind == "window_or_padding":
        return M.SlidingWindow(2, 1) | make_mask("key_padding", B, H, N, seed)
    raise ValueError(kind)


def _p(*shape, seed, low=-1.0, high=1.0, dtype=torch.float64):
    return (low + (high - low) * torch.rand(*shape, generator=_gen(seed), dtype=torch.float64)).to(dtype) \
        .requires_grad_()


def _bias_fn(b, h, q, k, w):
    return w[h] * torch.cos(0.3 * (q - k)) + 0.1 * b


def make_bias(kind: str, B: int, H: int, N: int, seed: int = 0, dtype=torch.float64):
    """A bias spec whose parameters require grad (`spec.tensors()`)."""
    if kind == "none":
        return None
    if kind == "alibi":
        return Bi.Alibi(_p(H, seed=seed, low=0.05, high=1.0, dtype=dtype))
    if kind == "t5_bi":
        return Bi.RelativePosition.t5(_p(8, H, seed=seed, dtype=dtype), True, max_distance=12)
    if kind == "t5_causal":
        return Bi.RelativePosition.t5(_p(6, H, seed=seed, dtype=dtype), False, max_distance=10)
    if kind == "swin":
        Ww = next(w for w in (4, 3, 2, 1) if N % w == 0)
        Wh = N // Ww
        return Bi.RelativePosition.swin(_p((2 * Wh - 1) * (2 * Ww - 1), H, seed=seed, dtype=dtype), (Wh, Ww))
    if kind == "spatial":
        return Bi.SpatialDistance(_p(N, 3, seed=seed, dtype=dtype), _p(H, seed=seed + 1, low=0.1, dtype=dtype))
    if kind == "spatial_batched":
        return Bi.SpatialDistance(_p(B, N, 2, seed=seed, dtype=dtype), _p(1, seed=seed + 1, low=0.1, dtype=dtype),
                                  key_coords=_p(N, 2, seed=seed + 2, dtype=dtype))
    if kind == "dense":
        return Bi.Dense(_p(H, N, N, seed=seed, low=-2, high=2, dtype=dtype))
    if kind == "factored":
        return Bi.Factored(_p(H, N, 3, seed=seed, dtype=dtype), _p(N, 3, seed=seed + 1, dtype=dtype))
    if kind == "bias_mod":
        return Bi.BiasMod(_bias_fn, (_p(H, seed=seed, dtype=dtype),))
    if kind == "sum":
        return make_bias("alibi", B, H, N, seed, dtype) + make_bias("t5_bi", B, H, N, seed + 3, dtype)
    raise ValueError(kind)
