"""The `decode` benchmark workload builds, runs in quick mode, and reports honest cache bytes."""
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads import decode as wl


def test_quick_cases_run_and_bytes_match_the_caches():
    cases = wl.WORKLOADS["decode"](True)
    assert {c.params["N"] for c in cases} == {256} and len(cases) == 4
    for case in cases[2:]:  # the H_kv = 2 (GQA) pair; the H_kv = 8 pair runs the same code
        x = case.make_inputs(False)
        outs = {n: first_tensor(fn(x)) for n, fn in case.contenders.items()}
        assert all(torch.isfinite(o).all() for o in outs.values())
        if case.exact:
            ref = outs["exact"]
            for n in ("sdpa", "tokenselect", "pca_r32", "int8"):
                cos = torch.nn.functional.cosine_similarity(outs[n].flatten(), ref.flatten(), dim=0)
                assert cos > 0.99, (n, float(cos))
            torch.testing.assert_close(outs["sdpa"], ref, atol=1e-5, rtol=1e-5)
            b = case.params["cache_bytes"]
            assert b["exact"] == x["cache"].stored_bytes()
            assert b["pca_r32"] == x["pca_cache"].stored_bytes() == b["exact"] // 2
            assert b["int8"] == x["int8_cache"].stored_bytes()
            assert x["cache"].stats["selections"] >= 2 and x["cache"].stats["reuses"] >= 1


def test_generator_concentrates_attention():
    data = wl.concentrated(2048, 2)
    q, k = data["q"][0], data["k"]
    s = (q.view(1, 2, 4, 1, 64) @ k[:, :, None].transpose(-1, -2)).squeeze(-2) / 8  # (1, H_kv, G, N)
    p = torch.softmax(s, -1)
    assert p[..., data["needles"]].sum(-1).min() > 0.99
