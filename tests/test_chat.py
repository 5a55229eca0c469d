"""Chat conversations: loading and validation, and exact token segments under two real template styles
(Llama-3 and ChatML), built locally on the bundled tiny tokenizer."""

import json

import pytest
from conftest import ASSETS, SHARED_DATA, tiny_model

from plwlab.data.chat import ChatDataError, load_conversations, to_messages, tokenize_conversation
from plwlab.data.segments import SEGMENT_ID, SEGMENTS
from plwlab.data.sources import DataError

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # fmt: skip
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
# ChatML with the assistant span marked by the template itself (HF's {% generation %}), as TRL's templates do
CHATML_MARKED = CHATML.replace("{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
                               "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                               "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                               "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                               "{% endif %}")  # fmt: skip
SPECIALS = {LLAMA3: ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            CHATML: ["<|im_start|>", "<|im_end|>"], CHATML_MARKED: ["<|im_start|>", "<|im_end|>"]}  # fmt: skip
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "<think>They ask my name.</think>I am Vicuna."},
                {"role": "user", "content": " Have a nice day! "}, {"role": "assistant", "content": "You too!"}]  # fmt: skip


def chat_tokenizer(template: str):
    tok = tiny_model().tokenizer
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[template]})
    if template == LLAMA3:
        tok.bos_token = "<|begin_of_text|>"
    tok.chat_template = template
    return tok


def pieces(tok, example, segment):
    """The text of each maximal run of ``segment`` tokens."""
    runs, current = [], []
    for i, s in zip(example.input_ids, example.segment_ids):
        if s == SEGMENT_ID[segment]:
            current.append(i)
        elif current:
            runs.append(tok.decode(current)), current.clear()
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("template", [LLAMA3, CHATML, CHATML_MARKED], ids=["llama3", "chatml", "chatml-marked"])
def test_segments_are_exact_under_real_template_styles(template):
    tok = chat_tokenizer(template)
    ex = tokenize_conversation(tok, CONVERSATION, think_tags=("<think>", "</think>"))
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"] and tok.decode(ex.input_ids) == text
    end = "<|eot_id|>" if template == LLAMA3 else "<|im_end|>" + ("" if template == CHATML_MARKED else "\n")
    assert pieces(tok, ex, "system") == ["Be brief."]
    assert pieces(tok, ex, "user") == ["Who are you?", "Have a nice day!" if template == LLAMA3 else " Have a nice day! "]
    assert pieces(tok, ex, "earlier_reasoning") == ["<think>They ask my name.</think>"]
    assert pieces(tok, ex, "earlier_assistant") == ["I am Vicuna." + end]  # the end-of-turn marker trains
    assert pieces(tok, ex, "assistant") == ["You too!" + end] and pieces(tok, ex, "reasoning") == []
    last = tokenize_conversation(tok, CONVERSATION[:3], think_tags=("<think>", "</think>"))
    assert pieces(tok, last, "reasoning") == ["<think>They ask my name.</think>"]
    assert pieces(tok, last, "assistant") == ["I am Vicuna." + end]
    template_text = "".join(pieces(tok, ex, "template"))
    assert "Who" not in template_text and "assistant" in template_text  # headers are the template's
    assert [t for t, s in zip(ex.turn_ids, ex.segment_ids) if s == SEGMENT_ID["earlier_assistant"]][0] == 2


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    tok = chat_tokenizer(CHATML)
    # like Qwen3's: earlier assistant turns lose their reasoning, the last keeps it
    tok.chat_template = CHATML.replace("message['content']", "(message['content'].split('</think>')[-1] if not loop.last "
                                       "else message['content'])")  # fmt: skip
    with pytest.raises(ChatDataError, match="record 7: the chat template renders the conversation up to turn 2 "
                                            "differently"):  # fmt: skip
        tokenize_conversation(tok, CONVERSATION, name="record 7")
    tok.chat_template = None
    with pytest.raises(ChatDataError, match="no chat template"):
        tokenize_conversation(tok, CONVERSATION)


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "turn 1 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}, "turn 0 \\(user\\) has empty content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
     "two 'user' turns in a row"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "first turn .* is 'assistant'"),
    ({"id": "x9", "conversations": []}, "record 3 \\(id 'x9'\\) has no 'messages' list"),
])  # fmt: skip
def test_malformed_conversations_name_the_record(record, message):
    with pytest.raises(ChatDataError, match=message):
        to_messages(record, 3)


