"""anyattn.nn.generate drives stacks of softmax (KV cache) and linear-family (recurrent state) layers."""
import pytest
import torch

from anyattn.cache import KVCache
from anyattn.nn.attention import Attention
from anyattn.nn.generate import generate, prefill, reorder_states, step

try:
    from anyattn.nn.linear_layers import GatedDeltaNetLayer, GLALayer, KDALayer
    LINEAR = True
except ImportError:  # pragma: no cover - depends on the tree
    LINEAR = False
try:
    from anyattn.nn.ssm_layers import MambaBlock
    SSM = True
except ImportError:  # pragma: no cover - depends on the tree
    SSM = False


def _x(B, N, dim, seed=0, dtype=torch.float64):
    return torch.randn(B, N, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _uncached(layers, x):
    with torch.no_grad():
        for layer in layers:
            x, _ = layer(x)
    return x


def _stack(kind):
    torch.manual_seed(0)
    dim = 32
    if kind == "attention":
        return [Attention(dim, 4, 2), Attention(dim, 4, 1)], torch.float32, 2e-5
    if kind == "hybrid":
        layers = [GLALayer(dim, 2), Attention(dim, 4, 2), GatedDeltaNetLayer(dim, 2), KDALayer(dim, 2)]
        if SSM:
            layers.append(MambaBlock(dim))
        return layers, torch.float32, 2e-4
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["attention", "hybrid"])
def test_generate_equals_uncached_stack(kind):
    if kind == "hybrid" and not LINEAR:
        pytest.skip("anyattn.nn.linear_layers is not importable")
    layers, dtype, tol = _stack(kind)
    prompt = _x(2, 4, 32, dtype=dtype)
    proj = torch.nn.Linear(32, 32).to(dtype)
    fn = lambda y: torch.tanh(proj(y))  # noqa: E731  (stands in for embed(argmax(head(y))))
    out, states = generate(layers, prompt, 2, next_input=fn, return_prompt_output=True)
    assert out.shape == (2, 6, 32) and len(states) == len(layers)
    # the inputs that were fed: prompt, then fn of each previous output
    with torch.no_grad():
        fed = torch.cat([prompt, fn(out[:, 3:5])], 1)
    torch.testing.assert_close(out, _uncached(layers, fed), atol=tol, rtol=tol)
    gen, _ = generate(layers, prompt, 2, next_input=fn)
    torch.testing.assert_close(gen, out[:, 4:], atol=tol, rtol=tol)


def test_reorder_states_for_beam_search():
    layers = [Attention(16, 2, 1, dtype=torch.float64)]
    if LINEAR:
        layers.append(GatedDeltaNetLayer(16, 2).double())
    prompt = _x(3, 4, 16)
    with torch.no_grad():
        _, states = prefill(layers, prompt)
        idx = torch.tensor([2, 0, 0])
        states = reorder_states(states, idx)
        x_t = _x(3, 1, 16, seed=1)
        y, _ = step(layers, x_t, states)
        _, fresh = prefill(layers, prompt[idx])
        want, _ = step(layers, x_t, fresh)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=1e-10)
    assert isinstance(states[0], KVCache) and states[0].B == 3


def test_generate_bad_inputs():
    layer = Attention(16, 2, dtype=torch.float64)
    prompt = _x(1, 3, 16)
    with pytest.raises(TypeError, match=r"must return \(y, new_state\)"):
        generate([lambda x, state=None, use_cache=False: x], prompt, 2)
    with pytest.raises(ValueError, match=r"next_input must return a \(B=1, T, dim\) tensor, got \(1, 16\)"):
        generate(layer, prompt, 2, next_input=lambda y: y[0])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate(layer, prompt, -1)
    with pytest.raises(ValueError, match="states must hold one state per layer"):
        step([layer], _x(1, 1, 16), [None, None])
    with pytest.raises(ValueError, match="step needs the states from prefill"):
        step([layer], _x(1, 1, 16), None)
    with pytest.raises(TypeError, match="cannot reorder a state of type str"):
        reorder_states(["x"], torch.tensor([0]))
    out, _ = generate(layer, prompt, 0)
    assert out.shape == (1, 0, 16)
