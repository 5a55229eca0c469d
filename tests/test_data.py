import json
from types import SimpleNamespace

import pytest
import torch
from conftest import SAMPLE

from plwlab.data.alpaca import alpaca_prompt, load_records
from plwlab.data.batching import collate
from plwlab.data.datamodule import InstructionDataModule
from plwlab.data.examples import load_source
from plwlab.data.sources import DataError
from plwlab.data.tokenization import tokenize_examples


def test_alpaca_templates_are_stanfords():
    assert alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:"
    )
    with_input = alpaca_prompt("Do X.", "on Y")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nDo X.\n\n### Input:\non Y\n\n### Response:")


def test_tokenize_masks_prompt_and_completion(tiny):
    tok = tiny.tokenizer
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi there!"}]
    [ex], n_empty = tokenize_examples(records, tok, max_length=512)
    assert n_empty == 0
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    n_prompt = ex.completion_mask.index(1)
    assert all(ex.completion_mask[n_prompt:]) and not any(ex.completion_mask[:n_prompt])
    assert tok.decode(ex.input_ids[1:n_prompt]) == alpaca_prompt("Say hi.")
    assert tok.decode(ex.input_ids[n_prompt:-1]) == "Hi there!"


def test_truncation_counts_examples_without_completion(tiny):
    records = load_records(str(SAMPLE))[:20]
    full, n_full = tokenize_examples(records, tiny.tokenizer, max_length=4096)
    assert n_full == 0
    prompt_lens = [e.completion_mask.index(1) for e in full]
    cut = sorted(prompt_lens)[10]  # about half the prompts are at least this long
    short, n_empty = tokenize_examples(records, tiny.tokenizer, max_length=cut)
    assert n_empty == sum(p >= cut for p in prompt_lens) > 0
    for e, f in zip(short, full):
        assert e.input_ids == f.input_ids[:cut] and e.completion_mask == f.completion_mask[:cut]


def test_load_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    expected = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    assert load_records(str(tmp_path / "x.json")) == expected
    assert load_records(str(tmp_path / "x.jsonl")) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "invalid JSON"),
        ('{"instruction": "a"}', "expected a JSON list"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "record 1 has no 'output'"),
        ('[{"instruction": "a", "input": 3, "output": "b"}]', "record 0 field 'input' is int"),
        ('["just a string"]', "record 0 is a str"),
    ],
)
def test_malformed_data_names_the_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(str(path))


def test_skip_invalid_records_counts_and_reports(tmp_path, caplog):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": " ", "output": "y"}, {"instruction": 1, "output": "x"}]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match="record 1 has an empty 'instruction'"):
        load_records(str(tmp_path / "x.json"))
    assert load_records(str(tmp_path / "x.json"), on_invalid="skip") == [{"instruction": "a", "input": "", "output": "b"}]
    assert "skipped 2 invalid records" in caplog.text and "record 2 field 'instruction' is int" in caplog.text


def test_empty_outputs_are_kept_as_stanford_keeps_them(tmp_path, caplog, tiny):
    """Stanford's training code keeps an empty output and trains on EOS alone; ``empty_output=skip`` drops it."""
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": ""}]
    (tmp_path / "x.json").write_text(json.dumps(recs))
    kept = load_records(str(tmp_path / "x.json"))
    assert len(kept) == 2
    [_, ex], _ = tokenize_examples(kept, tiny.tokenizer, 512)
    assert [t for t, m in zip(ex.input_ids, ex.completion_mask) if m] == [tiny.tokenizer.eos_token_id]
    assert load_records(str(tmp_path / "x.json"), empty_output="skip") == kept[:1]
    assert "skipped 1 records with an empty output" in caplog.text
    (tmp_path / "y.json").write_text(json.dumps(recs[1:]))
    with pytest.raises(DataError, match="no usable records \\(1 in the file, 0 invalid, 1 with an empty output skipped\\)"):
        load_records(str(tmp_path / "y.json"), empty_output="skip")


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "nope.json"))