def test_load_skips_and_counts_or_stops_at_the_first_bad_record(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    with pytest.raises(ChatDataError, match="chat.jsonl: record 1: no assistant turn"):
        load_conversations(path)
    assert len(load_conversations(path, on_invalid="skip")) == 2 and "skipped 1 invalid conversations" in caplog.text


def test_sharegpt_files_with_and_without_a_system_turn():
    folder = SHARED_DATA / "chat"
    if not folder.exists():
        pytest.skip("../shared/data not present")
    plain = load_conversations(folder / "fastchat_dummy_conversation.json", fmt="sharegpt")
    system = load_conversations(folder / "fastchat_dummy_conversation_with_system.json", fmt="sharegpt")
    assert len(plain) == len(system) == 500
    assert plain[0][0] == {"role": "user", "content": "Who are you?"} and system[0][0]["role"] == "system"
    assert sum(c[0]["role"] == "system" for c in system) == 6  # the file gives 6 of its 500 a system prompt
    for template in (LLAMA3, CHATML):
        tok = chat_tokenizer(template)
        for conversation in system:
            ex = tokenize_conversation(tok, conversation)
            roles = {m["role"] for m in conversation}
            if sum(m["role"] == "assistant" for m in conversation) > 1:
                roles.add("earlier_assistant")
            assert {s for s in ex.segment_ids if s} == {SEGMENT_ID[r] for r in roles}


CHAT_SAMPLE = ASSETS / "chat_sample.jsonl"


def test_chat_datamodule_batches_carry_segments_and_rg():
    from plwlab.data.datamodule import InstructionDataModule
    from plwlab.data.rg import chat_rg

    tok = tiny_model(chat_template="chatml").tokenizer
    dm = InstructionDataModule(tok, path=str(CHAT_SAMPLE), format="messages", val_size=10, batch_size=4, cache_dir=None)
    dm.setup()
    assert dm.stats["data_format"] == "messages" and dm.stats["n_train"] == 190
    assert dm.stats["rg"] == pytest.approx(chat_rg(load_conversations(CHAT_SAMPLE), tok))
    batch = next(iter(dm._loader(dm.train_set, 4, dm.train_sampler())))
    present = {SEGMENTS[s] for s in batch["segment_ids"][batch["token_mask"].bool()].tolist()}
    assert {"template", "user", "assistant"} <= present
    first = dm.train_set[0][0]
    assert tok.decode(first.input_ids).startswith("<s><|im_start|>user\n")  # BOS, then the ChatML header


def test_role_and_key_mapping_and_the_sharegpt_format(tmp_path):
    records = [{"dialog": [{"speaker": "client", "text": "Hi"}, {"speaker": "agent", "text": "Hello!"}], "persona": "Be kind."}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    got = load_conversations(path, "messages", columns={"messages": "dialog", "role": "speaker", "content": "text",
                                                        "system": "persona"}, roles={"client": "user", "agent": "assistant"})  # fmt: skip
    assert got == [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}]]  # fmt: skip
    with pytest.raises(ChatDataError, match="record 0 turn 0 has unknown role 'client'"):
        load_conversations(path, "messages", columns={"messages": "dialog", "role": "speaker", "content": "text"})
    sharegpt = tmp_path / "s.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}))
    assert load_conversations(sharegpt, "sharegpt") == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]


def test_variants_invert_single_turn_chats_and_refuse_multi_turn_ones(tmp_path):
    from plwlab.data.examples import load_examples

    tok = tiny_model(chat_template="chatml").tokenizer
    single = tmp_path / "single.jsonl"
    pairs = [("Write a long poem about the sea and the wind and the stars.", "Waves. " * 40), ("Name it.", "A cat.")]
    single.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})
                                for u, a in pairs))  # fmt: skip
    built, path, manifest = load_examples(str(single), tok, "messages", variant="short", cache_dir=str(tmp_path))
    assert manifest["n_inverted"] == 1 and path.endswith(".json")
    assert built[0] == [{"role": "user", "content": "Predict the prompt that generated the following AI output.\n\n" + pairs[0][1]},
                        {"role": "assistant", "content": pairs[0][0]}]  # fmt: skip
    assert built[1] == [{"role": "user", "content": "Name it."}, {"role": "assistant", "content": "A cat."}]
    with pytest.raises(DataError, match="conversation 1 has 2 assistant turns: the Short/rg_target inversion is "
                                        "defined for single-turn data"):  # fmt: skip
        load_examples(str(CHAT_SAMPLE), tok, "messages", variant="short", cache_dir=str(tmp_path))


