import statistics
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import ASSETS, SAMPLE, tiny_model

from plwlab.data.batching import collate
from plwlab.data.datamodule import InstructionDataModule
from plwlab.data.segments import COMPLETION_IDS, COMPLETION_SEGMENTS, SEGMENTS
from plwlab.data.tokenization import TokenizedExample
from plwlab.training.callbacks import LossRSD, ParamDistance
from plwlab.training.loss import completion_mask, next_token_nll, prompt_weighted_loss, segment_weighted_loss
from plwlab.training.model import ModelLoadError, load_model
from plwlab.training.module import PLWModule

CHAT_SAMPLE = ASSETS / "chat_sample.jsonl"


class GradCapture(PLWModule):
    """Keeps the gradients the optimizer is about to use (after PLWModule's step normalisation)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


CHAT_WEIGHTS = {"template": 0.0, "system": 0.5, "user": 0.2, "earlier_assistant": 0.3}


def one_step(batch_size: int, accumulate: int, plw: float, normalization: str, scope: str = "step", chat: bool = False,
             completion_weight: float = 1.0):  # fmt: skip
    """One optimizer step on the Alpaca sample, or (``chat``) on the chat sample with :data:`CHAT_WEIGHTS`."""
    loaded = tiny_model("float64", chat_template="chatml" if chat else None)
    module = GradCapture(loaded.model, plw=plw, normalization=normalization, denominator_scope=scope, lr=1e-3,
                         segment_weights=CHAT_WEIGHTS if chat else None, completion_weight=completion_weight)  # fmt: skip
    data = {"path": str(CHAT_SAMPLE), "format": "messages"} if chat else {"path": str(SAMPLE)}
    dm = InstructionDataModule(loaded.tokenizer, **data, batch_size=batch_size, val_size=0, limit=16, cache_dir=None,
                               global_batch_size=batch_size * accumulate)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    first = [dm.train_set[i][0] for i in list(iter(trainer.train_dataloader.sampler))[: batch_size * accumulate]]
    return module, first, loaded


@pytest.mark.parametrize(("normalization", "chat", "completion_weight"),
                         [("weight_sum", False, 1.0), ("nonzero", False, 1.0), ("completion", False, 1.0),
                          ("weight_sum", True, 1.0), ("nonzero", True, 1.0), ("weight_sum", False, 0.6),
                          ("completion", False, 0.6)])  # fmt: skip
def test_grad_accumulation_4x1_equals_1x4(normalization, chat, completion_weight):
    kwargs = {"plw": 0.1, "normalization": normalization, "chat": chat, "completion_weight": completion_weight}
    accumulated, examples, _ = one_step(batch_size=1, accumulate=4, **kwargs)
    whole, examples_whole, _ = one_step(batch_size=4, accumulate=1, **kwargs)
    assert [e.input_ids for e in examples] == [e.input_ids for e in examples_whole]
    assert accumulated.grads.keys() == whole.grads.keys()
    for name, g in whole.grads.items():
        torch.testing.assert_close(accumulated.grads[name], g, rtol=0, atol=1e-6, msg=name)
    assert accumulated.last_step_loss == pytest.approx(whole.last_step_loss, rel=1e-12)


def test_step_loss_is_the_loss_of_the_whole_step():
    module, examples, loaded = one_step(batch_size=1, accumulate=4, plw=0.05, normalization="weight_sum")
    fresh = tiny_model("float64")  # the same initial weights
    batch = collate([[e] for e in examples], fresh.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = fresh.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.05)
    assert module.last_step_loss == pytest.approx(expected.loss.item(), rel=1e-12)


def test_chat_step_loss_weighs_every_segment_by_its_weight():
    """On multi-turn chat data with per-segment weights, the step loss over 4 accumulated micro-batches is
    Σ W[s_t] ℓ_t / Σ W[s_t] over the step's targets, counted here token by token."""
    module, examples, _ = one_step(batch_size=1, accumulate=4, plw=0.1, normalization="weight_sum", chat=True)
    fresh = tiny_model("float64", chat_template="chatml")
    weights = {**dict(zip(SEGMENTS, [0.1] * len(SEGMENTS))), **dict.fromkeys(COMPLETION_SEGMENTS, 1.0), **CHAT_WEIGHTS}
    numerator = denominator = 0.0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logprobs = fresh.model(input_ids=ids).logits[0].log_softmax(-1)
        for t in range(1, len(e.input_ids)):
            w = weights[SEGMENTS[e.segment_ids[t]]]
            numerator += w * -logprobs[t - 1, e.input_ids[t]].item()
            denominator += w
    assert {SEGMENTS[s] for e in examples for s in e.segment_ids} >= {"template", "user", "assistant", "earlier_assistant"}
    assert module.last_step_loss == pytest.approx(numerator / denominator, rel=1e-9)


