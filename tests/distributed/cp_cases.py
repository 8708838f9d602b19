"""Rank functions of the halo and offloading tests, shared by the thread and gloo files."""
import torch

import anyattn
import anyattn.distributed as ad
from anyattn import nn as ann
from anyattn.cache import KVCache


def conv_rank(comm, kind, x, w, dy, k):
    """Sharded causal conv (B, N, C) -> gathered output and gradients (dw summed over the ranks)."""
    W = comm.world_size
    layout = ad.Layout(kind, W, x.shape[1])
    xs = ad.shard(x, layout, comm.rank, 1).requires_grad_()
    wl = w.clone().requires_grad_()

    def conv(t, halo):
        tp = torch.cat([halo, t], 1).transpose(1, 2)
        return torch.nn.functional.conv1d(tp, wl[:, None], groups=t.shape[-1]).transpose(1, 2)

    y = ad.causal_conv(conv, xs, k, layout=layout, group=comm, dim=1)
    dx, dw = torch.autograd.grad((y * ad.shard(dy, layout, comm.rank, 1)).sum(), (xs, wl))
    return ad.unshard(y.detach(), layout, comm, 1), ad.unshard(dx, layout, comm, 1), comm.all_reduce(dw)


def decode_rank(comm, shard, options):
    """Rank 0 appends (prefill chunks, single tokens, a ragged append) to a local and a remote cache and
    compares decode after each append; the other ranks serve."""
    B, Hk, H, D = 2, 4, 8, 16
    if comm.rank != 0:
        ad.AttentionServer(comm, shard=shard, block=5, cache_len=8, cache_options=options).serve()
        return None
    local = KVCache(B, Hk, 8, D, **options)
    remote = ad.RemoteKVCache(3, B, Hk, 8, D, group=comm, shard=shard, block=5)
    g = torch.Generator().manual_seed(1)
    errs = []
    for step, T in enumerate([7, 1, 1, 3, 1, 12, 1]):
        k, v = torch.randn(B, Hk, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
        q = torch.randn(B, H, T, D, generator=g)
        n_new = [3, 2] if step == 3 else None
        local.append(k, v, n_new)
        remote.append(k, v, n_new)
        errs.append(float((anyattn.decode(q, local) - anyattn.decode(q, remote)).abs().max()))
    remote.free()
    ad.stop_servers(comm)
    return errs


def generate_rank(comm, shard):
    """`anyattn.nn.generate` with remote caches for the attention layers equals the local run."""
    torch.manual_seed(0)
    layers = [ann.Attention(32, 4, 2), ann.GatedDeltaNetLayer(32, 2, 8), ann.Attention(32, 4, 2)]
    if comm.rank != 0:
        ad.AttentionServer(comm, shard=shard, block=3).serve()
        return None
    prompt = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref, _ = ann.generate(layers, prompt, 6)
        states = [ad.RemoteKVCache(i, 2, 2, 16, 8, group=comm, shard=shard, block=3)
                  if isinstance(layer, ann.Attention) else None for i, layer in enumerate(layers)]
        out, _ = ann.generate(layers, prompt, 6, states=states)
    ad.stop_servers(comm)
    return float((out - ref).abs().max())


# --------------------------------------------------------------------------------------------- nn models
FP32_PARAMS = ("A_log", "D", "dt_bias", "dt_proj.bias")   # Mamba blocks compute these in fp32 by design


class Residual(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + self.layer(x)[0]


def model(hidden=16, seed=0):
    """A float64 stack of every context-parallel layer family of anyattn.nn, with residuals."""
    torch.manual_seed(seed)
    layers = [ann.Attention(hidden, 2, 1), ann.GatedDeltaNetLayer(hidden, 2, 8), ann.KDALayer(hidden, 2, 8),
              ann.GLALayer(hidden, 2, 8, use_short_conv=True), ann.MoMLayer(hidden, 2, 8, num_memories=3, top_k=2),
              ann.MambaBlock(hidden, d_state=4), ann.Mamba2Block(hidden, d_state=4, headdim=8)]
    return torch.nn.Sequential(*[Residual(layer) for layer in layers]).double()


def model_rank(comm, kind, algo, x, weights):
    """This rank's shard through the model (with `weights`, a state dict) under ad.context_parallel, backward
    of sum(y^2); returns the gathered output and the all-reduced parameter gradients."""
    W = comm.world_size
    layout = ad.Layout(kind, W, x.shape[1])
    m = model(x.shape[-1])
    m.load_state_dict(weights)
    with ad.context_parallel(comm, layout, algo=algo):
        y = m(ad.shard(x, layout, comm.rank, 1))
    (y ** 2).sum().backward()
    ad.all_reduce_grads(m, comm)
    return ad.unshard(y.detach(), layout, comm, 1), {n: p.grad for n, p in m.named_parameters()}


def model_reference(x, weights):
    m = model(x.shape[-1])
    m.load_state_dict(weights)
    y = m(x)
    (y ** 2).sum().backward()
    return y.detach(), {n: p.grad for n, p in m.named_parameters()}


def model_errors(x, weights, result):
    """(output relative error, worst float64-path parameter gradient error, worst fp32-path one)."""
    y, grads = model_reference(x, weights)
    yr, gr = result
    errs = {n: float((gr[n] - g).abs().max() / g.abs().max().clamp_min(1e-300)) for n, g in grads.items()}
    fp32 = [e for n, e in errs.items() if any(n.endswith("layer." + p) for p in FP32_PARAMS)]
    rest = [e for n, e in errs.items() if not any(n.endswith("layer." + p) for p in FP32_PARAMS)]
    return float((yr - y).abs().max() / y.abs().max()), max(rest), max(fp32)
