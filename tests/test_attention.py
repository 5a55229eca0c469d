"""attn_implementation=varlen (plwlab.training.attention): packed rows by their documents' boundaries, no mask.
Its equality with SDPA's block-diagonal mask through a model is tested in test_efficiency.py; here, the calls
into torch's CUDA kernel (faked on CPU by the per-document path) and the choice of ``auto``."""

import inspect

import pytest
import torch

from plwlab.training import attention
from plwlab.training.attention import document_sdpa, flash_varlen, resolve_attn_implementation


def _qkv(heads: int = 4, kv_heads: int = 2, tokens: int = 11, dim: int = 8):
    torch.manual_seed(0)
    q = torch.randn(tokens, heads, dim, dtype=torch.float64)
    k, v = (torch.randn(tokens, kv_heads, dim, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.tensor([0, 3, 8, 11], dtype=torch.int32)


def _dense(q, k, v, cu, scale):
    """The reference: one SDPA call with a block-diagonal causal mask over all tokens."""
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu.long()))
    pos = torch.arange(len(q))
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask, scale=scale, enable_gqa=True)  # fmt: skip
    return out.transpose(0, 1)


def test_document_sdpa_equals_the_block_diagonal_mask():
    q, k, v, cu = _qkv()
    torch.testing.assert_close(document_sdpa(q, k, v, cu, 0.3), _dense(q, k, v, cu, 0.3), rtol=0, atol=1e-12)


def _fake_kernel(newer: bool):
    """A stand-in for ``varlen_attn`` with the signature of torch >= 2.11 (window_size, enable_gqa) or of 2.10
    (is_causal): it checks what it is called with and computes per document."""
    seen = {}

    def newer_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        seen.update(window_size=window_size, enable_gqa=enable_gqa, max_q=max_q, same_cu=cu_seq_q is cu_seq_k)
        assert enable_gqa or key.shape[1] == query.shape[1]
        return document_sdpa(query, key, value, cu_seq_q, scale)

    def older_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, *,
                     scale=None):  # fmt: skip
        seen.update(is_causal=is_causal, heads=(query.shape[1], key.shape[1]))
        assert key.shape[1] == query.shape[1]  # no GQA in this kernel: heads repeated first
        return document_sdpa(query, key, value, cu_seq_q, scale)

    return (newer_kernel if newer else older_kernel), seen


@pytest.mark.parametrize("newer", [True, False])
def test_the_cuda_kernel_is_called_causal_with_gqa(newer):
    q, k, v, cu = _qkv()
    kernel, seen = _fake_kernel(newer)
    out = flash_varlen(q, k, v, cu, 11, 0.3, kernel=kernel)
    torch.testing.assert_close(out, _dense(q, k, v, cu, 0.3), rtol=0, atol=1e-12)
    if newer:
        assert seen == {"window_size": (-1, 0), "enable_gqa": True, "max_q": 11, "same_cu": True}
    else:
        assert seen == {"is_causal": True, "heads": (4, 4)}


def test_the_installed_kernel_has_a_signature_plwlab_calls():
    if attention.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    params = inspect.signature(attention.varlen_attn).parameters
    assert {"scale", "cu_seq_q", "max_q"} <= params.keys() and ("window_size" in params or "is_causal" in params)


def test_auto_is_varlen_on_cuda_only():
    assert resolve_attn_implementation("auto", cuda=False) == "sdpa"
    assert resolve_attn_implementation("auto", cuda=True) == ("varlen" if attention.varlen_attn else "sdpa")
    assert resolve_attn_implementation("eager", cuda=True) == "eager"
    assert resolve_attn_implementation(None) is None