@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion"])
def test_a_completion_weight_other_than_one_follows_the_token_loop(normalization):
    """WIT's (λp, λr) = (plw, loss.completion_weight): prompt targets weigh 0.3, completion targets 0.6; the step
    loss over 4 accumulated micro-batches is Σ w_t ℓ_t / D, summed here token by token in float64, with D = Σ w_t,
    #{w_t > 0} or the completion count."""
    module, examples, _ = one_step(batch_size=1, accumulate=4, plw=0.3, normalization=normalization, completion_weight=0.6)
    fresh = tiny_model("float64")
    numerator, weight_sum, n_completion, n_targets = 0.0, 0.0, 0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logprobs = fresh.model(input_ids=ids).logits[0].log_softmax(-1)
        for t in range(1, len(e.input_ids)):
            completion = e.segment_ids[t] in COMPLETION_IDS
            w = 0.6 if completion else 0.3
            numerator += w * -logprobs[t - 1, e.input_ids[t]].item()
            weight_sum, n_completion, n_targets = weight_sum + w, n_completion + completion, n_targets + 1
    denominator = {"weight_sum": weight_sum, "nonzero": n_targets, "completion": n_completion}[normalization]
    assert module.last_step_loss == pytest.approx(numerator / denominator, rel=1e-9)
    assert module.segment_weight_dict()["assistant"] == 0.6 and module.segment_weight_dict()["user"] == 0.3


