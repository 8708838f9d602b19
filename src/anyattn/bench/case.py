"""What a benchmark workload hands the runner: cases, each with contenders timed side by side.

A workload is a module in `anyattn.bench.workloads` that defines

    NAME = "softmax"                      # selectable with `anyattn bench NAME`
    DESCRIPTION = "one line"
    def cases(quick: bool) -> list[Case]  # quick=True: small sizes for tests / smoke runs

The runner times every contender of a case in one process, alternating between them, and reports
medians, the ratio to `baseline`, GFLOP/s against the measured matmul roofline of the dtype, the error
against `exact`, and peak memory measured in a fresh subprocess per (case, contender, mode).

Every case is timed forward and forward+backward (unless `backward=False`), in float32 and again in
each low-precision dtype the runner is asked for (`anyattn bench --dtypes`, default float32 and
bfloat16): the runner casts the float32 tensors of `make_inputs` (the dict's values) to that dtype, so a
workload needs no code for it. A case whose inputs hold tensors inside objects gives
`make_inputs_dtype(requires_grad, dtype)`; one that cannot run in low precision at all (work done in other
processes) says so with `dtypes=("float32",)` and `low_precision_note`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Inputs = dict[str, Any]


@dataclass
class Case:
    """One benchmark configuration.

    workload: the workload's NAME; label: e.g. "N=4096 causal"; params: sizes for the JSON.
    flops: useful forward FLOPs (a matmul of (m,k)x(k,n) counts 2mkn); backward is counted as
        2.5x forward (FlashAttention convention) unless `flops_backward` is given.
    make_inputs(requires_grad): fresh inputs; tensors that take gradients when requires_grad.
    contenders: name -> fn(inputs) returning a tensor (or a tuple whose first item is the output).
    forward_only: contenders that have no backward here (e.g. FlexAttention on CPU), with the reason.
    missing: peers that could not be imported, with the reason (reported, never faked).
    baseline: contender the ratios are taken against; exact: contender whose output is the truth for
        the error column (None: no error column).
    backward: also time forward+backward (sum of outputs times a fixed random cotangent).
    skip: contenders not run for this case, with the reason (e.g. a dense reference that would not fit).
    setup_seconds: one-time costs reported separately (e.g. compile time): a number, or a callable
        returning it (called after the contender has run once). Such contenders get an untimed
        warm-up call before timing.
    metrics: figures measured beside the timings (per-rank memory, bytes per rank, load balance...):
        a callable returning a JSON-able dict, called once after timing; printed under the case.
        A case may have metrics and no contenders.
    memory_skip: contenders whose peak memory the memory subprocess cannot see (e.g. work done in
        other processes), with the reason.
    dtypes: the dtypes this case runs in (None: all the runner's); low_precision_note: why not.
    make_inputs_dtype(requires_grad, dtype): inputs in a low-precision dtype, for inputs the runner cannot
        cast itself (default: `make_inputs` with its float32 tensors cast).
    low_precision_skip: contenders not run in low precision, with the reason (e.g. a float32-only peer).
    """

    workload: str
    label: str
    params: dict
    flops: float
    make_inputs: Callable[[bool], Inputs]
    contenders: dict[str, Callable[[Inputs], Any]]
    baseline: str
    exact: str | None = None
    backward: bool = True
    flops_backward: float | None = None
    forward_only: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    setup_seconds: dict[str, float] = field(default_factory=dict)
    metrics: Callable[[], dict] | None = None
    memory_skip: dict[str, str] = field(default_factory=dict)
    dtypes: tuple | None = None
    low_precision_note: str = ""
    make_inputs_dtype: Callable[[bool, torch.dtype], Inputs] | None = None
    low_precision_skip: dict[str, str] = field(default_factory=dict)


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> tuple[Inputs, int]:
    """Inputs with their float32 tensors cast to `dtype` (leaves that took gradients stay leaves that
    take them); returns `(inputs, number of tensors cast)`."""
    out, n = {}, 0
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            x = x.detach().to(dtype).requires_grad_(x.requires_grad)
            n += 1
        out[name] = x
    return out, n


def first_tensor(out) -> torch.Tensor:
    """The output tensor of a contender's return value."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out
