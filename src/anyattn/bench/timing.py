"""Wall-clock timing of several contenders in one process: alternating rounds, medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def sync(device_type: str = "cpu") -> None:
    import torch
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device_type: str = "cpu") -> float:
    sync(device_type)
    t0 = time.perf_counter()
    fn()
    sync(device_type)
    return time.perf_counter() - t0


def alternating(fns: dict[str, Callable[[], object]], *, budget_s: float = 20.0, min_repeats: int = 3,
                max_repeats: int = 15, warmup: bool = True, device_type: str = "cpu") -> dict[str, list[float]]:
    """Time each function in rounds, rotating the order every round so drift and noise hit all alike.

    A first warm-up round (discarded when `warmup`) estimates the round time; the number of rounds is
    then `budget_s / round_time` clamped to [min_repeats, max_repeats] (at least 1 when a round
    alone exceeds the budget). Returns name -> list of seconds.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    first = {n: time_once(fns[n], device_type) for n in names}
    round_time = sum(first.values())
    repeats = int(budget_s // max(round_time, 1e-9))
    repeats = max(min_repeats if round_time * min_repeats <= 3 * budget_s else 1, min(max_repeats, repeats))
    if not warmup or round_time > budget_s:
        for n in names:
            times[n].append(first[n])
        repeats -= 1
    for r in range(max(repeats, 0)):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(time_once(fns[n], device_type))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
