"""The bench layer's low-precision runs (inputs cast by the runner, roofline per dtype, error vs float64 on
the rounded inputs) and the tour's summary and figure, on tiny sizes."""
import torch

from anyattn.bench import report, runner
from anyattn.bench.case import Case, cast_inputs
from anyattn.bench.runner import Progress, run_case


def test_cast_inputs_keeps_leaves_and_other_values():
    x = {"a": torch.ones(2, requires_grad=True), "i": torch.arange(3), "obj": "text", "d": torch.ones(1).double()}
    y, n = cast_inputs(x, torch.bfloat16)
    assert n == 1 and y["a"].dtype == torch.bfloat16 and y["a"].requires_grad and y["a"].is_leaf
    assert y["i"] is x["i"] and y["obj"] == "text" and y["d"].dtype == torch.float64


def test_softmax_case_runs_in_bf16_beside_fp32():
    res = runner.run(["softmax"], quick=True, memory=False, budget_s=0.01, progress=False,
                     dtypes=("float32", "bfloat16"))
    assert set(res["machine"]["matmul_gflops"]) == {"float32", "bfloat16"}
    case = res["cases"][1]  # causal
    low = case["dtypes"]["bfloat16"]
    assert "float64" in low["error_ref"]
    for n in ("torch_sdpa", "blocked", "auto"):
        r = low["contenders"][n]
        assert r["forward_s"] > 0 and r["fwd_bwd_s"] > 0 and r["vs_float32_forward"] > 0
        assert 0 < r["rel_fro"] < 2e-2  # bf16-sized, measured against float64
        assert r["roofline_frac_forward"] is not None and r["gflops_fwd_bwd"] > 0
    text = report.table(res)
    assert " bf16 " in text and "err reference" in text


def test_cases_that_cannot_run_in_low_precision_say_why():
    mk = lambda g: {"x": torch.ones(3, requires_grad=g)}  # noqa: E731
    fp32_only = Case("t", "a", {}, 1.0, mk, {"ok": lambda x: x["x"] * 2}, baseline="ok", dtypes=("float32",),
                     low_precision_note="runs in other processes")
    no_float = Case("t", "b", {}, 1.0, lambda g: {"n": 3}, {"ok": lambda x: torch.ones(1) * x["n"]},
                    baseline="ok", backward=False)
    for case, why in ((fp32_only, "other processes"), (no_float, "no float32 tensor")):
        res = run_case(case, 0, quick=True, memory=False, budget_s=0.01, roofline={"float32": 1.0},
                       progress=Progress(1, False), dtypes=("float32", "bfloat16"))
        assert why in res["dtypes"]["bfloat16"]["skipped"]
        assert res["contenders"]["ok"]["forward_s"] > 0


def test_tour_summary_and_figure(tmp_path):
    res = runner.run(["tour"], quick=True, memory=False, budget_s=0.01, progress=False, dtypes=("float32",))
    assert len(res["cases"]) == 4
    text = report.summary(res)
    for case in ("causal ALiBi", "neighborhood 2-D", "Gated DeltaNet", "decode"):
        assert case in text
    assert "fla_naive_chunk" in text and "natten" in text and "flex" in text  # flex: reported as not run
    png = report.plot(res, str(tmp_path))
    assert png is None or open(png, "rb").read(4) == b"\x89PNG"