def test_collate_pads_right(tiny):
    examples, _ = tokenize_examples(load_records(str(SAMPLE))[:3], tiny.tokenizer, 512)
    batch = collate([[e] for e in examples], pad_token_id=tiny.tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, e in enumerate(examples):
        assert batch["input_ids"][row, : lengths[row]].tolist() == e.input_ids
        assert (batch["input_ids"][row, lengths[row] :] == tiny.tokenizer.pad_token_id).all()
        assert batch["segment_ids"][row, : lengths[row]].tolist() == e.segment_ids


def _datamodule(tiny, world=1, rank=0, **kwargs):
    dm = InstructionDataModule(tiny.tokenizer, path=str(SAMPLE), batch_size=2, val_size=10, **{"cache_dir": None, **kwargs})
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    dm.setup("fit")
    return dm


def test_datamodule_split_stats_and_determinism(tiny):
    a, b = _datamodule(tiny, limit=100), _datamodule(tiny, limit=100)
    assert a.stats["n_train"] == 90 and a.stats["n_val"] == 10 and a.stats["n_empty_completion"] == 0
    assert 2 < a.stats["rg"] < 5 and 0.3 < a.stats["rg_templated"] < a.stats["rg"]  # template makes prompts longer
    assert [e.input_ids for e in a.train_set.examples] == [e.input_ids for e in b.train_set.examples]
    first = next(iter(a.train_dataloader()))["input_ids"]
    assert torch.equal(first, next(iter(b.train_dataloader()))["input_ids"])


def test_global_batch_is_identical_for_one_or_two_ranks(tiny):
    single = InstructionDataModule(tiny.tokenizer, path=str(SAMPLE), batch_size=4, val_size=10, limit=40, cache_dir=None)
    single.trainer = SimpleNamespace(world_size=1, global_rank=0)
    single.setup("fit")
    one = next(iter(single.train_dataloader()))
    two = [next(iter(_datamodule(tiny, world=2, rank=r, limit=40).train_dataloader())) for r in (0, 1)]

    def rows(batch):
        return sorted(tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"]))

    assert rows(one) == sorted(rows(two[0]) + rows(two[1]))
    val = [list(_datamodule(tiny, world=2, rank=r, limit=40).val_dataloader().sampler) for r in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(10))  # every val example exactly once


@pytest.mark.parametrize("policy", ["keep", "drop", "error"])
def test_empty_completion_policies(tiny, policy, caplog):
    if policy == "error":
        with pytest.raises(DataError, match="lost every completion token"):
            _datamodule(tiny, limit=30, max_length=69, empty_completion=policy)
        return
    dm = _datamodule(tiny, limit=30, max_length=69, empty_completion=policy)
    assert 0 < dm.stats["n_empty_completion"] < 30
    assert "lost every completion token" in caplog.text
    n_left = dm.stats["n_train"] + dm.stats["n_val"]
    assert n_left == (30 if policy == "keep" else 30 - dm.stats["n_empty_completion"])


def test_shared_alpaca_with_llama_tokenizer():
    from conftest import SHARED_DATA

    from plwlab.training.model import load_tokenizer

    alpaca, spm = SHARED_DATA / "alpaca" / "alpaca_data.json", SHARED_DATA / "tokenizer" / "llama_tokenizer.model"
    if not (alpaca.exists() and spm.exists()):
        pytest.skip("../shared/data not present")
    tok = load_tokenizer(str(spm))
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]
    assert len(load_records(str(alpaca), empty_output="skip")) == 52002 - 28
    records = load_records(str(alpaca))
    assert len(records) == 52002 and records[284]["output"] == ""
    examples, n_empty = tokenize_examples(records[:200], tok, max_length=512)
    assert examples[0].input_ids[0] == 1 and examples[0].input_ids[-1] == 2
    assert n_empty == 0


SPACE_TEXTS = ["words:  vegetable", "  lead", " x", "   three", "x\n\n  y", "a    b  c", "The  end.  ", "tab\t\tthere",
               "", "\nx", "a\n b", "  "]  # fmt: skip


def _llama_like_spm_model(tmp_path):
    """A small byte-fallback BPE SentencePiece model trained on the bundled sample, with LLaMA's whitespace pieces
    ("▁▁", "▁▁▁", "▁▁▁▁" at low ids with score -1e9) inserted as Meta did."""
    import io

    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import import_protobuf

    texts = [" ".join(r.values()) for r in load_records(str(SAMPLE))]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, model_type="bpe", vocab_size=600,
                                   byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)  # fmt: skip
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(buf.getvalue())

    def piece(text):
        p = type(proto.pieces[0])()
        p.piece, p.score, p.type = text, -1e9, 1
        return p

    pieces = list(proto.pieces)
    pieces = pieces[:259] + [piece("▁▁")] + pieces[259:267] + [piece("▁▁▁▁")] + pieces[267:300] + [piece("▁▁▁")] + pieces[300:]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path, spm.SentencePieceProcessor(model_file=str(path))


def test_bare_sentencepiece_model_tokenizes_as_sentencepiece(tmp_path):
    """A bare tokenizer.model gives SentencePiece's ids on texts with repeated and leading spaces, adds BOS, and
    saves to a tokenizer.json that reloads with the same ids (the run's exported tokenizer)."""
    from transformers import AutoTokenizer

    from plwlab.data.tokenization import batch_token_ids
    from plwlab.training.model import load_tokenizer

    path, sp = _llama_like_spm_model(tmp_path)
    tok = load_tokenizer(str(path))
    expected = [sp.encode(t) for t in SPACE_TEXTS]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in SPACE_TEXTS] == expected
    assert batch_token_ids(tok, SPACE_TEXTS) == expected  # plwlab's batched newline-split path
    assert tok("x")["input_ids"] == [sp.bos_id()] + sp.encode("x")
    assert [tok.decode(ids) for ids in expected] == [sp.decode(ids) for ids in expected]
    tok.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [reloaded(t, add_special_tokens=False)["input_ids"] for t in SPACE_TEXTS] == expected


