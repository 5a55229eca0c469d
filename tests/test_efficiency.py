"""Packing, length-grouped batching, the chunked (memory-lean) loss and the tokenized-data cache."""

import numpy as np
import pytest
import torch
from conftest import SAMPLE, compose_train, tiny_model
from test_train import QUICK

from plwlab.data.alpaca import load_records
from plwlab.data.batching import GlobalBatchSampler, collate, pack_examples, padding_share
from plwlab.data.tokenization import cached_tokenize, tokenize_examples
from plwlab.training.loss import chunked_next_token_nll, completion_mask, next_token_nll, prompt_weighted_loss
from plwlab.training.module import PLWModule
from plwlab.training.train import train


@pytest.fixture(scope="module")
def examples():
    tok = tiny_model().tokenizer
    return tokenize_examples(load_records(str(SAMPLE))[:24], tok, max_length=512)[0]


def _loss(module, batch, plw=0.1):
    return prompt_weighted_loss(module(batch), completion_mask(batch["segment_ids"]), batch["token_mask"], plw)


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-10), ("float32", 1e-5)])
def test_packed_batch_loss_equals_unpacked(examples, dtype, tol, attn):
    """sdpa: packed rows through the block-diagonal mask; varlen: through the documents' boundaries, no mask
    (plwlab.training.attention, its CPU path), padded rows through SDPA's mask."""
    loaded = tiny_model(dtype, attn_implementation=attn)
    assert loaded.model.config._attn_implementation == attn
    module = PLWModule(loaded.model)
    pad = loaded.tokenizer.pad_token_id
    rows = pack_examples([len(e.input_ids) for e in examples], 512)
    assert len(rows) < len(examples)  # really packed
    packed = collate([[examples[i] for i in row] for row in rows], pad)
    unpacked = collate([[e] for e in examples], pad)
    a, b = _loss(module, packed), _loss(module, unpacked)
    assert (a.n_prompt, a.n_completion) == (b.n_prompt, b.n_completion)
    torch.testing.assert_close(a.loss, b.loss, rtol=tol, atol=0)
    grads = []
    for out in (a, b):
        module.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=tol * 10, atol=tol, msg=name)


def test_packed_collate_layout(examples):
    rows = [[examples[0], examples[1]], [examples[2]]]
    batch = collate(rows, pad_token_id=3)
    n0, n1, n2 = (len(examples[i].input_ids) for i in range(3))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, max(n0 + n1, n2))
    length = max(n0 + n1, n2)
    starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist()
    assert batch["cu_seqlens"].tolist() == [*starts, 2 * length] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0, : n0 + n1].tolist() == list(range(n0)) + list(range(n1))
    assert batch["token_mask"][0, 0] == 1 and batch["token_mask"][0, n0] == 0  # no target across documents
    assert batch["token_mask"][0].sum() == n0 + n1 - 1 and batch["token_mask"][1].sum() == n2
    assert completion_mask(batch["segment_ids"])[0, :n0].tolist() == examples[0].completion_mask
    assert completion_mask(batch["segment_ids"])[0, n0 : n0 + n1].tolist() == examples[1].completion_mask


def test_pack_examples_is_a_partition_of_full_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=500).tolist()
    rows = pack_examples(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert rows == pack_examples(lengths, 512)  # deterministic
    fill = sum(lengths) / (512 * len(rows))
    assert fill > 0.97
    with pytest.raises(ValueError, match="max_length"):
        pack_examples([600], 512)


def test_chunked_nll_equals_full_nll():
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 8, dtype=torch.float64, requires_grad=True)
    head = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (3, 17))
    full = next_token_nll(hidden @ head.T, ids)
    chunked = chunked_next_token_nll(hidden, head, ids, chunk_tokens=5)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=0)
    g_full = torch.autograd.grad(full.sum(), (hidden, head))
    g_chunk = torch.autograd.grad(chunked_next_token_nll(hidden, head, ids, 7).sum(), (hidden, head))
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_module_chunked_loss_equals_reference(examples):
    loaded = tiny_model("float32")
    batch = collate([[e] for e in examples[:8]], loaded.tokenizer.pad_token_id)
    full, chunked = PLWModule(loaded.model), PLWModule(loaded.model, chunk_tokens=100)
    torch.testing.assert_close(_loss(chunked, batch).loss, _loss(full, batch).loss, rtol=1e-5, atol=0)


