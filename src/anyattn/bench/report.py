"""Present benchmark results: a table on stdout, JSON, and a PNG plot."""
from __future__ import annotations

import json
import os


def _mb(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _ms(s):
    return "-" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def _gf(v):
    return "-" if not v else f"{v:.1f}"


def _pct(frac):
    return f"{100 * frac:.0f}%" if frac else "-"


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _row(n, dt, r, notes):
    vs = "-"
    if r.get("vs_float32_forward"):
        vs = f"{r['vs_float32_forward']:.2f}/" + (f"{r['vs_float32_fwd_bwd']:.2f}" if r.get("vs_float32_fwd_bwd") else "-")
    err = r.get("rel_fro")
    return (f"{n:<22}{_SHORT.get(dt, dt):>5}{_ms(r.get('forward_s')):>9}{r.get('forward_repeats', ''):>3}"
            f"{_x(r.get('speedup_forward')):>8}{_gf(r.get('gflops_forward')):>7}{_pct(r.get('roofline_frac_forward')):>6}"
            f"{_ms(r.get('fwd_bwd_s')):>11}{r.get('fwd_bwd_repeats', ''):>3}{_x(r.get('speedup_fwd_bwd')):>8}"
            f"{_gf(r.get('gflops_fwd_bwd')):>7}"
            f"{_pct(r.get('roofline_frac_fwd_bwd')):>6}{vs:>11}"
            f"{_mb(r.get('peak_bytes_forward')):>9}{_mb(r.get('peak_bytes_fwd_bwd')):>8}"
            f"{('-' if err is None else f'{err:.1e}'):>9}  {'; '.join(notes)}")


def table(results: dict) -> str:
    m = results["machine"]
    roofs = m.get("matmul_gflops") or {"float32": m["matmul_gflops_fp32"]}
    roof_text = ", ".join(f"{_SHORT.get(d, d)} {g:.1f}" for d, g in roofs.items())
    lines = [f"anyattn bench | torch {m['torch']} | {m['threads']} threads | matmul roofline GFLOP/s: {roof_text}",
             "speedup = baseline time / contender time in the same dtype (>1 is faster); times are medians over n "
             "alternating repeats in this process; GF/s and %roof against the matmul roofline of the row's dtype "
             "(fwd+bwd: forward FLOPs x 3.5 unless the case says otherwise); x fp32 = the contender's fp32 time / its "
             "time in this dtype (fwd/fwd+bwd); err = relative Frobenius error vs the exact contender (low "
             "precision: vs its float64 or float32 run on the same rounded inputs)"]
    head = (f"{'contender':<22}{'dtype':>5}{'fwd ms':>9}{'n':>3}{'speedup':>8}{'GF/s':>7}{'roof':>6}"
            f"{'fwd+bwd ms':>11}{'n':>3}{'speedup':>8}{'GF/s':>7}{'roof':>6}{'x fp32':>11}"
            f"{'peak MB':>9}{'f+b MB':>8}{'err':>9}  notes")
    for c in results["cases"]:
        lines.append("")
        lines.append(f"== {c['workload']} | {c['label']} | baseline {c['baseline']}")
        lines.append(head)
        for n, r in c["contenders"].items():
            notes = []
            if r.get("setup_s"):
                notes.append(f"setup {r['setup_s']:.1f} s (compile, SVD...; not in times)")
            if n in c.get("forward_only", {}):
                notes.append("fwd only: " + c["forward_only"][n])
            for key in ("peak_bytes_forward_note", "peak_bytes_fwd_bwd_note"):
                if r.get(key):
                    notes.append("memory " + r[key])
            lines.append(_row(n, "float32", r, notes))
        for dt, run in c.get("dtypes", {}).items():
            if "skipped" in run:
                lines.append(f"{'(all)':<22}{_SHORT.get(dt, dt):>5}  not run: {run['skipped']}")
                continue
            for n, r in run["contenders"].items():
                lines.append(_row(n, dt, r, []))
            if run.get("error_ref"):
                lines.append(f"{'':<22}{_SHORT.get(dt, dt):>5}  err reference: {run['error_ref']}")
            for kind in ("skip", "failed"):
                for n, why in run.get(kind, {}).items():
                    lines.append(f"{n:<22}{_SHORT.get(dt, dt):>5}  {kind}: {why}")
        for n, r in c["contenders"].items():
            if r.get("fwd_bwd_note"):
                lines.append(f"{n:<22}{r['fwd_bwd_note']}")
        for kind in ("skip", "missing", "failed"):
            for n, why in c.get(kind, {}).items():
                lines.append(f"{n:<22}{kind}: {why}")
        for key, val in c.get("metrics", {}).items():
            lines.append(f"  {key}: {val if isinstance(val, (str, int, float)) else json.dumps(val, default=str)}")
    return "\n".join(lines)


def _compared(results: dict):
    """Per case with `params["compare"]`: rows `(case label, ours, peer, dtype, fwd speedup, fwd+bwd speedup,
    our error, peer note)`; speedup = peer time / our time (>1: anyattn is faster)."""
    rows = []
    for c in results["cases"]:
        cmp = c.get("params", {}).get("compare")
        if not cmp:
            continue
        runs = [("float32", c["contenders"], c.get("failed", {}))] + \
            [(dt, r.get("contenders", {}), r.get("failed", {})) for dt, r in c.get("dtypes", {}).items()]
        for dt, cont, failed in runs:
            ours = cont.get(cmp["ours"])
            if ours is None:
                continue
            for p in cmp["peers"]:
                peer = cont.get(p)
                why = c.get("skip", {}).get(p) or c.get("missing", {}).get(p) or failed.get(p)
                fwd = peer["forward_s"] / ours["forward_s"] if peer and peer.get("forward_s") else None
                fb = peer["fwd_bwd_s"] / ours["fwd_bwd_s"] if peer and peer.get("fwd_bwd_s") and ours.get("fwd_bwd_s") \
                    else None
                note = "" if peer else f"not run: {why or 'not in this dtype'}"
                if peer and fb is None and p in c.get("forward_only", {}):
                    note = "fwd+bwd: " + c["forward_only"][p]
                rows.append((c["label"], cmp["ours"], p, dt, fwd, fb, ours.get("rel_fro"), note))
    return rows


def summary(results: dict) -> str | None:
    """The tour's summary: anyattn's contender against each peer per case and dtype (None when no case
    names a comparison)."""
    rows = _compared(results)
    if not rows:
        return None
    lines = ["", "== summary: anyattn vs its strongest runnable peers (speedup = peer time / anyattn time; "
                 "err = anyattn's relative error vs the case's exact contender)",
             f"{'case':<34}{'anyattn':<13}{'peer':<18}{'dtype':>5}{'fwd':>9}{'fwd+bwd':>9}{'err':>10}  notes"]
    for label, ours, peer, dt, fwd, fb, err, note in rows:
        lines.append(f"{label[:33]:<34}{ours:<13}{peer:<18}{_SHORT.get(dt, dt):>5}{_x(fwd):>9}{_x(fb):>9}"
                     f"{('-' if err is None else f'{err:.1e}'):>10}  {note}")
    return "\n".join(lines)


def write_json(results: dict, out_dir: str) -> str:
    """`out_dir/results.json`, written to a temporary file and renamed (a reader never sees half a file,
    `anyattn train` rewrites it after every mixer); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def plot(results: dict, out_dir: str) -> str | None:
    """One PNG: with compared cases (the tour), anyattn's speedup over each peer per case, float32 and bf16,
    forward; otherwise the forward time per contender for each workload (log scale). Returns the path, or
    None when matplotlib is missing (said on stdout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is missing (pip install 'anyattn[bench]'); no PNG written")
        return None
    rows = _compared(results)
    if rows:
        fig = _plot_speedups(plt, rows)
    else:
        fig = _plot_times(plt, results)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_speedups(plt, rows):
    labels = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(3.4 * len(labels), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in rows if r[0] == label and r[4]]
        peers = list(dict.fromkeys(r[2] for r in mine))
        dts = list(dict.fromkeys(r[3] for r in mine))
        width = 0.8 / max(len(dts), 1)
        for j, dt in enumerate(dts):
            ys = [next((r[4] for r in mine if r[2] == p and r[3] == dt), 0) for p in peers]
            ax.bar([i + j * width for i in range(len(peers))], ys, width=width, label=_SHORT.get(dt, dt))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(peers))])
        ax.set_xticklabels(peers, fontsize=8, rotation=20)
        ax.set_yscale("log")
        ax.set_title(f"{label}\n(anyattn: {mine[0][1] if mine else '-'})", fontsize=9)
        ax.set_ylabel("forward speedup of anyattn (peer / anyattn)", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def _plot_times(plt, results):
    workloads = list(dict.fromkeys(c["workload"] for c in results["cases"]))
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 3.6 * len(workloads)), squeeze=False)
    for ax, w in zip(axes[:, 0], workloads):
        cases = [c for c in results["cases"] if c["workload"] == w]
        names = list(dict.fromkeys(n for c in cases for n in c["contenders"]))
        width = 0.8 / max(len(names), 1)
        for j, n in enumerate(names):
            xs, ys = [], []
            for i, c in enumerate(cases):
                r = c["contenders"].get(n)
                if r and r.get("forward_s"):
                    xs.append(i + j * width)
                    ys.append(r["forward_s"] * 1e3)
            ax.bar(xs, ys, width=width, label=n)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([c["label"] for c in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("forward ms (median, fp32)")
        ax.set_title(f"{w}: forward time (lower is better)")
        ax.legend(fontsize=7, ncol=min(len(names), 6))
    return fig
