"""Per-example weights (``data.weight_column``): a numeric column that multiplies every token weight of its
example, in Alpaca, prompt/completion and chat data; exact against a float64 token loop, through gradient
accumulation (4x1 = 1x4), packing (packed = unpacked) and 2-rank FSDP (= 1 process); a bad column is one line
naming its row; the run records the weights it trained with."""

import json
import random

import lightning as L
import pytest
import torch
from conftest import ASSETS, SAMPLE, compose_train, tiny_model
from test_module import GradCapture

from plwlab.config import ConfigError, validate_train
from plwlab.data.datamodule import InstructionDataModule
from plwlab.data.segments import COMPLETION_IDS, weight_table
from plwlab.data.sources import DataError
from plwlab.training.train import train

CHAT_SAMPLE = ASSETS / "chat_sample.jsonl"
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.5)


def weighted_copy(source, path, fmt="alpaca"):
    """``source`` with a seeded weight column ``w`` (0, 0.5, 1, 2 or 3.5 per record), as .json or .jsonl."""
    rows = ([json.loads(line) for line in source.read_text().splitlines() if line.strip()] if source.suffix == ".jsonl"
            else json.loads(source.read_text()))  # fmt: skip
    rng = random.Random(0)
    for row in rows:
        row["w"] = rng.choice(WEIGHTS)
    if fmt == "prompt_completion":
        rows = [{"prompt": r["instruction"], "completion": r["output"], "w": r["w"]} for r in rows]
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    return path


def one_step(data: dict, batch_size: int, accumulate: int, normalization: str, plw: float = 0.1, batching="padded",
             chat: bool = False, completion_weight: float = 1.0):  # fmt: skip
    """One optimizer step on ``data`` (InstructionDataModule arguments); the module and the step's examples."""
    loaded = tiny_model("float64", chat_template="chatml" if chat else None)
    module = GradCapture(loaded.model, plw=plw, normalization=normalization, lr=1e-3, completion_weight=completion_weight)
    dm = InstructionDataModule(loaded.tokenizer, **data, batch_size=batch_size, val_size=0, limit=16, cache_dir=None,
                               global_batch_size=batch_size * accumulate, batching=batching)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    indices = list(iter(trainer.train_dataloader.sampler))[: batch_size * accumulate]
    return module, [e for i in indices for e in dm.train_set[i]]


def token_loop(examples, plw: float, normalization: str, chat: bool = False, completion_weight: float = 1.0) -> float:
    """The step loss over the examples' targets, summed token by token in float64: Σ w_t ℓ_t / D with
    w_t = W[s_t] e_t, or ("share") Σ_s W[s] ℓ̄_s / Σ_s W[s] over the segments present, ℓ̄_s the e-weighted mean
    NLL of segment s."""
    model = tiny_model("float64", chat_template="chatml" if chat else None).model
    table = weight_table(plw, completion_weight=completion_weight)
    numerator = weighted = nonzero = completion = 0.0
    segment_sum, segment_count = [0.0] * len(table), [0.0] * len(table)
    for e in examples:
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
        for t in range(1, len(e.input_ids)):
            s, nll = e.segment_ids[t], -logprobs[t - 1, e.input_ids[t]].item()
            w = table[s] * e.weight
            numerator += w * nll
            weighted += w
            nonzero += w > 0
            completion += e.weight if s in COMPLETION_IDS else 0.0
            segment_sum[s] += e.weight * nll
            segment_count[s] += e.weight
    if normalization == "share":
        present = [s for s in range(len(table)) if segment_count[s] > 0]
        return sum(table[s] * segment_sum[s] / segment_count[s] for s in present) / sum(table[s] for s in present)
    return numerator / {"weight_sum": weighted, "nonzero": nonzero, "completion": completion}[normalization]


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "messages"])
@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion", "share"])
def test_the_step_loss_follows_the_token_loop(tmp_path, fmt, normalization):
    chat = fmt == "messages"
    path = weighted_copy(CHAT_SAMPLE if chat else SAMPLE, tmp_path / ("d.jsonl" if chat else "d.json"), fmt)
    module, examples = one_step({"path": str(path), "format": fmt, "weight_column": "w"}, 1, 4, normalization, chat=chat)
    assert len({e.weight for e in examples}) > 1  # the step really mixes weights
    assert module.last_step_loss == pytest.approx(token_loop(examples, 0.1, normalization, chat), rel=1e-9)