def test_rg_per_dataset_and_per_turn_counts_content_tokens():
    from plwlab.data.rg import chat_token_lengths
    from plwlab.data.stats import chat_stats

    tok = tiny_model(chat_template="chatml").tokenizer
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    conversations = [CONVERSATION, CONVERSATION[1:3]]
    lengths = chat_token_lengths(conversations, tok)
    first = n("Be brief.") + n("Who are you?")
    assert lengths.prompt.tolist() == [[first, n(" Have a nice day! ")], [n("Who are you?"), 0]]
    assert lengths.completion.tolist() == [[n(CONVERSATION[2]["content"]), n("You too!")], [n(CONVERSATION[2]["content"]), 0]]
    assert lengths.rg_per_turn()[1] == pytest.approx(n("You too!") / n(" Have a nice day! "))
    assert lengths.rg == pytest.approx(lengths.completion.sum() / lengths.prompt.sum())
    stats = chat_stats(conversations, tok, max_length=8)
    assert stats["n"] == 2 and stats["exchanges_mean"] == 1.5 and stats["truncated_share"] == 1.0
    assert stats["empty_completion_share"] == 1.0 and stats["rg_turn_2"] == lengths.rg_per_turn()[1]


def test_plwlab_stats_and_recommend_accept_a_chat_data_config(tmp_path, capsys):
    import csv

    from plwlab.cli import main

    out = tmp_path / "stats.csv"
    main(["stats", "data=chat_sample,alpaca_sample", "model.chat_template=chatml", "--out", str(out)])
    rows = {r["dataset"]: r for r in csv.DictReader(out.open())}
    assert rows["chat_sample"]["format"] == "messages" and float(rows["chat_sample"]["rg_turn_3"]) > 0
    assert rows["alpaca_sample"]["rg_turn_1"] == "" and float(rows["alpaca_sample"]["rg"]) > 3
    main(["recommend", "data=chat_sample", "model.chat_template=chatml", f"paths.data_dir={tmp_path}"])
    assert "chat_sample: Rg 3.1 (200 messages examples" in capsys.readouterr().out


def test_a_chat_run_is_prompted_through_its_template_and_stops_at_its_end_of_turn():
    from plwlab.data.chat import end_of_turn_ids
    from plwlab.evaluation.runs import LoadedRun, example_prompt, instruction_prompt

    loaded = tiny_model(chat_template="chatml")
    tok = loaded.tokenizer
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    assert end_of_turn_ids(chat_tokenizer(LLAMA3))[-1] == chat_tokenizer(LLAMA3).convert_tokens_to_ids("<|eot_id|>")
    run = LoadedRun(loaded.model, tok, {"data_format": "messages"}, "r")
    assert instruction_prompt(run, "Add.", "1 2") == "<s><|im_start|>user\nAdd.\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
    prompt, reference = example_prompt(run, CONVERSATION)
    assert prompt.endswith("Have a nice day! <|im_end|>\n<|im_start|>assistant\n") and reference == "You too!"
    alpaca = LoadedRun(loaded.model, tok, {"data_format": "alpaca"}, "r")
    assert instruction_prompt(alpaca, "Add.").startswith("Below is an instruction")
    assert instruction_prompt(LoadedRun(None, tok, {"data_format": "prompt_completion"}, "r"), "Add.", "1 2") == "Add.\n\n1 2"


@pytest.mark.parametrize(("override", "message"), [
    ("loss.segment_weights={assistnt: 1}", "unknown segment 'assistnt'; segments are template, system, user"),
    ("loss.segment_weights={user: -1}", "loss.segment_weights.user must be a finite number >= 0"),
    ("loss.completion_weight=-0.5", "loss.completion_weight must be a finite number >= 0, got -0.5"),
    ("loss.completion_weight=nan", "loss.completion_weight must be a finite number >= 0, got nan"),
    ("data.format=chatml", "data.format must be one of"),
    ("data.think_tags=['<think>','</think>']", "data.think_tags must be \\[open, close\\] on chat data"),
])  # fmt: skip
def test_bad_chat_settings_stop_with_one_line(tmp_path, override, message):
    from conftest import compose_train

    from plwlab.config import ConfigError
    from plwlab.config import validate_train as validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_train([override], tmp_path))
