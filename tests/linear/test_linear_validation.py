"""Bad inputs raise ValueError / TypeError naming the argument, the expected and the given value."""
import pytest
import torch

from anyattn import linear as L

B, H, N, K, V = 2, 3, 5, 4, 6


def qkv(dtype=torch.float32):
    return torch.randn(B, H, N, K, dtype=dtype), torch.randn(B, H, N, K, dtype=dtype), torch.randn(B, H, N, V, dtype=dtype)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got shape \(3, 5, 4\)"):
        L.gla(q[0], k, v, torch.zeros(B, H, N, K))


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        L.retention(q, [1, 2], v, torch.zeros(H))


def test_k_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have q's shape \(B, H, N, D_k\) = \(2, 3, 5, 4\) "
                                         r"\(or fewer heads H dividing q's\), got \(2, 3, 5, 7\)"):
        L.delta_rule(q, torch.randn(B, H, N, 7), v, torch.rand(B, H, N))


def test_kv_heads_must_divide_query_heads():
    q = torch.randn(B, 6, N, K)
    with pytest.raises(ValueError, match=r"k must have a number of heads dividing q's H_q = 6 \(grouped-query\), got 4"):
        L.gla(q, torch.randn(B, 4, N, K), torch.randn(B, 4, N, V), torch.zeros(B, 4, N, K))
    with pytest.raises(ValueError, match=r"k_t must have a number of heads dividing q_t's H_q = 6 \(grouped-query\), got 4"):
        L.gla_step(q[:, :, 0], torch.randn(B, 4, K), torch.randn(B, 4, V), torch.zeros(B, 4, K))


def test_gates_and_state_follow_the_key_heads():
    q = torch.randn(B, 6, N, K)
    k, v = torch.randn(B, 3, N, K), torch.randn(B, 3, N, V)
    with pytest.raises(ValueError, match=r"g must have shape \(B, H, N\) = \(2, 3, 5\), got \(2, 6, 5\)"):
        L.gated_delta_rule(q, k, v, torch.zeros(B, 6, N), torch.rand(B, 3, N))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, D_k, D_v\) = \(2, 3, 4, 6\), got \(2, 6, 4, 6\)"):
        L.retention(q, k, v, torch.zeros(3), initial_state=torch.zeros(B, 6, K, V))


def test_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, N, D_v\) with \(B, H, N\) = \(2, 3, 5\), got \(2, 3, 4, 6\)"):
        L.kda(q, k, v[:, :, :4], torch.zeros(B, H, N, K), torch.rand(B, H, N))


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="v must have q's dtype torch.float32, got torch.float64"):
        L.gla(q, k, v.double(), torch.zeros(B, H, N, K))


def test_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must have a floating dtype .* got torch.int64"):
        L.gla(q.long(), k.long(), v.long(), torch.zeros(B, H, N, K))


def test_device_mismatch():
    q, k, v = qkv()
    meta = torch.empty(B, H, N, K, device="meta")
    with pytest.raises(ValueError, match="k must be on q's device cpu, got meta"):
        L.gla(q, meta, v, torch.zeros(B, H, N, K))
    with pytest.raises(ValueError, match="g must be on q's device cpu, got meta"):
        L.gla(q, k, v, torch.empty(B, H, N, K, device="meta"))


def test_g_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"g must have shape \(B, H, N, D_k\) = \(2, 3, 5, 4\), got \(2, 3, 5\)"):
        L.gla(q, k, v, torch.zeros(B, H, N))
    with pytest.raises(ValueError, match=r"g must have shape \(B, H, N\) = \(2, 3, 5\), got \(2, 3, 5, 4\)"):
        L.gated_delta_rule(q, k, v, torch.zeros(B, H, N, K), torch.rand(B, H, N))
    with pytest.raises(ValueError, match=r"g must have shape \(H,\) = \(3,\) or \(B, H, N\) = \(2, 3, 5\), got \(2,\)"):
        L.retention(q, k, v, torch.zeros(2))
    with pytest.raises(ValueError, match=r"slopes must have shape \(H,\) = \(3,\), got \(4,\)"):
        L.lightning(q, k, v, torch.ones(4))


def test_beta_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"beta must have shape \(B, H, N\) = \(2, 3, 5\), got \(2, 3, 5, 1\)"):
        L.delta_rule(q, k, v, torch.rand(B, H, N, 1))


def test_initial_state_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, D_k, D_v\) = \(2, 3, 4, 6\), got \(2, 3, 6, 4\)"):
        L.gla(q, k, v, torch.zeros(B, H, N, K), initial_state=torch.zeros(B, H, V, K))


def test_mode():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mode must be one of \['chunk', 'recurrent'\], got 'fused'"):
        L.gla(q, k, v, torch.zeros(B, H, N, K), mode="fused")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        L.linear_attention(q, k, v, mode="parallel")


def test_chunk_size_and_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        L.kda(q, k, v, torch.zeros(B, H, N, K), torch.rand(B, H, N), chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int, got float"):
        L.kda(q, k, v, torch.zeros(B, H, N, K), torch.rand(B, H, N), chunk_size=16.0)
    with pytest.raises(ValueError, match="scale must be finite, got inf"):
        L.gla(q, k, v, torch.zeros(B, H, N, K), scale=float("inf"))


def test_feature_map_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu1', 'relu', 'performer', 'cosformer', 'nalaformer', 'ecoformer'\] or a callable, got 'tanh'"):
        L.linear_attention(q, k, v, feature_map="tanh")
    with pytest.raises(TypeError, match="feature_map must be a str, a callable or None, got int"):
        L.linear_attention(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match=r"feature_map\(q\) must return shape"):
        L.linear_attention(q, k, v, feature_map=lambda x: x[:, :, :2])


def test_step_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q_t must have 3 dimensions, got shape \(2, 3, 5, 4\)"):
        L.gla_step(q, k, v, torch.zeros(B, H, K))
    with pytest.raises(ValueError, match=r"g_t must have shape \(B, H, D_k\) = \(2, 3, 4\), got \(2, 3\)"):
        L.gla_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(B, H))
    with pytest.raises(ValueError, match=r"state must have shape \(B, H, D_k, D_v\) = \(2, 3, 4, 6\), got \(2, 3, 4, 4\)"):
        L.kda_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(B, H, K), torch.rand(B, H), torch.zeros(B, H, K, K))
    with pytest.raises(ValueError, match=r"beta_t must have shape \(B, H\) = \(2, 3\), got \(2,\)"):
        L.delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.rand(B))


def test_output_final_state_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="output_final_state must be a bool, got str"):
        L.gla(q, k, v, torch.zeros(B, H, N, K), output_final_state="yes")