def test_alpaca_52k_tokenized_as_stanford_with_sentencepiece():
    """Every one of the 52,002 records: plwlab's input ids and prompt/completion split equal Stanford's
    preprocessing done with the sentencepiece library itself (bos + sp(prompt + output) + eos, labels from
    len(bos + sp(prompt)))."""
    import sentencepiece as spm
    from conftest import SHARED_DATA

    from plwlab.data.alpaca import alpaca_prompt
    from plwlab.training.model import load_tokenizer

    alpaca, model = SHARED_DATA / "alpaca" / "alpaca_data.json", SHARED_DATA / "tokenizer" / "llama_tokenizer.model"
    if not (alpaca.exists() and model.exists()):
        pytest.skip("../shared/data not present")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    records = load_records(str(alpaca))
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in records]
    full = sp.encode([p + r["output"] for p, r in zip(prompts, records)])
    prompt_ids = sp.encode(prompts)
    examples, _ = tokenize_examples(records, load_tokenizer(str(model)), max_length=512)
    wrong = [i for i, (e, f, p) in enumerate(zip(examples, full, prompt_ids))
             if e.input_ids != ([1] + f + [2])[:512] or e.completion_mask.count(0) != min(1 + len(p), 512)]  # fmt: skip
    assert len(examples) == 52002 and wrong == []


def test_tokenized_cache_is_keyed_by_merges_and_normalizer_not_only_vocab(tmp_path):
    """The same vocabulary merged differently (transformers 5's id-ranked merges vs SentencePiece's scores)
    tokenizes differently, so it must not share a cache entry."""
    from transformers import LlamaTokenizer

    from plwlab.data.tokenization import tokenizer_fingerprint
    from plwlab.training.model import load_tokenizer

    path, _ = _llama_like_spm_model(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(path.read_bytes())
    id_ranked = LlamaTokenizer.from_pretrained(tmp_path / "hf")
    exact = load_tokenizer(str(path))
    assert id_ranked.get_vocab() == exact.get_vocab()
    assert tokenizer_fingerprint(id_ranked) != tokenizer_fingerprint(exact)


def test_batched_tokenization_ignores_truncation_left_on_the_tokenizer(tmp_path):
    """A fast tokenizer called with truncation/padding keeps them on its backend until its next plain call; the
    batched path and the cache key must not inherit them (Stanford's preprocessing leaves truncation on)."""
    from plwlab.data.tokenization import batch_token_ids, tokenizer_fingerprint
    from plwlab.training.model import load_tokenizer

    path, _ = _llama_like_spm_model(tmp_path)
    tok = load_tokenizer(str(path))
    texts = ["Below is an instruction.\n\n### Response:\nA long enough answer to be cut at three tokens.", "Short."]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    key = tokenizer_fingerprint(tok)
    tok.pad_token = tok.unk_token
    tok(texts[0], max_length=3, truncation=True, padding="max_length")
    assert tokenizer_fingerprint(tok) == key
    assert batch_token_ids(tok, texts) == expected


def test_prompt_completion_pairs_from_parquet_with_a_column_mapping(tmp_path, tiny):
    """``format=prompt_completion``: no template, ``[bos] prompt completion [eos]``; the prompt (BOS included) is the
    ``user`` segment, the completion (EOS included) ``assistant``; columns mapped from the dataset's own names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plwlab.data.segments import SEGMENT_ID

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", "Name a colour."], "answer": [" 4", " Blue."]}), path)
    dm = InstructionDataModule(tiny.tokenizer, path=str(path), format="prompt_completion", val_size=0, cache_dir=None,
                               columns={"prompt": "question", "completion": "answer"})  # fmt: skip
    dm.setup()
    tok = tiny.tokenizer
    e = next(x for x in dm.train_set.examples if tok.decode(x.input_ids).startswith("<s>What"))
    users = [t for t, s in zip(e.input_ids, e.segment_ids) if s == SEGMENT_ID["user"]]
    answer = [t for t, s in zip(e.input_ids, e.segment_ids) if s == SEGMENT_ID["assistant"]]
    assert tok.decode(users) == "<s>What is 2+2?" and tok.decode(answer) == " 4</s>"
    assert dm.stats["data_format"] == "prompt_completion" and dm.stats["rg"] > 0
    with pytest.raises(DataError, match="record 0 has no 'prompt' field"):
        InstructionDataModule(tok, path=str(path), format="prompt_completion", cache_dir=None).setup()


def test_alpaca_columns_are_mapped_and_a_jsonl_hub_style_file_reads(tmp_path, tiny):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi!"}) + "\n")
    assert load_records(str(path), columns={"output": "response"}) == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    with pytest.raises(DataError, match="data.format must be one of"):
        load_source(str(path), "chatml")


def test_a_local_dataset_folder_loads_through_datasets_as_a_hub_id_would(tmp_path, tiny):
    """The hub path (``datasets.load_dataset``) run offline on a folder laid out as a hub dataset repository."""
    folder = tmp_path / "my_chats" / "data"
    folder.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in range(3)]
    (folder / "train-00000.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_source(str(tmp_path / "my_chats"), "messages") == [r["messages"] for r in rows]
    with pytest.raises(DataError, match="cannot load dataset"):
        load_source(str(tmp_path / "my_chats"), "messages", split="validation")