def test_micro_batch_scope_averages_micro_batch_losses():
    step, examples, _ = one_step(batch_size=1, accumulate=4, plw=0.05, normalization="weight_sum")
    micro, _, _ = one_step(batch_size=1, accumulate=4, plw=0.05, normalization="weight_sum", scope="micro_batch")
    fresh = tiny_model("float64")
    losses = []
    for e in examples:
        b = collate([[e]], fresh.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = fresh.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        losses.append(prompt_weighted_loss(next_token_nll(logits, b["input_ids"]), completion_mask(b["segment_ids"]), b["token_mask"], 0.05).loss.item())
    assert micro.last_step_loss == pytest.approx(statistics.fmean(losses), rel=1e-12)
    assert abs(micro.last_step_loss - step.last_step_loss) > 1e-6  # the two conventions really differ here


def test_bad_module_arguments_are_refused_where_the_config_is_checked(tmp_path):
    """PLWModule trusts its arguments: the config layer (plwlab.config.validate_train) refuses bad ones."""
    from conftest import compose_train

    from plwlab.config import ConfigError
    from plwlab.config import validate_train as validate

    for override, message in (("loss.normalization=mean", "normalization"), ("loss.denominator_scope=epoch", "denominator_scope"),
                              ("plw=-1", "plw"), ("optim.optimizer_impl=adafactor", "optimizer_impl must be one of")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            validate(compose_train([override], tmp_path))


def test_param_distance_excludes_added_embedding_rows():
    loaded = tiny_model()
    n = loaded.pretrained_vocab_size
    loaded.model.resize_token_embeddings(n + 8)  # as if [PAD] etc. had been added to the tokenizer
    module = PLWModule(loaded.model, pretrained_vocab_size=n)
    cb = ParamDistance()
    trainer = SimpleNamespace(strategy=SimpleNamespace(restore_checkpoint_after_setup=False))
    cb.setup(trainer, module, "fit")
    assert cb.distances(trainer, module)["total"] == 0
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[n:] += 5.0  # added rows: no pretrained value, ignored
        loaded.model.get_output_embeddings().weight[n:] += 5.0
    assert cb.distances(trainer, module)["total"] == 0
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight[3, :4] += 1.0  # 4 entries moved by 1 -> distance 2
        loaded.model.model.layers[1].mlp.up_proj.weight[0, :9] += 1.0  # 9 entries -> distance 3
    d = cb.distances(trainer, module)
    assert d["total"] == pytest.approx(13**0.5)
    assert d["embed_tokens"] == pytest.approx(2.0) and d["layer_01"] == pytest.approx(3.0)
    assert d["layer_00"] == 0 and d["lm_head"] == 0


def test_param_distance_of_lora_is_the_norm_of_delta_w():
    loaded = tiny_model("float64", lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    module = PLWModule(loaded.model, pretrained_vocab_size=loaded.pretrained_vocab_size)
    cb = ParamDistance()
    trainer = SimpleNamespace(strategy=SimpleNamespace(restore_checkpoint_after_setup=False))
    cb.setup(trainer, module, "fit")
    assert cb.distances(trainer, module)["total"] == 0  # B starts at 0: ΔW = 0, however far A is from anything
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_" in name:
                p.normal_()
    # peft's own merge: the change each adapted layer's weight would get
    from peft.tuners.lora import LoraLayer

    expected: dict[str, float] = {}
    for name, m in loaded.model.named_modules():
        if isinstance(m, LoraLayer):
            layer = f"layer_{int(name.split('.layers.')[1].split('.')[0]):02d}"
            expected[layer] = expected.get(layer, 0.0) + m.get_delta_weight("default").pow(2).sum().item()
    d = cb.distances(trainer, module)
    assert d["total"] == pytest.approx(sum(expected.values()) ** 0.5, rel=1e-12)
    assert {k: d[k] for k in expected} == pytest.approx({k: v**0.5 for k, v in expected.items()}, rel=1e-12)


def test_loss_rsd_over_five_step_windows():
    losses = [4.0, 3.5, 3.6, 3.1, 3.3, 2.9, 3.0, 2.2]
    cb = LossRSD(window=5)
    logged = []
    module = SimpleNamespace(last_step_loss=None, log_dict=lambda d, **k: logged.append(d))
    for step, loss in enumerate(losses, start=1):
        module.last_step_loss = loss
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module)
        cb.on_train_batch_end(SimpleNamespace(global_step=step), module)  # accumulation batch: no new step
    windows = [losses[i : i + 5] for i in range(len(losses) - 4)]
    expected = [statistics.stdev(w) / statistics.fmean(w) for w in windows]
    assert cb.rsds == pytest.approx(expected)
    assert cb.value == pytest.approx(statistics.fmean(expected))
    assert len(logged) == 4
    restored = LossRSD(window=5)
    restored.load_state_dict(cb.state_dict())
    assert restored.value == cb.value and restored.losses == losses


def test_load_model_errors_and_pad_token(tmp_path):
    with pytest.raises(ModelLoadError, match="exactly one"):
        load_model(name="x", tokenizer="unused")
    with pytest.raises(ModelLoadError, match="tokenizer directory /nonexistent/tokenizer does not exist"):
        load_model(name="x", tokenizer="/nonexistent/tokenizer", config={"model_type": "llama"})
    tiny = tiny_model()
    tiny.tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ModelLoadError, match="model directory /nonexistent/model does not exist"):
        load_model(name="x", tokenizer=str(tmp_path / "tok"), name_or_path="/nonexistent/model")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")  # not a model HF can build
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(name="x", tokenizer=str(tmp_path / "tok"), name_or_path=str(tmp_path / "broken"))


def test_lora_trains_only_the_adapter():
    loaded = tiny_model(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_fused_adamw_gives_the_for_loop_update():
    """The fused AdamW plwlab picks on CPU takes the same steps as PyTorch's per-parameter loop (its CPU default),
    to float rounding, with the PLW loss over several steps."""
    from plwlab.training.optim import adamw_impl

    torch.manual_seed(0)
    examples = [TokenizedExample.from_prompt_length(list(range(5, 17)), 5), TokenizedExample.from_prompt_length(list(range(30, 40)), 4)]
    batch = collate([[e] for e in examples], pad_token_id=0)
    models = {impl: tiny_model().model for impl in ("fused", "for_loop")}
    assert adamw_impl(list(models["fused"].parameters())) == "fused"
    for impl, model in models.items():
        module = PLWModule(model, plw=0.1, lr=1e-2, optimizer_impl=impl)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=impl == "fused", foreach=False)
        for _ in range(5):
            loss = module._loss(batch, module.weights, "weight_sum").loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(models["fused"].named_parameters(), models["for_loop"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion"])
@pytest.mark.parametrize("plw", [0.0, 0.1, 1.0])
def test_alpaca_training_loss_is_bit_identical_to_the_prompt_weighted_loss(normalization, plw):
    """On Alpaca data the module's segment-weighted loss (7 segments, weights from plw) gives the very bits of
    :func:`prompt_weighted_loss` (prompt/completion), with its own denominator and with the step's (1.0)."""
    loaded = tiny_model()
    module = PLWModule(loaded.model, plw=plw, normalization=normalization)
    dm = InstructionDataModule(loaded.tokenizer, path=str(SAMPLE), batch_size=6, val_size=0, limit=12, cache_dir=None)
    dm.setup()
    batch = collate([dm.train_set[i] for i in range(6)], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        nll = module(batch)
    for denominator in (None, 1.0):
        new = segment_weighted_loss(nll, batch["segment_ids"], batch["token_mask"], module.weights, COMPLETION_IDS,
                                    normalization, denominator)  # fmt: skip
        old = prompt_weighted_loss(nll, completion_mask(batch["segment_ids"]), batch["token_mask"], plw, normalization,
                                   denominator)  # fmt: skip
        for a, b in zip(new, old):
            assert torch.equal(a, b)


def test_gradient_checkpointing_is_enabled_without_a_deprecation_warning():
    """transformers 5 renamed gradient_checkpointing_enable (removed in v6); the current name is used where it exists."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = tiny_model(gradient_checkpointing=True).model
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    assert checkpointing if checkpointing is not None else model.is_gradient_checkpointing


def test_a_micro_batch_asks_nothing_of_the_host():
    """training_step keeps its step sums on the device: no op of plwlab's that waits for the device to answer the
    host (an item/tolist/bool read, a data-dependent shape such as boolean indexing) runs per micro-batch on CUDA.
    Checked on CPU by the aten ops dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    loaded = tiny_model("float32", chat_template="chatml")
    module = PLWModule(loaded.model, plw=0.1, segment_weights=CHAT_WEIGHTS)
    dm = InstructionDataModule(loaded.tokenizer, path=str(CHAT_SAMPLE), format="messages", batch_size=2, val_size=0,
                               limit=4, cache_dir=None)  # fmt: skip
    dm.setup()
    batch = collate([[dm.train_set[i][0]] for i in range(2)], loaded.tokenizer.pad_token_id)
    # host reads; data-dependent output sizes (bincount sizes its output by the largest value)
    syncing = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount", "bool index"}
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._schema.name)
            if func._schema.name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
                seen.add("bool index")  # its kernel calls nonzero below this mode
            return func(*args, **(kwargs or {}))

    nll = module(batch)  # the model's forward: transformers checks the padding mask on the host (varlen: issue 26)
    module.forward = lambda _: nll  # what plwlab itself does per micro-batch: the loss and the step sums
    with Record():
        module.training_step(batch, 0)
    assert not seen & syncing, seen & syncing
    assert module._step_sums.device == batch["input_ids"].device and module._step_sums[-len(SEGMENTS):].sum() > 0
