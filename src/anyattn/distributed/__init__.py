"""Context parallelism over `torch.distributed` (gloo on CPU, NCCL on GPU): `import anyattn.distributed as ad`.

Every function takes `group=` (None: the world group; a `torch.distributed.ProcessGroup`; or an
`ad.Comm`, e.g. the thread-backed `ad.testing.ThreadComm` of the tests). Tensors are sharded along the
sequence dim 2 of `(B, H, n_local, D)` by an `ad.Layout`.
"""
from . import testing
from .comm import Comm, CommLog, CommRecord, as_comm
from .layout import Layout, Segment, shard, unshard

__all__ = ["Comm", "CommLog", "CommRecord", "as_comm", "Layout", "Segment", "shard", "unshard", "testing"]

# state passing (linear family, SSD, selective scan)
from . import cost
from .context import context_parallel
from .conv_halo import causal_conv, causal_conv_halo
from .linear_family import linear, selective_scan, ssd
from .offload import AttentionServer, RemoteKVCache, partial_decode, stop_servers

__all__ += ["linear", "ssd", "selective_scan", "cost", "causal_conv_halo", "causal_conv", "context_parallel",
            "partial_decode", "AttentionServer", "RemoteKVCache", "stop_servers"]