@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion", "share"])
def test_accumulation_and_packing_do_not_change_the_step(tmp_path, normalization):
    data = {"path": str(weighted_copy(SAMPLE, tmp_path / "d.json")), "weight_column": "w"}
    accumulated, examples = one_step(data, 1, 4, normalization)
    whole, examples_whole = one_step(data, 4, 1, normalization)
    assert [e.input_ids for e in examples] == [e.input_ids for e in examples_whole]
    for name, g in whole.grads.items():
        torch.testing.assert_close(accumulated.grads[name], g, rtol=0, atol=1e-9, msg=name)
    assert accumulated.last_step_loss == pytest.approx(whole.last_step_loss, rel=1e-12)
    packed, packed_examples = one_step(data, 2, 1, normalization, batching="packed")
    assert packed.last_step_loss == pytest.approx(token_loop(packed_examples, 0.1, normalization), rel=1e-9)


@pytest.mark.parametrize("plw", [0.0, 0.3, 1.0])
def test_share_makes_plw_the_prompts_share_of_the_loss(plw):
    """normalization=share with completion_weight = 1 - PLW: the step loss is PLW x the prompt's mean NLL +
    (1 - PLW) x the completion's, whatever their lengths (PLW 0: the Alpaca loss)."""
    module, examples = one_step({"path": str(SAMPLE)}, 1, 4, "share", plw=plw, completion_weight=1 - plw)
    model = tiny_model("float64").model
    sums, counts = [0.0, 0.0], [0, 0]
    for e in examples:
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
        for t in range(1, len(e.input_ids)):
            c = e.segment_ids[t] in COMPLETION_IDS
            sums[c] += -logprobs[t - 1, e.input_ids[t]].item()
            counts[c] += 1
    prompt, completion = sums[0] / counts[0], sums[1] / counts[1]
    assert module.last_step_loss == pytest.approx(plw * prompt + (1 - plw) * completion, rel=1e-9)


class ShareCheck(GradCapture):
    """Records, per optimizer step, the counts read ahead of it and the counts of the micro-batches it really got."""

    def on_train_start(self):
        self.ahead, self.seen, self.current = [], [], None

    def training_step(self, batch, batch_idx):
        from plwlab.training.loss import segment_counts

        weighted, _ = segment_counts(batch["segment_ids"], batch["token_mask"], 7, batch.get("example_weights"))
        self.current = weighted if self.current is None else self.current + weighted
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        self.ahead.append(list(self._share_counts))
        self.seen.append(self.current.tolist())
        self.current = None
        super().on_before_optimizer_step(optimizer)


@pytest.mark.parametrize("batching", ["length_grouped", "packed"])
def test_every_steps_counts_are_read_ahead_exactly(tmp_path, batching):
    """Over 3 epochs of 2 accumulated micro-batches (and a last step filled by repetition), the counts the share
    normalization reads ahead of each step are those of the micro-batches the step then trains on."""
    loaded = tiny_model("float64")
    module = ShareCheck(loaded.model, plw=0.2, normalization="share", lr=1e-3)
    dm = InstructionDataModule(loaded.tokenizer, str(weighted_copy(SAMPLE, tmp_path / "d.json")), weight_column="w",
                               batch_size=2, val_size=0, limit=18, cache_dir=None, global_batch_size=4,
                               batching=batching)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    assert len(module.seen) == trainer.global_step == 3 * dm.batches_per_epoch(1) // 2 >= 6
    for ahead, seen in zip(module.ahead, module.seen):
        assert ahead == pytest.approx(seen, rel=1e-12)


