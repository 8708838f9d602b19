"""GPU figures of issue 17 (`anyattn bench gpu_masked gpu_alibi gpu_neighborhood gpu_linear gpu_scan
--device cuda`): anyattn through `auto` against the fused libraries called directly, on the bench
device, B=1, H=16, D=128, bf16 (quick: tiny fp32 sizes on the bench device, for tests and smoke runs).

- gpu_masked: sliding window, documents, causal & key padding, T5 bias, symmetric ALiBi at N=16384:
  `auto` (method `flex` on CUDA) against hand-written FlexAttention on the same request
  (`create_block_mask(mask_mod)` + `torch.compile(flex_attention)` with the user's score_mod);
  target: within 1.2x.
- gpu_alibi: causal ALiBi at N=32768 through `auto` against unbiased causal flash attention
  (`F.scaled_dot_product_attention(is_causal=True)`); target: within 1.3x.
- gpu_neighborhood: 2-D neighborhood attention 128x128 kernel 13 (and 1-D N=32768 kernel 257) through
  `anyattn.neighborhood` (auto: NATTEN's kernels when installed) against `natten.na2d/na1d` directly.
- gpu_linear: GLA, Gated DeltaNet, KDA at N=8192 through `anyattn.linear.*` (auto: fla's chunk kernels)
  against fla's `chunk_*` called directly (same inputs, fla layout prepared outside the timing).
- gpu_scan: Mamba's selective scan (B=1, D=2048, N=16, L=8192) through `anyattn.ssm.selective_scan`
  (auto: mamba-ssm's kernel) against `mamba_ssm.selective_scan_fn` directly.
Peers that are not installed are reported as missing (the ratio then cannot be read).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..case import Case
from ..device import bench_device
from ..peers import add_flex, attention_flops

DESCRIPTIONS = {
    "gpu_masked": "masked/biased attention via auto (flex on CUDA) vs hand-written FlexAttention, N=16384 bf16",
    "gpu_alibi": "causal ALiBi N=32768 via auto vs unbiased causal flash attention (bf16)",
    "gpu_neighborhood": "neighborhood attention via auto (NATTEN backend) vs natten called directly (bf16)",
    "gpu_linear": "GLA / Gated DeltaNet / KDA via anyattn.linear (fla backend) vs fla chunk kernels (bf16)",
    "gpu_scan": "selective scan via anyattn.ssm (mamba backend) vs mamba_ssm.selective_scan_fn",
}
B, H, D = 1, 16, 128


def _setup(quick):
    dev = bench_device()
    dtype = torch.float32 if quick or dev.type == "cpu" else torch.bfloat16
    return dev, dtype


def _randn(shape, dev, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dev, dtype)


def _qkv(n, h, d, dev, dtype, extra=None):
    def make(requires_grad):
        x = {name: _randn((B, h, n, d), dev, dtype, i).requires_grad_(requires_grad) for i, name in enumerate("qkv")}
        x.update(extra(dev) if extra else {})
        return x
    return make


# ------------------------------------------------------------------------------------ masked / biased

def masked_cases(quick: bool):
    import anyattn
    from anyattn import biases, masks
    dev, dtype = _setup(quick)
    n, h, d = (256, 2, 16) if quick else (16384, H, D)
    docs = torch.repeat_interleave(torch.arange(8), n // 8).to(dev)
    lengths = torch.tensor([n * 3 // 4], device=dev)
    nb, maxd = 32, 128
    table = _randn((nb, h), dev, torch.float32, 9, 0.5)
    lut = biases.t5_bucket(torch.arange(-(n - 1), n, device=dev), True, nb, maxd)
    slopes = biases.Alibi.geometric(h, device=dev).slopes
    requests = {
        "sliding_window_1024": (masks.SlidingWindow(1024 if not quick else 32), None,
                                lambda b, hh, q, k: (k >= q - (1024 if not quick else 32)) & (k <= q), None),
        "documents_8": (masks.Document(docs), None, lambda b, hh, q, k: docs[q] == docs[k], None),
        "causal_key_padding": (masks.Causal() & masks.KeyPadding(lengths), None,
                               lambda b, hh, q, k: (k <= q) & (k < lengths[b]), None),
        "t5_bidirectional": (None, biases.RelativePosition.t5(table, True, maxd), None,
                             lambda s, b, hh, q, k: s + table[lut[k - q + (n - 1)], hh]),
        "alibi_symmetric": (None, biases.Alibi(slopes), None,
                            lambda s, b, hh, q, k: s - slopes[hh] * (q - k).abs()),
    }
    out = []
    for label, (mask, bias, mask_mod, score_mod) in requests.items():
        contenders = {"auto": lambda x, m=mask, bb=bias: anyattn.attention(x["q"], x["k"], x["v"], mask=m, bias=bb)}
        case = Case("gpu_masked", f"N={n} {label}", {"B": B, "H": h, "N": n, "D": d, "dtype": str(dtype)},
                    attention_flops(B, h, n, n, d, d), _qkv(n, h, d, dev, dtype), contenders, baseline="flex",
                    exact=None)
        if quick and dev.type == "cpu":
            case.contenders["blocked"] = lambda x, m=mask, bb=bias: anyattn.attention(
                x["q"], x["k"], x["v"], mask=m, bias=bb, method="blocked")
            case.baseline = "blocked"
            case.skip["flex"] = "not compiled in quick CPU runs (compiling takes 10-40 s)"
        else:
            add_flex(case, n, n, mask_mod=mask_mod, score_mod=(lambda x, f=score_mod: f) if score_mod else None)
        out.append(case)
    return out


def alibi_cases(quick: bool):
    import anyattn
    from anyattn import biases, masks
    dev, dtype = _setup(quick)
    n, h, d = (256, 2, 16) if quick else (32768, H, D)
    slopes = biases.Alibi.geometric(h, device=dev).slopes
    contenders = {
        "causal_flash": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True),
        "auto": lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=masks.Causal(), bias=biases.Alibi(slopes)),
    }
    case = Case("gpu_alibi", f"N={n} causal ALiBi", {"B": B, "H": h, "N": n, "D": d, "dtype": str(dtype)},
                attention_flops(B, h, n, n, d, d, causal=True), _qkv(n, h, d, dev, dtype), contenders,
                baseline="causal_flash", exact=None)
    return [case]


# ------------------------------------------------------------------------------------ neighborhood

def _natten_direct(fn, kernel):
    def run(x):
        return fn(x["qn"], x["kn"], x["vn"], kernel_size=kernel)
    return run


def neighborhood_cases(quick: bool):
    import anyattn
    from ...backends import natten as natten_b
    dev, dtype = _setup(quick)
    configs = [((16, 16), 5), ((32,), 9)] if quick else [((128, 128), 13), ((32768,), 257)]
    h, d = (2, 16) if quick else (H, D)
    out = []
    for spatial, kernel in configs:
        n = math.prod(spatial)

        def make(requires_grad, spatial=spatial):
            x = {name: _randn((B, h, *spatial, d), dev, dtype, i).requires_grad_(requires_grad)
                 for i, name in enumerate("qkv")}
            for name in "qkv":  # NATTEN's layout, prepared outside the timing
                x[name + "n"] = x[name].detach().movedim(1, -2).contiguous().requires_grad_(requires_grad)
            return x
        contenders = {"auto": lambda x, k=kernel: anyattn.neighborhood(x["q"], x["k"], x["v"], k)}
        kt = (kernel,) * len(spatial)
        case = Case("gpu_neighborhood", f"{'x'.join(map(str, spatial))} kernel {kernel}",
                    {"B": B, "H": h, "D": d, "spatial": list(spatial), "kernel": kernel, "dtype": str(dtype)},
                    4.0 * B * h * n * math.prod(kt) * d, make, contenders, baseline="auto", exact=None)
        why = natten_b.import_error()
        if why is None and dev.type == "cuda":
            import natten
            contenders["natten"] = _natten_direct({1: natten.na1d, 2: natten.na2d}[len(spatial)], kernel)
            case.baseline = "natten"
        else:
            case.missing["natten"] = why or f"NATTEN's kernels need CUDA (device {dev.type})"
        out.append(case)
    return out


# ------------------------------------------------------------------------------------------ linear

def linear_cases(quick: bool):
    from ... import linear as L
    from ...backends import fla as fla_b
    dev, dtype = _setup(quick)
    n, h, d = (256, 2, 16) if quick else (8192, H, D)
    ops = {"gla": "vector", "gated_delta_rule": "scalar", "kda": "vector"}
    out = []
    for op, gate in ops.items():
        def make(requires_grad, op=op, gate=gate):
            q = _randn((B, h, n, d), dev, dtype, 1)
            k = F.normalize(_randn((B, h, n, d), dev, torch.float32, 2), dim=-1).to(dtype)
            v = _randn((B, h, n, d), dev, dtype, 3)
            gshape = (B, h, n, d) if gate == "vector" else (B, h, n)
            g = (-torch.rand(gshape, generator=torch.Generator().manual_seed(4)) * 0.1).to(dev)
            x = {"q": q, "k": k, "v": v, "g": g}
            if op != "gla":
                x["beta"] = torch.rand((B, h, n), generator=torch.Generator().manual_seed(5)).to(dev)
            for name in list(x):  # fla's (B, T, H, ...) layout, prepared outside the timing
                x[name + "_t"] = x[name].transpose(1, 2).contiguous()
            return {name: t.requires_grad_(requires_grad) for name, t in x.items()}

        fn = getattr(L, op)
        args = ("g",) if op == "gla" else ("g", "beta")
        contenders = {"auto": lambda x, fn=fn, args=args: fn(x["q"], x["k"], x["v"], *(x[a] for a in args))}
        case = Case("gpu_linear", f"{op} N={n}", {"B": B, "H": h, "N": n, "D": d, "dtype": str(dtype)},
                    B * h * (n / 64) * (6 * 64 * 64 * d + 8 * 64 * d * d), make, contenders, baseline="auto",
                    exact=None)
        why = fla_b.import_error(op)
        if why is None and dev.type == "cuda":
            mod_name, fn_name = fla_b.OPS[op]
            kern = getattr(__import__(mod_name, fromlist=[fn_name]), fn_name)
            kw = ("g",) if op == "gla" else ("g", "beta")
            contenders["fla"] = lambda x, kern=kern, kw=kw: kern(x["q_t"], x["k_t"], x["v_t"],
                                                                   **{a: x[a + "_t"] for a in kw})
            case.baseline = "fla"
        else:
            case.missing["fla"] = why or f"fla's kernels need CUDA (device {dev.type})"
        out.append(case)
    return out


# -------------------------------------------------------------------------------------------- scan

def scan_cases(quick: bool):
    from ... import ssm
    from ...backends import mamba as mamba_b
    dev, dtype = _setup(quick)
    Bsz, Dm, N, L = (1, 32, 8, 256) if quick else (1, 2048, 16, 8192)

    def make(requires_grad):
        g = torch.Generator().manual_seed(0)
        x = {"u": torch.randn(Bsz, Dm, L, generator=g), "delta": torch.randn(Bsz, Dm, L, generator=g) * 0.5,
             "A": -torch.rand(Dm, N, generator=g) - 0.5, "B": torch.randn(Bsz, N, L, generator=g),
             "C": torch.randn(Bsz, N, L, generator=g), "D": torch.randn(Dm, generator=g),
             "z": torch.randn(Bsz, Dm, L, generator=g), "delta_bias": torch.randn(Dm, generator=g) * 0.1}
        x = {k_: t.to(dev, dtype if k_ in ("u", "delta", "z") else torch.float32) for k_, t in x.items()}
        return {k_: t.requires_grad_(requires_grad) for k_, t in x.items()}

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    contenders = {"auto": lambda x: ssm.selective_scan(*(x[n_] for n_ in names), delta_softplus=True)}
    case = Case("gpu_scan", f"selective scan D={Dm} N={N} L={L}",
                {"B": Bsz, "D": Dm, "N": N, "L": L, "dtype": str(dtype)}, 9.0 * Bsz * Dm * N * L, make, contenders,
                baseline="auto", exact=None)
    why = mamba_b.import_error()
    if why is None and dev.type == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        contenders["mamba_ssm"] = lambda x: selective_scan_fn(*(x[n_] for n_ in names), delta_softplus=True)
        case.baseline = "mamba_ssm"
    else:
        case.missing["mamba_ssm"] = why or f"mamba-ssm's kernel needs CUDA (device {dev.type})"
    return [case]


WORKLOADS = {"gpu_masked": masked_cases, "gpu_alibi": alibi_cases, "gpu_neighborhood": neighborhood_cases,
             "gpu_linear": linear_cases, "gpu_scan": scan_cases}
