"""Results of `anyattn train`: a text table, `results.json`, and `quality_vs_speed.png` (test accuracy or
validation bits per byte against training tokens/s, one labelled point per mixer and setting, the label
carrying the state size). With a learning-rate sweep (the `standard` presets) the table and the plot keep the
best run of each mixer and setting (`best_runs`); the JSON keeps every run.
"""
from __future__ import annotations

import os

from ..bench.report import write_json  # noqa: F401  (one results.json writer: atomic, shared with the bench)


def best_runs(results: dict) -> list[dict]:
    """Per (mixer, setting without the learning rate) the run with the best `best` metric (highest accuracy,
    lowest bits per byte), in the order the runs were made."""
    keep: dict = {}
    for r in results["runs"]:
        key = (r["mixer"], r["group"])
        old = keep.get(key)
        lower = r["metric"] == "bpb"
        if old is None or (r["best"] < old["best"] if lower else r["best"] > old["best"]):
            keep[key] = r
    return list(keep.values())


def _state(n: int, grows: bool) -> str:
    s = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
    return s + (" (grows with L)" if grows else "")


def table(results: dict) -> str:
    """The text table: one row per mixer and setting (best learning rate)."""
    rows = best_runs(results)
    metric = rows[0]["metric"] if rows else "accuracy"
    w = max([len(r["mixer"]) for r in rows] + [20]) + 2
    head = (f"{'mixer':<{w}}{'setting':<26}{'params':>9}{'state':>22}{'steps':>7}"
            f"{'best ' + metric:>15}{'final':>8}{'tok/s':>10}{'wall s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        state = _state(r["state_size"], r["state_grows"])
        lines.append(f"{r['mixer']:<{w}}{r['setting']:<26}{r['params']:>9,}{state:>22}"
                     f"{r['steps']:>7}{r['best']:>15.4f}{r['final']:>8.4f}{r['tokens_per_s']:>10,.0f}"
                     f"{r['wall_s']:>8.1f}")
    env = results["environment"]
    lines.append(f"task {results['task']}, preset {results['preset']}, seed {results['seed']}; torch {env['torch']}, "
                 f"Python {env['python']}, {env['threads']} threads, {env['device']}")
    c = results.get("corpus")
    if c:
        lines.append(f"corpus {c['source']} (sha256 {c['sha256'][:16]}..., Python {c['python_version']}): "
                     f"unigram {c['unigram_bpb']:.3f} bits/byte, bigram {c['bigram_bpb']:.3f} bits/byte")
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> str | None:
    """`out_dir/quality_vs_speed.png`; returns the path, or None when matplotlib is missing (said on stdout)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is missing (pip install matplotlib); no PNG written")
        return None
    rows = best_runs(results)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    several = len({r["group"] for r in rows}) > 1
    for r in rows:
        ax.scatter(r["tokens_per_s"], r["best"], s=30)
        label = (r["mixer"] + (f" [{r['group']}]" if several else "")
                 + f"\nstate {_state(r['state_size'], r['state_grows'])}")
        ax.annotate(label, (r["tokens_per_s"], r["best"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    c = results.get("corpus")
    if c:
        for name in ("unigram", "bigram"):
            ax.axhline(c[f"{name}_bpb"], color="grey", lw=0.8, ls="--")
            ax.text(ax.get_xlim()[0], c[f"{name}_bpb"], f" {name}", fontsize=7, va="bottom", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("training throughput (tokens/s)")
    if rows and rows[0]["metric"] == "bpb":
        ax.set_ylabel("best validation bits per byte (lower is better)")
    else:
        ax.set_ylabel("best test accuracy")
        ax.set_ylim(-0.02, 1.05)
    env = results["environment"]
    ax.set_title(f"anyattn train: {results['task']} ({results['preset']}), {env['device']}, {env['threads']} threads",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "quality_vs_speed.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
