"""Training callbacks: loss stability (LossRSD), distance from the pretrained weights (ParamDistance), and an
HF-format export of the fine-tuned model (HFExport)."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from plwlab.rundir import RunDir, RunError
from plwlab.training.checkpointing import RunCheckpoint
from plwlab.training.module import PLWModule
from plwlab.training.sharding import is_sharded, local_part, replicas, reshard


class LossRSD(L.Callback):
    """Relative standard deviation of the training loss over every window of ``window`` consecutive optimizer
    steps: ``rsd_k = std(loss_k..loss_{k+window-1}) / mean(...)`` (``ddof=1``: sample std by default).

    Logs ``loss_rsd/window`` (the latest window) and ``loss_rsd/mean`` (running mean over all windows so far);
    :attr:`value` is that mean, the paper's stability measure. Its state is saved in checkpoints.
    """

    def __init__(self, window: int = 5, ddof: int = 1) -> None:
        if window < 2 or not 0 <= ddof < window:
            raise ValueError(f"need window >= 2 and 0 <= ddof < window, got window={window}, ddof={ddof}")
        self.window, self.ddof = window, ddof
        self.losses: list[float] = []
        self.rsds: list[float] = []
        self._seen_step = 0

    @property
    def value(self) -> float | None:
        return statistics.fmean(self.rsds) if self.rsds else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PLWModule, *args: Any) -> None:
        if trainer.global_step == self._seen_step or pl_module.last_step_loss is None:
            return  # still accumulating gradients: no optimizer step yet
        self._seen_step = trainer.global_step
        self.losses.append(pl_module.last_step_loss)
        if len(self.losses) >= self.window:
            w = self.losses[-self.window :]
            mean = statistics.fmean(w)
            var = sum((x - mean) ** 2 for x in w) / (self.window - self.ddof)
            self.rsds.append(var**0.5 / mean)
            pl_module.log_dict({"loss_rsd/window": self.rsds[-1], "loss_rsd/mean": self.value}, rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "rsds": self.rsds, "seen_step": self._seen_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses, self.rsds = list(state_dict["losses"]), list(state_dict["rsds"])
        self._seen_step = state_dict["seen_step"]


def _layer_group(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``layer_03``; anything else -> its module name."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return f"layer_{int(match.group(1)):02d}"
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_lora_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


class ParamDistance(L.Callback):
    """L2 distance of the weights from the pretrained weights: total and per decoder layer.

    Full fine-tuning: ``||θ - θ₀||`` over the trainable parameters. LoRA: the distance of the *effective* weights,
    ``||ΔW||`` with ``ΔW = scaling · B·A`` per adapted layer (computed as ``scaling² · Σ (BᵀB) ⊙ (AAᵀ)``, never
    forming ΔW), plus any other trainable parameter's own distance.

    Each rank keeps a CPU copy of only its own shard of the pretrained weights (memory O(params / world) under
    FSDP2, in the parameters' dtype), taken at the last moment before a checkpoint is restored; a measurement
    sums squared differences shard by shard and adds them up over ranks with one all-reduce. Embedding rows added
    for new tokens (index >= ``PLWModule.pretrained_vocab_size``) are excluded: they have no pretrained value.
    Logged every ``every_n_steps`` optimizer steps and at the end of training as ``param_distance/total`` and
    ``param_distance/<layer_NN|embed_tokens|lm_head|norm>``.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True) -> None:
        self.every_n_steps, self.per_layer = every_n_steps, per_layer
        self.reference: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}
        self._seen_step = 0

    def _pretrained_rows(self, pl_module: PLWModule) -> dict[int, int]:
        """id(param) -> pretrained row count, for the input/output embedding matrices."""
        n = pl_module.pretrained_vocab_size
        model = pl_module.model
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        return {id(m.weight): n for m in embeddings if m is not None and n is not None}

    def _local(self, p: torch.Tensor, rows: dict[int, int]) -> torch.Tensor:
        """This rank's part of ``p`` without the rows added after pretraining."""
        local, first_row = local_part(p.detach())
        if id(p) in rows:
            local = local[: max(0, rows[id(p)] - first_row)]
        return local

    def _take_reference(self, pl_module: PLWModule) -> None:
        if self.reference:
            return
        reshard(pl_module.model)
        rows = self._pretrained_rows(pl_module)
        for name, p in pl_module.model.named_parameters():
            if _is_lora_factor(name):
                continue
            if ".lora_" in name:
                raise ValueError(f"ParamDistance measures ΔW of LoRA linear layers only, not {name}")
            if p.requires_grad:
                self.reference[name] = self._local(p, rows).to("cpu", copy=True)

    def setup(self, trainer: L.Trainer, pl_module: PLWModule, stage: str) -> None:
        if stage == "fit" and not trainer.strategy.restore_checkpoint_after_setup:
            self._take_reference(pl_module)  # DDP / one device: the checkpoint is restored before the model is set up

    def on_fit_start(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        self._take_reference(pl_module)  # FSDP2: after sharding, before the checkpoint is restored

    @torch.no_grad()
    def distances(self, trainer: L.Trainer, pl_module: PLWModule) -> dict[str, float]:
        reshard(pl_module.model)
        rows = self._pretrained_rows(pl_module)
        groups: dict[str, int] = {}
        sharded: list[tuple[int, torch.Tensor]] = []  # summed over ranks
        replicated: list[tuple[int, torch.Tensor]] = []  # the same on every rank
        for name, p in pl_module.model.named_parameters():
            if name not in self.reference:
                continue
            current = self._local(p, rows)
            dtype = torch.promote_types(current.dtype, torch.float32)
            d = (current.to(dtype) - self.reference[name].to(current.device, dtype)).pow(2).sum(dtype=torch.float64)
            d = d / replicas(p)  # HSDP: every node holds this shard; the sum over ranks counts it once
            g = groups.setdefault(_layer_group(name), len(groups))
            (sharded if hasattr(p, "to_local") else replicated).append((g, d))
        for name, module in pl_module.model.named_modules():
            for adapter in getattr(module, "active_adapters", []) if hasattr(module, "lora_A") else []:
                if adapter in module.lora_A:
                    a = _full(module.lora_A[adapter].weight).double()
                    b = _full(module.lora_B[adapter].weight).double()
                    d = module.scaling[adapter] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
                    replicated.append((groups.setdefault(_layer_group(f"{name}."), len(groups)), d))
        device = pl_module.device
        sums = torch.zeros(len(groups), dtype=torch.float64, device=device)
        for g, d in sharded:
            sums[g] += d.to(device)
        if sharded:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        for g, d in replicated:
            sums[g] += d.to(device)
        sq = dict(zip(groups, sums.tolist()))
        out = {"total": sum(sq.values()) ** 0.5}
        if self.per_layer:
            out.update({g: v**0.5 for g, v in sorted(sq.items())})
        return out

    def _log(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        self.last = self.distances(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # CSV and W&B alike
                logger.log_metrics({f"param_distance/{k}": v for k, v in self.last.items()}, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PLWModule, *args: Any) -> None:
        step = trainer.global_step
        if step != self._seen_step and step % self.every_n_steps == 0:
            self._log(trainer, pl_module)
        self._seen_step = step

    def on_train_end(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        self._log(trainer, pl_module)


class ExportError(RunError):
    """The model export could not be written (a full disk); the training state is kept for a resume that exports."""


class HFExport(L.Callback):
    """At the end of training, save the model (or LoRA adapter) and tokenizer with ``save_pretrained`` into
    ``dirpath`` (default: the run directory's ``hf_model/``) plus ``plwlab.json`` (PLW, dataset, Rg, ``metadata``, ...)
    so ``evaluate.py`` can load and label the run.

    The export is written beside its place and renamed into it when complete: a failed write (a full disk) leaves
    no partial ``hf_model/``. The final training state is then checkpointed (:class:`RunCheckpoint`; the space the
    partial export took is free again) and :attr:`failed` says where; ``train()`` then fails the run with it, and a
    resume exports without training again."""

    def __init__(self, dirpath: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.metadata = dict(metadata or {})
        self.failed: str | None = None  # why the export could not be written, and where the trained state is

    def on_train_end(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        state_dict = None
        if is_sharded(pl_module.model):  # FSDP2: every rank takes part in gathering the full weights onto rank 0
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(pl_module.model, options=options)
            # a tied parameter is gathered once per name; keep its first name, as save_pretrained does unsharded
            names: dict[int, str] = {}
            for name, p in pl_module.model.named_parameters(remove_duplicate=False):
                if names.setdefault(id(p), name) != name:
                    state_dict.pop(name, None)
        error = None
        if trainer.is_global_zero:
            try:
                self._save(trainer, pl_module, state_dict)
            except OSError as e:
                error = f"{e.strerror or e}"
        error = trainer.strategy.broadcast(error)  # every rank learns of it: the checkpoint below is collective
        self.failed = None if error is None else self._failure(trainer, error)
        trainer.strategy.barrier()

    def _failure(self, trainer: L.Trainer, error: str) -> str:
        """Checkpoint the final training state (every rank) and say where the trained steps are."""
        dirpath = self.dirpath or RunDir(trainer.default_root_dir).hf_model
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, RunCheckpoint)), None)
        kept = "no checkpoint callback (callbacks.checkpoint=null): the trained steps are lost"
        if saver is not None:
            try:
                saver.save_final(trainer)
                kept = f"the trained state is in {saver.last} (step {trainer.global_step})"
            except OSError as e:
                kept = (f"the final state could not be checkpointed either ({e.strerror or e}); {saver.last} keeps the "
                        "last one saved")  # fmt: skip
        return (f"cannot write the model export {dirpath}: {error}; {kept}. Free space and resume the run: it "
                "exports without training again")

    def _save(self, trainer: L.Trainer, pl_module: PLWModule, state_dict: dict[str, Any] | None) -> None:
        run = RunDir(trainer.default_root_dir)
        dirpath = self.dirpath or run.hf_model
        partial = dirpath.with_name(f".{dirpath.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            pl_module.model.save_pretrained(partial, state_dict=state_dict)
            datamodule = trainer.datamodule
            datamodule.tokenizer.save_pretrained(partial)
            meta = {**self.metadata, "plw": pl_module.plw, "segment_weights": pl_module.segment_weight_dict(),
                    "normalization": pl_module.normalization, **datamodule.stats}  # fmt: skip
            (partial / run.export_meta_file.name).write_text(json.dumps(meta, indent=2) + "\n")
            if dirpath.exists():  # an earlier export of this run (resumed after it): replaced whole
                shutil.rmtree(dirpath)
            os.rename(partial, dirpath)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
