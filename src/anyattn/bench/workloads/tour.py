"""The default report (`anyattn bench`, `make demo`): a tour of the families, one case each where anyattn
meets its strongest runnable peer, in float32 and bf16, forward and forward+backward:

- masked + biased attention: causal ALiBi, N=4096: `auto` (FlashBias route: exact rank-2 factors through
  SDPA's fused kernel) against compiled FlexAttention (score_mod, causal block mask: its tightest) and
  torch SDPA with the dense bias a user would build;
- neighborhood attention: 2-D 48x48, kernel 13: anyattn's engine against compiled FlexAttention with the
  neighborhood block mask, NATTEN's CPU path (eager FlexAttention: N x N scores) and dense-masked SDPA;
- the linear family: Gated DeltaNet, N=8192: the chunk engine against fla's `naive_chunk` reference and
  causal softmax attention (SDPA), the mixer it replaces;
- decoding at 32k context: TokenSelect (published defaults) against exact decoding and torch SDPA.

Each case names anyattn's contender and its peers in `params["compare"]`; the report prints a summary of
speedups and errors and draws one figure (`report.summary`, `report.plot`). Sizes are kept so that the tour
runs in about two minutes on 2 quiet CPU cores (`make demo` passes --no-memory and --budget 2: two seconds
of timing per case, mode and dtype).
"""
from __future__ import annotations

from ..case import Case

NAME = "tour"
DESCRIPTION = ("the default report: one case per family against its strongest runnable peer (ALiBi vs "
               "FlexAttention, neighborhood vs FlexAttention and NATTEN, Gated DeltaNet vs fla and SDPA, "
               "TokenSelect vs exact decoding), fp32 and bf16, with a summary and one figure")


def _tag(case: Case, label: str, ours: str, peers: list) -> Case:
    case.workload = NAME
    case.label = label
    case.params["compare"] = {"ours": ours, "peers": [p for p in peers if p in case.contenders or p in case.skip
                                                      or p in case.missing]}
    return case


def cases(quick: bool) -> list[Case]:
    from . import bias, decode, linear_family, neighborhood
    alibi = bias.alibi_cases(quick, N=4096)[0]
    for name in ("blocked", "lowrank_bias", "reference"):
        alibi.contenders.pop(name, None)
        alibi.skip.pop(name, None)
    alibi.baseline = "auto"
    alibi.exact = "sdpa_dense_bias"
    # sdpa_unbiased stays in the table as the speed of light (no bias), not as a peer
    out = [_tag(alibi, f"causal ALiBi N={alibi.params['N']}", "auto", ["flex", "sdpa_dense_bias"])]

    spatial, kernel = ((16, 16), 5) if quick else ((48, 48), 13)
    na = neighborhood._case(NAME, spatial, kernel, H=2 if quick else 8, D=16 if quick else 64, flex=not quick)
    na.contenders.pop("auto", None)
    out.append(_tag(na, f"neighborhood 2-D {spatial[0]}x{spatial[1]} kernel {kernel}", "anyattn",
                    ["flex", "natten", "sdpa_dense"]))

    N = 256 if quick else 8192
    gdn = linear_family._train_case("gdn", N)
    gdn.contenders.pop("fla_naive_recurrent", None)
    gdn.skip.pop("fla_naive_recurrent", None)
    gdn.forward_only.pop("fla_naive_recurrent", None)
    gdn.baseline = "chunk"
    out.append(_tag(gdn, f"Gated DeltaNet N={N}", "chunk", ["fla_naive_chunk", "sdpa"]))

    ctx = 256 if quick else 32768
    dec = decode.decode_case(ctx, 8, quick, names=("exact", "sdpa", "tokenselect"), workload=NAME)
    dec.baseline = "tokenselect"
    out.append(_tag(dec, f"decode {ctx // 1024 or ctx}{'k' if ctx >= 1024 else ''} context, 8 heads",
                    "tokenselect", ["exact", "sdpa"]))
    return out
