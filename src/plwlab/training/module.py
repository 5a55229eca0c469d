"""PLWModule: a LightningModule that fine-tunes any HF causal LM with the prompt-weighted loss."""

from __future__ import annotations

import math
from types import MethodType
from typing import Any

import lightning as L
import torch
from torch.distributed.fsdp import register_fsdp_forward_method
from torchmetrics import SumMetric
from transformers import PreTrainedModel

from plwlab.data.segments import COMPLETION_IDS, SEGMENTS, weight_table
from plwlab.training.loss import (PLWLoss, chunked_next_token_nll, next_token_nll, segment_counts, segment_denominator,
                                  segment_weighted_loss)  # fmt: skip
from plwlab.training.optim import adamw, adamw_impl, cosine_schedule
from plwlab.training.sharding import FSDP2Strategy, is_sharded, shard_model


class TrainingDiverged(FloatingPointError):
    """The training loss or the gradient norm became NaN or infinite: the run stops as failed, naming the step."""


class PLWModule(L.LightningModule):
    """Fine-tune ``model`` with :func:`plwlab.training.loss.segment_weighted_loss`: every token weighs its segment's weight
    (:func:`plwlab.data.segments.weight_table`: ``plw`` for prompt segments, ``completion_weight`` (1) for assistant
    ones, then ``segment_weights``' overrides; on Alpaca data exactly the paper's prompt-weighted loss).

    ``denominator_scope="step"`` (default) makes the loss of each optimizer step exactly
    ``Σ w·ℓ / D`` with the sums and ``D`` taken over *all* its gradient-accumulation micro-batches and all
    ranks: every micro-batch back-propagates its plain weighted sum, and before the optimizer step (and before
    gradient clipping) the gradients are multiplied by ``accumulate_grad_batches · world_size / D``, undoing
    Lightning's division by ``accumulate_grad_batches`` and DDP/FSDP's gradient averaging over ranks.
    ``"micro_batch"`` normalises each micro-batch by its own ``D`` (what HF's Trainer does), so the step loss
    is the mean of the micro-batch losses. ``chunk_tokens`` computes the loss from the final hidden states and
    the LM head ``chunk_tokens`` targets at a time (:func:`plwlab.training.loss.chunked_next_token_nll`; for models whose
    logits are ``hidden @ lm_head.weight.T``, as LLaMA's) instead of materialising the logits of the whole batch.

    Logged per optimizer step: ``train/loss`` (the weighted loss), ``train/prompt_loss`` and
    ``train/completion_loss`` (unweighted mean NLL of each part). Validation logs the completion-only loss
    ``val/loss`` (PLW 0) and ``val/prompt_loss``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        plw: float = 0.0,
        segment_weights: dict[str, float] | None = None,
        completion_weight: float = 1.0,
        normalization: str = "weight_sum",
        denominator_scope: str = "step",
        chunk_tokens: int | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        optimizer_impl: str = "auto",
        pretrained_vocab_size: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_impl: str | None = None  # the AdamW implementation chosen in configure_optimizers
        self.save_hyperparameters(ignore=["model", "total_steps"])
        self.model = model
        self.plw, self.normalization, self.denominator_scope = float(plw), normalization, denominator_scope
        self.weights = weight_table(plw, segment_weights, completion_weight)
        self.val_weights = tuple(float(i in COMPLETION_IDS) for i in range(len(SEGMENTS)))  # completion-only NLL
        self.pretrained_vocab_size = pretrained_vocab_size
        self.chunk_tokens = chunk_tokens
        self.total_steps = total_steps
        self.compute_dtype: str | None = None  # dtype the model computed its outputs in (seen in the first step)
        model.plw_chunked_nll = MethodType(_chunked_nll, model)
        # Running sums since the last optimizer step: [Σwℓ, Σ micro-batch losses, n micro-batches, prompt NLL,
        # n prompt, completion NLL, n completion, then each segment's (example-)weighted target count, then each
        # segment's count of targets with a non-zero example weight]
        self._step_sums = torch.zeros(7 + 2 * len(SEGMENTS), dtype=torch.float64)
        self.last_step_loss: float | None = None
        self._share_counts: list[float] | None = None  # normalization="share": this optimizer step's segment counts
        self.val_sums = torch.nn.ModuleList(SumMetric() for _ in range(4))

    def segment_weight_dict(self) -> dict[str, float]:
        """The weight of each segment this run trains with (:mod:`plwlab.data.segments`)."""
        return dict(zip(SEGMENTS, self.weights))

    def configure_model(self) -> None:
        """Under :class:`~plwlab.training.sharding.FSDP2Strategy` (``strategy=fsdp``): shard the model with FSDP2,
        one unit per decoder layer (:func:`plwlab.training.sharding.shard_model`) over the strategy's mesh (HSDP
        across nodes), computing in the trainer's precision over the parameters' own dtype. Other strategies leave
        the model as it is."""
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(self.model):
            return
        shard_model(self.model, strategy.sharding_mesh, self.trainer.precision, self.device)
        # the chunked loss reads the LM head outside the model's forward: run it as a forward of the root unit, so
        # FSDP gathers the root's parameters (embeddings, norm, LM head) for it
        register_fsdp_forward_method(self.model, "plw_chunked_nll")

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token next-token NLL (B, L-1) of a padded or packed batch."""
        inputs = model_inputs(batch)
        if self.chunk_tokens is None:
            logits = self.model(**inputs).logits
            nll, compute_dtype = next_token_nll(logits, batch["input_ids"]), logits.dtype
        else:
            nll, compute_dtype = self.model.plw_chunked_nll(inputs, self.chunk_tokens)
        self.compute_dtype = self.compute_dtype or str(compute_dtype).removeprefix("torch.")
        return nll

    def _loss(self, batch: dict[str, torch.Tensor], weights: tuple[float, ...], normalization: str,
              denominator: float | None = None, share_counts: list[float] | None = None) -> PLWLoss:  # fmt: skip
        return segment_weighted_loss(self(batch), batch["segment_ids"], batch["token_mask"], weights, COMPLETION_IDS,
                                     normalization, denominator, batch.get("example_weights"), share_counts)  # fmt: skip

    def step_share_counts(self) -> list[float]:
        """The (example-)weighted target count of each segment over the current optimizer step, all micro-batches
        and ranks (``normalization="share"`` needs them before the step's first backward): read from the
        datamodule, which knows every step's sequences (:meth:`InstructionDataModule.step_counts`)."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "step_counts"):
            raise ValueError("loss.normalization=share needs plwlab's InstructionDataModule (it reads each optimizer "
                             "step's token counts ahead of the step)")  # fmt: skip
        per_epoch = datamodule.batches_per_epoch(self.trainer.world_size) // self.trainer.accumulate_grad_batches
        epoch = self.trainer.current_epoch
        return datamodule.step_counts(epoch, self.global_step - epoch * per_epoch, self.trainer.world_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step_scope = self.denominator_scope == "step"
        if step_scope and self.normalization == "share" and self._share_counts is None:
            self._share_counts = self.step_share_counts()
        out = self._loss(batch, self.weights, self.normalization, denominator=1.0 if step_scope else None,
                         share_counts=self._share_counts if step_scope else None)  # fmt: skip
        # counted by scatter, not boolean indexing: E_s and the non-zero-weight counts of segment_denominator
        weighted, nonzero = segment_counts(batch["segment_ids"], batch["token_mask"], len(SEGMENTS),
                                           batch.get("example_weights"))  # fmt: skip
        sums = torch.cat([torch.stack([
            out.weighted_sum.detach(), out.loss.detach(), torch.ones_like(out.denominator),
            out.prompt_nll, out.n_prompt, out.completion_nll, out.n_completion,
        ]).double(), weighted, nonzero])  # fmt: skip
        if self._step_sums.device != sums.device:
            self._step_sums = self._step_sums.to(sums.device)
        self._step_sums += sums  # on the device: no host sync per micro-batch, one per optimizer step
        return out.weighted_sum if step_scope else out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        sums = self.trainer.strategy.reduce(self._step_sums.clone(), reduce_op="sum").double().cpu()
        self._step_sums.zero_()
        self._share_counts = None  # the next step reads its own
        weighted, loss_sum, n_micro, p_nll, n_p, c_nll, n_c = sums[:7].tolist()
        if self.denominator_scope == "step":
            weighted_counts, nonzero_counts = sums[7 : 7 + len(SEGMENTS)], sums[7 + len(SEGMENTS) :]
            denominator = segment_denominator(weighted_counts, self.weights, COMPLETION_IDS, self.normalization,
                                              nonzero_counts).item()  # fmt: skip
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / denominator
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            step_loss = weighted / denominator
        else:
            step_loss = loss_sum / n_micro
        if not math.isfinite(step_loss):
            raise TrainingDiverged(f"training loss is {step_loss} at step {self.global_step + 1}; the run stops here")
        self.last_step_loss = step_loss
        metrics = {"train/loss": step_loss, "train/prompt_loss": p_nll / max(n_p, 1)}
        metrics["train/completion_loss"] = c_nll / max(n_c, 1)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._loss(batch, self.val_weights, "completion")
        for metric, value in zip(self.val_sums, (out.completion_nll, out.n_completion, out.prompt_nll, out.n_prompt)):
            metric.update(value)

    def on_validation_epoch_end(self) -> None:
        c_nll, n_c, p_nll, n_p = (m.compute() for m in self.val_sums)
        for m in self.val_sums:
            m.reset()
        self.log("val/loss", c_nll / n_c.clamp(min=1), prog_bar=True, sync_dist=False)
        self.log("val/prompt_loss", p_nll / n_p.clamp(min=1), sync_dist=False)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Clip the norm over *all* parameters (DTensor shards included: the norm is all-reduced), after the exact
        PLW rescale of :meth:`on_before_optimizer_step`, and log that norm (before clipping) as ``train/grad_norm``."""
        if gradient_clip_algorithm == "value":
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if gradient_clip_val is not None:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not torch.isfinite(norm):
            raise TrainingDiverged(f"gradient norm is {norm.item()} at step {self.global_step + 1}; the run stops here")
        self.log("train/grad_norm", norm.item(), on_step=True, on_epoch=False, rank_zero_only=True)

    def precision_report(self) -> dict[str, str | None]:
        """What the run really used: dtypes of the trainable parameters (the master weights), of the model's
        outputs (compute) and of the optimizer state (AdamW's moments)."""

        def name(dtypes: set[torch.dtype]) -> str | None:
            return ",".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or None

        trainable = [p for p in self.parameters() if p.requires_grad]
        state: set[torch.dtype] = set()
        for optimizer in self.trainer.optimizers if self._trainer is not None else []:
            for values in optimizer.state.values():
                state.update(v.dtype for k, v in values.items() if k in ("exp_avg", "exp_avg_sq"))
        return {"param_dtype": name({p.dtype for p in trainable}), "compute_dtype": self.compute_dtype,
                "optimizer_state_dtype": name(state), "optimizer_impl": self.optimizer_impl}  # fmt: skip

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer_impl = adamw_impl(params, self.hparams.optimizer_impl)
        hp = self.hparams
        optimizer = adamw(params, hp.lr, hp.betas, hp.eps, hp.weight_decay, self.optimizer_impl)
        # train() passes total_steps: estimated_stepping_batches would build the train dataloader now, before a
        # checkpoint is restored under strategies that restore after setup (FSDP2), and so lose its resume position
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        scheduler = cosine_schedule(optimizer, hp.warmup_ratio, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _chunked_nll(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], chunk_tokens: int
) -> tuple[torch.Tensor, torch.dtype]:
    """Per-token NLL from the final hidden states and the LM head, ``chunk_tokens`` targets at a time
    (:func:`plwlab.training.loss.chunked_next_token_nll`), and the dtype of the hidden states. Bound to the model (a LoRA
    model too) as ``plw_chunked_nll``."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.base_model(**inputs).last_hidden_state
    head = causal.get_output_embeddings().weight
    return chunked_next_token_nll(hidden, head, inputs["input_ids"], chunk_tokens), hidden.dtype


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The HF model's keyword arguments for a collated batch (:func:`plwlab.data.batching.collate`): padded rows
    get the attention mask; packed rows get position ids restarting per document and no mask (HF builds a
    block-diagonal causal mask) plus the documents' boundaries for varlen kernels (``attn_implementation`` varlen,
    flash_attention_2), the row length bounding the longest document so nothing is read back from the device.
    ``use_cache=False``: with a KV cache HF skips the packed-sequence detection and attends across documents."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" not in batch:
        return {**inputs, "attention_mask": batch["token_mask"]}
    length = batch["input_ids"].shape[1]
    return {**inputs, "position_ids": batch["position_ids"], "cu_seq_lens_q": batch["cu_seqlens"],
            "cu_seq_lens_k": batch["cu_seqlens"], "max_length_q": length, "max_length_k": length}  # fmt: skip
