import torch


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(a, b, rtol, name=""):
    err = rel_err(a, b)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def grads(out_fn, inputs, seed=123):
    """Gradients of a fixed random projection of out_fn's outputs w.r.t. inputs."""
    outs = out_fn()
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        if o is None:
            continue
        o = o.real if o.is_complex() else o
        w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
        loss = loss + (o * w).sum()
    return outs, torch.autograd.grad(loss, inputs, allow_unused=True)
