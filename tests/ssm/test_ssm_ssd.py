import pytest
import torch

from anyattn.ssm import ssd, ssd_ref, ssd_step

from _ssm_helpers import assert_close, grads

linear = pytest.importorskip("anyattn.linear")
if not hasattr(linear, "retention"):
    pytest.skip("anyattn.linear.retention is not available", allow_module_level=True)


def make(B=2, L=21, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=0, extras=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(x=r(B, L, H, P), dt=torch.rand(B, L, H, generator=g, dtype=torch.float64),
             A=-torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.1, B=r(B, L, G, N), C=r(B, L, G, N))
    if extras:
        t.update(D=r(H), z=r(B, L, H, P), initial_state=r(B, H, P, N))
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def call(t, mode, chunk_size=8):
    return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), initial_state=t.get("initial_state"),
               output_final_state=True, mode=mode, chunk_size=chunk_size)


def ref(t):
    return ssd_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("initial_state"))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_ssd_matches_direct_recurrence_float64(mode):
    t = make()
    ins = list(t.values())
    (y, h), g = grads(lambda: call(t, mode), ins)
    (yr, hr), gr = grads(lambda: ref(t), ins)
    assert_close(y, yr, 1e-10, "y")
    assert_close(h, hr, 1e-10, "final state")
    for name, a, b in zip(t, g, gr):
        assert_close(a, b, 1e-9, f"grad {name}")


def test_ssd_float32_and_ungrouped_bc():
    t64 = make(G=1, extras=False)
    t64["B"] = t64["B"][:, :, 0].detach().requires_grad_()       # (B, L, N): one group
    t64["C"] = t64["C"][:, :, 0].detach().requires_grad_()
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    (y, h), g = grads(lambda: call(t32, "chunk"), list(t32.values()))
    with torch.no_grad():
        yr, hr = ssd_ref(t64["x"], t64["dt"], t64["A"], t64["B"].unsqueeze(2), t64["C"].unsqueeze(2))
    assert y.dtype == torch.float32
    assert_close(y.double(), yr, 1e-4, "y")
    assert_close(h.double(), hr, 1e-4, "h")


def test_ssd_mapping_to_retention():
    """ssd(x, dt, A, B, C) == retention(q=C, k=B, v=x*dt, g=dt*A, scale=1) in (B, H, L, .) layout."""
    t = make(G=4, extras=False)
    with torch.no_grad():
        y = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"])
        o = linear.retention(t["C"].transpose(1, 2), t["B"].transpose(1, 2), (t["x"] * t["dt"][..., None]).transpose(1, 2),
                             (t["dt"] * t["A"]).transpose(1, 2), scale=1.0)
    assert_close(y, o.transpose(1, 2), 1e-12)


def test_ssd_dt_bias_softplus_and_steps():
    t = make(L=9)
    bias = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        y, h = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], bias, True,
                   initial_state=t["initial_state"], output_final_state=True)
        dtf = torch.nn.functional.softplus(t["dt"] + bias)
        yr, hr = ssd_ref(t["x"], dtf, t["A"], t["B"], t["C"], t["D"], t["z"], t["initial_state"])
        assert_close(y, yr, 1e-10)
        s = t["initial_state"]
        ys = []
        for i in range(9):
            yi, s = ssd_step(s, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"], t["z"][:, i],
                             bias, True)
            ys.append(yi)
    assert_close(torch.stack(ys, 1), yr, 1e-10, "steps")
    assert_close(s, hr, 1e-10, "step state")
