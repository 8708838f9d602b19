"""Context parallelism with anyattn on CPU (gloo), launched by torchrun:

    torchrun --nproc_per_node=2 examples/cp_torchrun.py            # W = 2 processes
    torchrun --nproc_per_node=4 examples/cp_torchrun.py --n 8192   # W = 4

Every rank builds the same global inputs (same seed), keeps its shard, and runs
1. `ad.linear("gated_delta_rule", ...)` with algo="auto" (forward and backward), checked against the
   single-process op on rank 0;
2. a small model of `anyattn.nn` layers under `ad.context_parallel` (attention with RoPE, Gated DeltaNet,
   Mamba-2), its parameter gradients all-reduced as in data parallelism.
On GPUs use the "nccl" backend and move the tensors to `cuda:LOCAL_RANK`; nothing else changes.
"""
import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import anyattn.distributed as ad
from anyattn import linear as L
from anyattn import nn as ann


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096, help="global sequence length")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    N, B, H, D = args.n, 1, 4, 32

    # 1. one op, sharded by the contiguous layout
    g = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(B, H, N, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, H, N, D, generator=g)
    gate, beta = F.logsigmoid(torch.randn(B, H, N, generator=g) + 2), torch.rand(B, H, N, generator=g)
    layout = ad.Layout("contiguous", W, N)
    local = [ad.shard(x, layout, rank).requires_grad_() for x in (q, k, v, gate, beta)]
    print(f"rank {rank}: auto picks {ad.explain_linear('gated_delta_rule', *local, layout=layout)['algo']}")
    t0 = time.perf_counter()
    o, S = ad.linear("gated_delta_rule", *local, layout=layout, output_final_state=True)
    o.sum().backward()
    elapsed = time.perf_counter() - t0
    o_all = ad.unshard(o.detach(), layout)
    if rank == 0:
        ref, S_ref = L.gated_delta_rule(q, k, v, gate, beta, output_final_state=True)
        print(f"W={W} N={N}: fwd+bwd {elapsed:.2f} s per rank; max |o - single| = "
              f"{float((o_all - ref).abs().max()):.1e}, max |S - single| = {float((S.detach() - S_ref).abs().max()):.1e}")

    # 2. a model, context-parallel (zigzag: balanced causal attention), RoPE positions continue across ranks
    torch.manual_seed(0)                       # the same weights on every rank
    model = torch.nn.ModuleList([ann.Attention(64, 4), ann.GatedDeltaNetLayer(64, 2), ann.Mamba2Block(64, headdim=32)])
    layout = ad.Layout("zigzag", W, 2 * W * 64)
    x = torch.randn(2, layout.n_global, 64, generator=torch.Generator().manual_seed(1))
    with ad.context_parallel(None, layout):
        h = ad.shard(x, layout, rank, dim=1)
        for layer in model:
            h = h + layer(h)[0]
    (h ** 2).mean().backward()
    ad.all_reduce_grads(model)                 # parameter gradients: this rank's part -> the sum
    y = ad.unshard(h.detach(), layout, dim=1)  # collective: every rank calls it
    if rank == 0:
        print(f"model: output {tuple(y.shape)} (global), gradients all-reduced")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
