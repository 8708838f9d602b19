"""`anyattn bench | check | explain | train | tune` command line."""
from __future__ import annotations

import argparse
import os
import sys


def _bench(args):
    from .bench import report, runner
    from .bench.workloads import names
    if args.list:
        from .bench.workloads import registry
        for n, (_, desc) in sorted(registry().items()):
            print(f"{n:<12} {desc}")
        return 0
    os.environ["ANYATTN_BENCH_OUT"] = args.out    # workloads that write extra files (plots) put them there
    chosen = args.workloads or ["tour"]
    unknown = [w for w in chosen if w not in names()]
    if unknown:
        print(f"unknown workload(s) {unknown}; available: {names()}", file=sys.stderr)
        return 2
    if args.device is not None:
        import torch
        from .bench.device import ENV
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            print(f"--device {args.device}: torch.cuda.is_available() is False here", file=sys.stderr)
            return 2
        os.environ[ENV] = args.device  # read by the runner, the workloads and the memory subprocesses
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
        os.environ["ANYATTN_BENCH_THREADS"] = str(args.threads)  # for the memory subprocesses
    dtypes = _dtypes(args.dtypes)
    results = runner.run(chosen, quick=args.quick, memory=not args.no_memory, budget_s=args.budget,
                         progress=not args.no_progress, memory_max_s=args.memory_max, dtypes=dtypes)
    print(report.table(results))
    text = report.summary(results)
    if text:
        print(text)
    path = report.write_json(results, args.out)
    png = report.plot(results, args.out)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0


def _dtypes(text: str) -> tuple:
    out = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in out if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise SystemExit(f"--dtypes must list float32, bfloat16 or float16, got {bad}")
    return out


def _tune(args):
    import torch

    from .tune import cache_path
    from .tune.measure import SECTIONS, run
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cache:
        os.environ["ANYATTN_TUNE_CACHE"] = args.cache
    sections = tuple(s.strip() for s in args.only.split(",")) if args.only else SECTIONS
    if cache_path() is None:
        print("the tune cache is disabled (ANYATTN_TUNE_CACHE is empty or 'none'); pass --cache PATH", file=sys.stderr)
        return 2
    path, entries = run(sections, dtypes=_dtypes(args.dtypes), quick=args.quick, budget_s=args.budget,
                        progress=not args.no_progress)
    n = sum(len(v) for v in entries.values())
    print(f"wrote {n} measured entries to {path} (read by method='auto', the blocked engine's block sizes and the "
          "neighborhood engine's tiles; anyattn explain quotes them; delete the file to return to the defaults)")
    return 0


def _check(args):
    """Every registered exact method against the float64 reference on random inputs."""
    import torch

    import anyattn
    from anyattn.registry import all_methods
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, 47, 16, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 47, 16, dtype=torch.float64, generator=g)
    want = anyattn.attention(q, k, v, mask=anyattn.masks.Causal(), method="reference")
    worst = 0.0
    for name, m in sorted(all_methods().items()):
        if not m.exact:
            continue
        try:
            out = anyattn.attention(q, k, v, mask=anyattn.masks.Causal(), method=name)
        except ValueError as e:
            print(f"{name:<14} not applicable: {e}")
            continue
        err = float((out - want).abs().max())
        worst = max(worst, err)
        print(f"{name:<14} max abs error vs reference (float64): {err:.2e}")
    return 0 if worst < 1e-8 else 1


def _explain(args):
    import torch

    import anyattn
    q = torch.randn(args.batch, args.heads, args.n_q, args.dim)
    k = torch.randn(args.batch, args.kv_heads or args.heads, args.n_k or args.n_q, args.dim)
    v = torch.randn_like(k)
    mask = {"none": None, "causal": anyattn.masks.Causal(),
            "window": anyattn.masks.SlidingWindow(args.window, 0)}[args.mask]
    print(anyattn.explain(q, k, v, mask=mask, return_lse=args.lse))
    return 0


