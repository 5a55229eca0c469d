"""The GPU acceptance run (benchmarks/gpu_check.py, tools/gpu_check.sh) kept runnable on CPU, and the activation
memory formula it checks on a GPU measured here against what autograd really saves."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from plwlab.training.memory import layer_activation_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check


@pytest.mark.parametrize("mixed", [True, False], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["MHA", "GQA"])
def test_layer_activation_bytes_is_what_autograd_saves(mixed, kv_heads):
    """Within 10% of the saved tensors of a real HF LLaMA layer (MHA); an upper bound within 15% under GQA."""
    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=kv_heads,
                         attn_implementation="sdpa")  # fmt: skip
    layer = LlamaDecoderLayer(config, layer_idx=0)
    rows, length = 2, 150
    x = torch.randn(rows, length, config.hidden_size, requires_grad=True)
    position = torch.arange(length).expand(rows, -1)

    def forward() -> None:
        layer(x, position_embeddings=LlamaRotaryEmbedding(config)(x, position))

    with torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext():
        saved = gpu_check.saved_activation_bytes(layer, x, forward)
    estimate = layer_activation_bytes(512, 1376, rows * length, 2 if mixed else 4, checkpointing=False)
    if kv_heads == config.num_attention_heads:
        assert saved == pytest.approx(estimate, rel=0.10)
    else:
        assert 0.85 * estimate <= saved <= estimate


def test_saved_bytes_refuses_a_token_count_equal_to_a_weight_dimension():
    layer = LlamaDecoderLayer(LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4), layer_idx=0)
    with pytest.raises(ValueError, match="64 tokens"):
        gpu_check.saved_activation_bytes(layer, torch.randn(1, 64, 64), lambda: None)


def test_document_lengths_of_packed_and_padded_batches():
    from plwlab.data.batching import collate
    from plwlab.data.tokenization import TokenizedExample

    a, b, c = (TokenizedExample.from_prompt_length(list(range(1, n + 1)), 1) for n in (3, 4, 5))
    packed = collate([[a, b], [c]], pad_token_id=0)  # rows of 7 and 5 (+2 padding)
    assert gpu_check.document_lengths(packed).tolist() == [3, 4, 5, 0]  # the second row's padding tail: 0
    padded = collate([[a], [c]], pad_token_id=0)
    assert gpu_check.document_lengths(padded).tolist() == padded["token_mask"].sum(1).tolist()
    assert gpu_check.attention_kind(["aten::_flash_attention_forward", "fmha_cutlass"]) == "flash"
    assert gpu_check.attention_kind(["aten::_efficient_attention_forward"]) == "efficient"
    assert gpu_check.attention_kind(["aten::_scaled_dot_product_attention_math"]) == "math"


def test_gpu_check_refuses_to_run_without_a_gpu_unless_smoke(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode != 0 and "no CUDA GPU here" in done.stderr


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_check(tmp_path):
    """Every check of the GPU run at toy sizes on the CPU (~3 min): the script a GPU session runs cannot rot."""
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, timeout=900, check=False)  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"1", "1c", "2", "3", "4", "5", "6", "7"}, done.stdout[-3000:]
    assert not [k for k, r in checks.items() if "error" in r], {k: r.get("error") for k, r in checks.items()}
    assert done.returncode == 0, done.stdout[-3000:]
    assert checks["4"]["resumed"] and checks["4"]["resumed_max_diff"] <= 1e-9  # CPU: deterministic, exact resume
    assert checks["3"]["param_dtype"] == "float32" and checks["3"]["compute_dtype"] == "bfloat16"
    assert checks["2"]["ratio_train_py_over_bare"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == 2 + 8  # header, separator, one row a check
    assert "vllm is not installed" in checks["7"].get("skipped", "") or checks["7"]["identical_responses"] >= 0
