"""Context parallelism over `torch.distributed` (gloo on CPU, NCCL on GPU): `import anyattn.distributed as ad`.

Every function takes `group=` (None: the world group; a `torch.distributed.ProcessGroup`; or an
`ad.Comm`, e.g. the thread-backed `ad.testing.ThreadComm` of the tests). Tensors are sharded along the
sequence dim 2 of `(B, H, n_local, D)` by an `ad.Layout`.
"""
from . import testing
from .comm import Comm, CommLog, CommRecord, as_comm
from .layout import Layout, Segment, shard, unshard

# softmax attention (ring / all-gather / Ulysses)
from .attention import all_reduce_grads, attention, choose_algo, explain_attention  # noqa: E402
from .halo import neighborhood  # noqa: E402

__all__ = ["Comm", "CommLog", "CommRecord", "as_comm", "Layout", "Segment", "shard", "unshard", "testing",
           "attention", "explain_attention", "choose_algo", "all_reduce_grads", "neighborhood"]

# state passing (linear family, SSD, selective scan), short-convolution halos, nn context, offloading
from . import cost  # noqa: E402
from .context import context_parallel  # noqa: E402
from .conv_halo import causal_conv, causal_conv_halo  # noqa: E402
from .linear_family import explain_linear, linear, selective_scan, ssd  # noqa: E402
from .offload import AttentionServer, RemoteKVCache, partial_decode, stop_servers  # noqa: E402

__all__ += ["linear", "explain_linear", "ssd", "selective_scan", "cost", "causal_conv_halo", "causal_conv", "context_parallel",
            "partial_decode", "AttentionServer", "RemoteKVCache", "stop_servers"]