def test_length_grouped_keeps_global_batches_and_cuts_padding():
    lengths = np.random.default_rng(1).integers(10, 500, size=400).tolist()
    one = GlobalBatchSampler(lengths, micro_batch=8, seed=3, group_size=400)
    two = [GlobalBatchSampler(lengths, micro_batch=4, world=2, rank=r, seed=3, group_size=400) for r in (0, 1)]
    merged = [i for pair in zip(*(list(s) for s in two)) for i in pair]
    assert merged == list(one)  # rank r takes every W-th item of the same global order
    assert sorted(one) == list(range(400))
    plain = GlobalBatchSampler(lengths, micro_batch=8, seed=3)
    batches = lambda s: [list(s)[i : i + 8] for i in range(0, 400, 8)]  # noqa: E731
    assert padding_share(lengths, batches(one)) < 0.5 * padding_share(lengths, batches(plain))
    one.set_epoch(1)
    assert list(one) != merged  # a new order each epoch


@pytest.mark.parametrize(("micro", "world"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_length_grouped_steps_hold_the_same_examples_under_accumulation(micro, world):
    """With a step of 8 sequences, every optimizer step holds the same examples whether it is 8 micro-batches of
    1, 4 of 2, or 2 ranks x 2 accumulations of 2 (the default batching; 4x1 vs 1x4 gradients must agree)."""
    lengths = np.random.default_rng(2).integers(10, 500, size=100).tolist()
    reference = list(GlobalBatchSampler(lengths, micro_batch=8, seed=5, group_size=400, step_batch=8))
    samplers = [GlobalBatchSampler(lengths, micro_batch=micro, world=world, rank=r, seed=5, group_size=400,
                                   step_batch=8) for r in range(world)]  # fmt: skip
    per_rank = [list(s) for s in samplers]
    merged = [i for group in zip(*(np.array(o).reshape(-1, micro).tolist() for o in per_rank)) for b in group for i in b]
    steps = lambda order: [sorted(order[i : i + 8]) for i in range(0, len(order), 8)]  # noqa: E731
    assert steps(merged) == steps(reference)
    assert sorted(set(reference)) == list(range(100)) and len(reference) == 104  # 100 + 4 repeated to fill a step


def test_tokenized_cache_is_reused_and_keyed(tmp_path):
    tok = tiny_model().tokenizer
    records = load_records(str(SAMPLE))[:30]
    first, n_empty = cached_tokenize(records, tok, 128, tmp_path)
    [path] = list(tmp_path.glob("tokenized-*.npz"))
    mtime = path.stat().st_mtime_ns
    again, n_again = cached_tokenize(records, tok, 128, tmp_path)
    assert path.stat().st_mtime_ns == mtime and n_again == n_empty
    assert [(e.input_ids, e.segment_ids) for e in again] == [(e.input_ids, e.segment_ids) for e in first]
    cached_tokenize(records, tok, 256, tmp_path)
    assert len(list(tmp_path.glob("tokenized-*.npz"))) == 2  # max_length is part of the key


def test_a_truncated_tokenized_cache_is_named_and_rebuilt(tmp_path, caplog):
    """A cache file cut short (a full disk, a copy interrupted) made every later run on that data fail with
    BadZipFile, the file unnamed: it is now named in a warning and rebuilt, with the same examples."""
    tok = tiny_model().tokenizer
    records = load_records(str(SAMPLE))[:30]
    first, _ = cached_tokenize(records, tok, 128, tmp_path)
    [path] = list(tmp_path.glob("tokenized-*.npz"))
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", whole[:-30]):
        path.write_bytes(broken)
        with caplog.at_level("WARNING", logger="plwlab.data.tokenization"):
            again, _ = cached_tokenize(records, tok, 128, tmp_path)
        assert f"tokenized-data cache {path} is unreadable" in caplog.text and "rebuilding it" in caplog.text
        assert [(e.input_ids, e.segment_ids) for e in again] == [(e.input_ids, e.segment_ids) for e in first]
        assert path.read_bytes() == whole  # rebuilt in place
        caplog.clear()


@pytest.mark.parametrize("batching", ["packed", "length_grouped"])
def test_training_with_packing_or_grouping_and_chunked_loss(tmp_path, batching):
    overrides = [*QUICK, f"data.batching={batching}", "loss.chunk_tokens=256", f"paths.data_dir={tmp_path / 'd'}",
                 "callbacks.hf_export=null"]  # fmt: skip
    metrics = train(compose_train(overrides, tmp_path))
    assert metrics["global_steps"] >= 1 and np.isfinite(metrics["final_train_loss"])
    assert list((tmp_path / "d").glob("tokenized-*.npz"))


def test_segment_tokenization_equals_plain_tokenization():
    from conftest import SHARED_DATA

    from plwlab.data.alpaca import alpaca_prompt
    from plwlab.data.tokenization import _newline_safe_backend, batch_token_ids
    from plwlab.training.model import load_tokenizer

    tiny = tiny_model().tokenizer
    assert _newline_safe_backend(tiny) is None  # byte-level BPE: plain batched path
    spm = SHARED_DATA / "tokenizer" / "llama_tokenizer.model"
    if not spm.exists():
        pytest.skip("../shared/data not present")
    llama = load_tokenizer(str(spm))
    assert _newline_safe_backend(llama) is not None
    records = load_records(str(SAMPLE))
    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    texts += ["\n", "a\n\nb", "  two  spaces\n x", "\nleading newline", "trailing\n"]
    assert batch_token_ids(llama, texts) == llama(texts, add_special_tokens=False)["input_ids"]


def test_benchmark_scripts_run(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loss_memory.py"), "--hidden", "64"],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    assert "RATIO chunked/naive" in out and "same loss to 1e-5: True" in out
    gpu = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    assert "skipped: no CUDA GPU" in gpu or "tokens/s" in gpu


def test_rg_is_cached_with_the_tokenized_data(tmp_path, monkeypatch):
    """Runs 2..N of a sweep load tokens and Rg from the cache: the tokenizer is not called at all."""
    from plwlab.data.datamodule import InstructionDataModule

    tok = tiny_model().tokenizer
    first = InstructionDataModule(tok, path=str(SAMPLE), limit=60, cache_dir=str(tmp_path))
    first.setup()
    calls = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = InstructionDataModule(tok, path=str(SAMPLE), limit=60, cache_dir=str(tmp_path))
    again.setup()
    assert again.stats["rg"] == first.stats["rg"] > 0 and calls == []
    InstructionDataModule(tok, path=str(SAMPLE), limit=50, cache_dir=str(tmp_path)).setup()  # other records: computed
    assert calls


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="inductor needs a C compiler on CPU")
def test_compiled_decoder_layers_give_the_same_loss_and_gradients(examples):
    """model.compile=true: torch.compile per decoder layer (~40 s of compiling on 2 cores) equals eager to fp32
    rounding, on a packed batch through the default attention."""
    pad = tiny_model().tokenizer.pad_token_id
    rows = pack_examples([len(e.input_ids) for e in examples[:8]], 512)
    batch = collate([[examples[i] for i in row] for row in rows], pad)
    results = []
    for compile in (False, True):
        module = PLWModule(tiny_model("float32", compile=compile).model)
        out = _loss(module, batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in module.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for name, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_train_meter_counts_real_tokens_of_training_forwards_only():
    """bench_train.py's fairness rests on its meter: non-pad input ids of training forwards after the warm-up
    steps, and the time from the end of warm-up step WARMUP to the end of the last step."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    model = tiny_model().model
    meter = bench_train.Meter(pad_id=0)
    meter.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rows = [torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]), torch.tensor([[5, 6, 7, 8]])]
    for step in range(bench_train.WARMUP + 2):
        ids = rows[step % 2]
        model(input_ids=ids, attention_mask=(ids != 0).long()).logits.sum().backward()
        with torch.no_grad():
            model(input_ids=ids)  # an evaluation forward: not counted
        optimizer.step()
    model.eval()
    model(input_ids=rows[0])  # eval mode: not counted
    result = meter.result()
    meter.close()
    optimizer.step()
    assert len(meter.step_ends) == bench_train.WARMUP + 2  # the global hook is gone
    after_warmup = [rows[s % 2] for s in range(bench_train.WARMUP, bench_train.WARMUP + 2)]
    assert result["tokens"] == sum(int((r != 0).sum()) for r in after_warmup)
    assert result["steps"] == bench_train.WARMUP + 2 and result["seconds"] > 0
