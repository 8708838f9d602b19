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


def table(results: dict) -> str:
    roof = results["machine"]["matmul_gflops_fp32"]
    lines = [f"anyattn bench | torch {results['machine']['torch']} | {results['machine']['threads']} threads | "
             f"matmul roofline {roof:.1f} GFLOP/s (fp32)",
             "speedup = baseline time / contender time (>1 is faster); times are medians over n alternating "
             "repeats in this process; err = relative Frobenius error vs the exact contender"]
    head = (f"{'contender':<18}{'fwd ms':>10}{'n':>3}{'speedup':>9}{'fwd+bwd ms':>12}{'n':>3}{'speedup':>9}"
            f"{'GFLOP/s':>9}{'%roof':>7}{'peak MB fwd':>12}{'fwd+bwd':>9}{'err':>10}  notes")
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
            frac = r.get("roofline_frac_forward")
            err = r.get("rel_fro")
            lines.append(
                f"{n:<18}{_ms(r.get('forward_s')):>10}{r.get('forward_repeats', ''):>3}{_x(r.get('speedup_forward')):>9}"
                f"{_ms(r.get('fwd_bwd_s')):>12}{r.get('fwd_bwd_repeats', ''):>3}{_x(r.get('speedup_fwd_bwd')):>9}"
                f"{r.get('gflops_forward', 0):>9.1f}{(f'{100 * frac:.0f}%' if frac else '-'):>7}"
                f"{_mb(r.get('peak_bytes_forward')):>12}{_mb(r.get('peak_bytes_fwd_bwd')):>9}"
                f"{('-' if err is None else f'{err:.1e}'):>10}  {'; '.join(notes)}")
        for n, r in c["contenders"].items():
            if r.get("fwd_bwd_note"):
                lines.append(f"{n:<18}{r['fwd_bwd_note']}")
        for kind in ("skip", "missing", "failed"):
            for n, why in c.get(kind, {}).items():
                lines.append(f"{n:<18}{kind}: {why}")
        for key, val in c.get("metrics", {}).items():
            lines.append(f"  {key}: {val if isinstance(val, (str, int, float)) else json.dumps(val, default=str)}")
    return "\n".join(lines)


def write_json(results: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return path


def plot(results: dict, out_dir: str) -> str | None:
    """Forward time per contender for each workload (log scale). Returns the PNG path, or None when
    matplotlib is missing (said on stdout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is missing (pip install 'anyattn[bench]'); no PNG written")
        return None
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
        ax.set_ylabel("forward ms (median)")
        ax.set_title(f"{w}: forward time (lower is better)")
        ax.legend(fontsize=7, ncol=min(len(names), 6))
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
