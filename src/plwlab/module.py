"""PLWModule: a LightningModule that fine-tunes any HF causal LM with the prompt-weighted loss."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torchmetrics import SumMetric
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedModel
from transformers import get_cosine_schedule_with_warmup

from plwlab.loss import NORMALIZATIONS, chunked_next_token_nll, loss_denominator, next_token_nll, prompt_weighted_loss

DENOMINATOR_SCOPES = ("step", "micro_batch")


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded (bad path, offline hub, bad preset)."""


class LoadedModel(NamedTuple):
    model: PreTrainedModel
    tokenizer: Any
    pretrained_vocab_size: int  # embedding rows before any added token: excluded from weight distances


def load_tokenizer(tokenizer: str) -> Any:
    """A tokenizer from a hub id, a local directory, or a bare SentencePiece ``.model`` file (LLaMA)."""
    path = Path(tokenizer).expanduser()
    try:
        if path.is_file() and path.suffix == ".model":
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy(path, Path(tmp) / "tokenizer.model")
                return LlamaTokenizer.from_pretrained(tmp)
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else tokenizer)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer {tokenizer!r}: {str(e).splitlines()[0]}") from e


def load_model(
    name: str,
    tokenizer: str,
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    add_pad_token: bool = False,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    lora: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a pretrained causal LM (``name_or_path``: hub id or local dir) or build a randomly initialised one
    from ``config`` (kwargs of ``AutoConfig.for_model``, e.g. ``model_type: llama``), plus its tokenizer.

    A tokenizer without a pad token gets ``[PAD]`` added (embeddings resized, as Stanford Alpaca does) when
    ``add_pad_token``, else reuses its unk/eos token (padding never enters the loss). ``lora`` holds
    ``peft.LoraConfig`` kwargs to train a LoRA adapter instead of all weights.
    """
    if (name_or_path is None) == (config is None):
        raise ModelLoadError(f"model preset {name!r}: set exactly one of name_or_path (pretrained) or config (random init)")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelLoadError(f"model preset {name!r}: unknown dtype {dtype!r}")
    tok = load_tokenizer(tokenizer)
    if tok.pad_token is None:
        if add_pad_token:
            tok.add_special_tokens({"pad_token": "[PAD]"})
        else:
            tok.pad_token = tok.unk_token or tok.eos_token
    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": attn_implementation}
    if name_or_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    else:
        special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        model_config = AutoConfig.for_model(**{"vocab_size": len(tok), **special, **config})
        model = AutoModelForCausalLM.from_config(model_config, **kwargs)
    pretrained_vocab_size = model.get_input_embeddings().weight.shape[0]
    if len(tok) > pretrained_vocab_size:
        model.resize_token_embeddings(len(tok))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    return LoadedModel(model, tok, pretrained_vocab_size)


def is_sharded(model: torch.nn.Module) -> bool:
    """True once the model's parameters are DTensors (sharded by FSDP2)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


class PLWModule(L.LightningModule):
    """Fine-tune ``model`` with :func:`plwlab.loss.prompt_weighted_loss`.

    ``denominator_scope="step"`` (default) makes the loss of each optimizer step exactly
    ``Σ w·ℓ / D`` with the sums and ``D`` taken over *all* its gradient-accumulation micro-batches and all
    ranks: every micro-batch back-propagates its plain weighted sum, and before the optimizer step (and before
    gradient clipping) the gradients are multiplied by ``accumulate_grad_batches · world_size / D``, undoing
    Lightning's division by ``accumulate_grad_batches`` and DDP/FSDP's gradient averaging over ranks.
    ``"micro_batch"`` normalises each micro-batch by its own ``D`` (what HF's Trainer does), so the step loss
    is the mean of the micro-batch losses. ``chunk_tokens`` computes the loss from the final hidden states and
    the LM head ``chunk_tokens`` targets at a time (:func:`plwlab.loss.chunked_next_token_nll`; for models whose
    logits are ``hidden @ lm_head.weight.T``, as LLaMA's) instead of materialising the logits of the whole batch.

    Logged per optimizer step: ``train/loss`` (the weighted loss), ``train/prompt_loss`` and
    ``train/completion_loss`` (unweighted mean NLL of each part). Validation logs the completion-only loss
    ``val/loss`` (PLW 0) and ``val/prompt_loss``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        plw: float = 0.0,
        normalization: str = "weight_sum",
        denominator_scope: str = "step",
        chunk_tokens: int | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        pretrained_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown loss normalization {normalization!r}; choose one of {NORMALIZATIONS}")
        if denominator_scope not in DENOMINATOR_SCOPES:
            raise ValueError(f"denominator_scope must be one of {DENOMINATOR_SCOPES}, got {denominator_scope!r}")
        if plw < 0:
            raise ValueError(f"plw must be >= 0, got {plw}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.plw, self.normalization, self.denominator_scope = float(plw), normalization, denominator_scope
        self.pretrained_vocab_size = pretrained_vocab_size
        self.chunk_tokens = chunk_tokens
        # Running sums since the last optimizer step:
        # [Σwℓ, Σ micro-batch losses, n micro-batches, prompt NLL, n prompt, completion NLL, n completion]
        self._step_sums = torch.zeros(7, dtype=torch.float64)
        self.last_step_loss: float | None = None
        self.val_sums = torch.nn.ModuleList(SumMetric() for _ in range(4))

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard every decoder layer (HF's ``_no_split_modules``), then the
        whole model, over the data-parallel mesh. Other strategies leave the model as it is."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or is_sharded(self.model):
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"]
        layer_names = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in self.model.modules():
            if type(module).__name__ in layer_names:
                fully_shard(module, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token next-token NLL (B, L-1) of a padded or packed batch."""
        # use_cache=False: with a KV cache HF skips the packed-sequence detection and attends across documents
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        if "position_ids" in batch:  # packed rows: no attention mask, so HF builds a block-diagonal causal mask
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["token_mask"]
        if self.chunk_tokens is None:
            return next_token_nll(self.model(**inputs).logits, batch["input_ids"])
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = causal.base_model(**inputs).last_hidden_state
        return chunked_next_token_nll(hidden, causal.get_output_embeddings().weight, batch["input_ids"], self.chunk_tokens)

    def _loss(self, batch: dict[str, torch.Tensor], plw: float, normalization: str, denominator: float | None = None):
        return prompt_weighted_loss(
            self(batch), batch["completion_mask"], batch["token_mask"],
            plw=plw, normalization=normalization, denominator=denominator,
        )  # fmt: skip

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step_scope = self.denominator_scope == "step"
        out = self._loss(batch, self.plw, self.normalization, denominator=1.0 if step_scope else None)
        sums = torch.stack([
            out.weighted_sum.detach(), out.loss.detach(), torch.ones_like(out.denominator),
            out.prompt_nll, out.n_prompt, out.completion_nll, out.n_completion,
        ]).double().cpu()  # fmt: skip
        self._step_sums += sums
        return out.weighted_sum if step_scope else out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        sums = self.trainer.strategy.reduce(self._step_sums.clone().to(self.device), reduce_op="sum").double().cpu()
        self._step_sums.zero_()
        weighted, loss_sum, n_micro, p_nll, n_p, c_nll, n_c = sums.tolist()
        if self.denominator_scope == "step":
            denominator = loss_denominator(n_p, n_c, self.plw, self.normalization).item()
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / denominator
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            step_loss = weighted / denominator
        else:
            step_loss = loss_sum / n_micro
        self.last_step_loss = step_loss
        metrics = {"train/loss": step_loss, "train/prompt_loss": p_nll / max(n_p, 1)}
        metrics["train/completion_loss"] = c_nll / max(n_c, 1)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._loss(batch, plw=0.0, normalization="completion")
        for metric, value in zip(self.val_sums, (out.completion_nll, out.n_completion, out.prompt_nll, out.n_prompt)):
            metric.update(value)

    def on_validation_epoch_end(self) -> None:
        c_nll, n_c, p_nll, n_p = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        self.log("val/loss", c_nll / n_c.clamp(min=1), prog_bar=True, sync_dist=False)
        self.log("val/prompt_loss", p_nll / n_p.clamp(min=1), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
            weight_decay=self.hparams.weight_decay,
        )  # fmt: skip
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(self.hparams.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