def test_unit_weights_give_the_unweighted_run(tmp_path):
    rows = json.loads(SAMPLE.read_text())
    (tmp_path / "ones.json").write_text(json.dumps([{**r, "w": 1} for r in rows]))
    weighted, _ = one_step({"path": str(tmp_path / "ones.json"), "weight_column": "w"}, 1, 4, "weight_sum")
    plain, _ = one_step({"path": str(SAMPLE)}, 1, 4, "weight_sum")
    assert weighted.last_step_loss == plain.last_step_loss  # bit for bit
    for name, g in plain.grads.items():
        assert torch.equal(weighted.grads[name], g), name


@pytest.mark.parametrize(("value", "message"), [
    (None, "record 3 has no weight column 'w' (data.weight_column)"),
    ("2", "record 3: weight column 'w' must be a finite number >= 0, got '2'"),
    (-1, "record 3: weight column 'w' must be a finite number >= 0, got -1"),
    (float("inf"), "record 3: weight column 'w' must be a finite number >= 0, got inf"),
    (True, "record 3: weight column 'w' must be a finite number >= 0, got True"),
])  # fmt: skip
def test_a_bad_weight_is_one_line_naming_its_row(tmp_path, value, message):
    rows = [{**r, "w": 1.0} for r in json.loads(SAMPLE.read_text())[:10]]
    if value is None:
        del rows[3]["w"]
    else:
        rows[3]["w"] = value
    (tmp_path / "d.json").write_text(json.dumps(rows))
    dm = InstructionDataModule(tiny_model().tokenizer, str(tmp_path / "d.json"), weight_column="w", cache_dir=None)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dm.setup("fit")


def test_a_weight_column_needs_every_row_to_become_an_example(tmp_path):
    with pytest.raises(ConfigError, match="data.weight_column needs every row to become one example"):
        validate_train(compose_train(["data.weight_column=w", "data.on_invalid=skip"], tmp_path))


def test_the_run_records_its_weights_and_trains_on_them(tmp_path):
    path = weighted_copy(SAMPLE, tmp_path / "d.json")
    metrics = train(compose_train([f"data.path={path}", "data.weight_column=w", "data.limit=48", "data.val_size=4",
                                   "trainer.max_steps=2", "callbacks.progress=null"], tmp_path / "run"))  # fmt: skip
    summary = metrics["example_weights"]
    assert summary["column"] == "w" and summary["n"] == 44 and summary["min"] >= 0 and summary["max"] == 3.5
    assert summary["n_zero"] > 0 and 0 < summary["mean"] < 3.5
    plain = train(compose_train([f"data.path={SAMPLE}", "data.limit=48", "data.val_size=4", "trainer.max_steps=2",
                                 "callbacks.progress=null"], tmp_path / "plain"))  # fmt: skip
    assert metrics["data_sha256"] != plain["data_sha256"]  # the weights are part of what the run read
    assert metrics["final_train_loss"] != plain["final_train_loss"]


def test_wits_grid_is_a_hydra_sweep_of_distinct_runs(tmp_path):
    """WIT's (λp, λr) grid as one command: 2 x 2 points, each its own run directory, planned before any trains."""
    from test_train import run_cli

    plan = run_cli("-m", "plw=0,0.5", "loss.completion_weight=0.5,1", "loss.normalization=nonzero", "plan_only=true",
                   f"paths.output_dir={tmp_path}")  # fmt: skip
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "Sweep plan: 4 runs" in plan.stdout and "4 new" in plan.stdout, plan.stdout[-2000:]
    for plw in ("0", "0.5"):
        for cw in ("0.5", "1"):
            assert f"plw={plw} loss.completion_weight={cw} " in plan.stdout