def _train(args):
    import torch

    from .train.loop import run
    from .train.report import plot, table
    if args.device is not None and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be a positive int, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.corpus is not None and args.task != "lm":
        print(f"--corpus is for --task lm, not {args.task}", file=sys.stderr)
        return 2
    if args.corpus is not None and not os.path.isfile(args.corpus):
        print(f"--corpus {args.corpus}: no such file", file=sys.stderr)
        return 2
    try:
        results = run(args.task, args.mixers, args.preset, args.out, seed=args.seed, steps=args.steps,
                      device=args.device or "cpu", resume=args.resume, corpus=args.corpus,
                      progress=not args.no_progress)
    except ValueError as e:
        print(f"anyattn train: {e}", file=sys.stderr)
        return 2
    print(table(results))
    png = plot(results, args.out)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}" + (f" and {png}" if png else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="anyattn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time methods and peers side by side (table, JSON, PNG)")
    b.add_argument("workloads", nargs="*", help="workload names (default: tour, the demo); --list shows them")
    b.add_argument("--list", action="store_true", help="list workloads and exit")
    b.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    b.add_argument("--out", default="bench-out", help="output folder for results.json and bench.png")
    b.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory subprocesses")
    b.add_argument("--budget", type=float, default=6.0, help="seconds of timing per case and mode (sets repeats)")
    b.add_argument("--memory-max", type=float, default=20.0,
                   help="skip the memory re-run of contenders whose one run takes longer (seconds)")
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    b.add_argument("--device", default=None, help="device to run on, e.g. cuda (default: cpu); inputs are moved "
                   "there, times synchronize it, GPU memory is torch.cuda.max_memory_allocated")
    b.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated dtypes every case runs in (float32 first; the others cast its inputs)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=_bench)
    tr = sub.add_parser("train", help="train small models with each mixer: quality against throughput")
    tr.add_argument("--task", choices=["mqar", "copy", "lm"], required=True)
    tr.add_argument("--mixers", required=True, help="comma-separated mixers, each a +-joined pattern of "
                    "name[:key=value...] (names: anyattn.nn.MIXERS), e.g. attention,gated_deltanet,"
                    "attention:method=performer,gated_deltanet+attention")
    tr.add_argument("--preset", choices=["quick", "standard"], default="quick",
                    help="quick: 2 CPU cores, minutes per mixer; standard: Zoology's grid with a learning-rate sweep")
    tr.add_argument("--out", default="train-out", help="output folder (checkpoints, results.json, the plot)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=None, help="step budget of every mixer (default: the preset's)")
    tr.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    tr.add_argument("--corpus", default=None, help="text file for --task lm (default: the standard library's "
                                                   "docstrings and pydoc_data.topics)")
    tr.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=_train)
    t = sub.add_parser("tune", help="measure this machine's crossovers into the tune cache that auto reads")
    t.add_argument("--only", default=None, help="comma-separated sections: softmax, bias, neighborhood, linear "
                                                "(default: all)")
    t.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to measure")
    t.add_argument("--budget", type=float, default=3.0, help="seconds of timing per measurement (sets repeats)")
    t.add_argument("--cache", default=None, help="cache file (default: $ANYATTN_TUNE_CACHE, else "
                                                 "~/.cache/anyattn/tune.json)")
    t.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test; the numbers mean nothing)")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_tune)
    c = sub.add_parser("check", help="every exact method against the float64 reference")
    c.set_defaults(fn=_check)
    e = sub.add_parser("explain", help="what method='auto' picks for a shape and mask, and why")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--heads", type=int, default=8)
    e.add_argument("--kv-heads", type=int, default=None)
    e.add_argument("--n-q", type=int, default=1024)
    e.add_argument("--n-k", type=int, default=None)
    e.add_argument("--dim", type=int, default=64)
    e.add_argument("--mask", choices=["none", "causal", "window"], default="none")
    e.add_argument("--window", type=int, default=256)
    e.add_argument("--lse", action="store_true")
    e.set_defaults(fn=_explain)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
