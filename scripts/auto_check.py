"""Issue 14's `auto` check on an `anyattn bench` results.json: per case and dtype, auto's time against the
fastest exact anyattn method of the case (the methods auto chooses among), forward and forward+backward.

    anyattn tune
    anyattn bench softmax alibi t5 swin spatial na1d na2d na3d --no-memory --out bench-auto
    python scripts/auto_check.py bench-auto/results.json      # exit 1 if auto is > 5% slower anywhere
"""
import json
import sys

EXACT = ("sdpa", "torch_sdpa", "blocked", "lowrank_bias", "sdpa_materialized", "anyattn")
LIMIT = 1.05


def main(path):
    res = json.load(open(path))
    worst = 0.0
    print(f"{'case':<44}{'dtype':>9}{'mode':>9}{'auto ms':>10}{'fastest exact':>24}{'ratio':>8}")
    for c in res["cases"]:
        runs = [("float32", c["contenders"])] + [(d, r.get("contenders", {})) for d, r in c.get("dtypes", {}).items()]
        for dt, cont in runs:
            if "auto" not in cont:
                continue
            for mode in ("forward_s", "fwd_bwd_s"):
                exact = {n: r[mode] for n, r in cont.items() if n in EXACT and r.get(mode)}
                if not exact or not cont["auto"].get(mode):
                    continue
                best = min(exact, key=exact.get)
                ratio = cont["auto"][mode] / exact[best]
                worst = max(worst, ratio)
                flag = "" if ratio <= LIMIT else "  <-- over 5%"
                print(f"{c['workload'] + ' ' + c['label']:<44.44}{dt:>9}{mode[:-2]:>9}{cont['auto'][mode] * 1e3:>10.1f}"
                      f"{best + f' {exact[best] * 1e3:.1f}':>24}{ratio:>8.3f}{flag}")
    print(f"worst auto / fastest exact: {worst:.3f}")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
