"""Training callbacks: loss stability (LossRSD), distance from the pretrained weights (ParamDistance), and an
HF-format export of the fine-tuned model (HFExport)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import lightning as L
import torch

from plwlab.module import PLWModule, is_sharded


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
    """The whole tensor of a (possibly sharded) parameter: DTensor shards are gathered, one parameter at a time."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ParamDistance(L.Callback):
    """L2 distance of the trainable weights from the pretrained weights: total and per decoder layer.

    The pretrained weights are copied to CPU memory (in their own dtype) when fitting starts, before a
    checkpoint is restored or the model is moved to the GPU; distances are computed one parameter at a time, so
    no second full copy lives on the accelerator. Embedding rows added for new tokens (index >=
    ``PLWModule.pretrained_vocab_size``) are excluded: they have no pretrained value.
    Logged every ``every_n_steps`` optimizer steps and at the end of training as ``param_distance/total`` and
    ``param_distance/<layer_NN|embed_tokens|lm_head|norm>``.
    """

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True) -> None:
        self.every_n_steps, self.per_layer = every_n_steps, per_layer
        self.reference: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}
        self._seen_step = 0

    def _rows(self, pl_module: PLWModule) -> dict[int, int]:
        """id(param) -> pretrained row count, for the input/output embedding matrices."""
        n = pl_module.pretrained_vocab_size
        model = pl_module.model
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        return {id(m.weight): n for m in embeddings if m is not None and n is not None}

    def setup(self, trainer: L.Trainer, pl_module: PLWModule, stage: str) -> None:
        if stage != "fit" or self.reference:
            return
        rows = self._rows(pl_module)
        for name, p in pl_module.model.named_parameters():
            if p.requires_grad:
                ref = _full(p.detach())
                self.reference[name] = ref[: rows.get(id(p))].to("cpu", copy=True)

    @torch.no_grad()
    def distances(self, pl_module: PLWModule) -> dict[str, float]:
        rows = self._rows(pl_module)
        sq: dict[str, float] = {}
        for name, p in pl_module.model.named_parameters():
            if name not in self.reference:
                continue
            current = _full(p.detach())[: rows.get(id(p))]
            d = (current.float() - self.reference[name].to(current.device).float()).pow(2).sum().item()
            group = _layer_group(name)
            sq[group] = sq.get(group, 0.0) + d
        out = {"total": sum(sq.values()) ** 0.5}
        if self.per_layer:
            out.update({g: v**0.5 for g, v in sorted(sq.items())})
        return out

    def _log(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        self.last = self.distances(pl_module)
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


class HFExport(L.Callback):
    """At the end of training, save the model (or LoRA adapter) and tokenizer with ``save_pretrained`` into
    ``<dirpath>`` plus ``plwlab.json`` (PLW, data, Rg, ...) so ``evaluate.py`` can load and label the run."""

    def __init__(self, dirpath: str, metadata: dict[str, Any] | None = None) -> None:
        self.dirpath, self.metadata = Path(dirpath), dict(metadata or {})

    def on_train_end(self, trainer: L.Trainer, pl_module: PLWModule) -> None:
        state_dict = None
        if is_sharded(pl_module.model):  # FSDP2: every rank takes part in gathering the full weights
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state_dict = get_model_state_dict(pl_module.model, options=options)
        if trainer.is_global_zero:
            self._save(trainer, pl_module, state_dict)

    def _save(self, trainer: L.Trainer, pl_module: PLWModule, state_dict: dict[str, Any] | None) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        pl_module.model.save_pretrained(self.dirpath, state_dict=state_dict)
        datamodule = trainer.datamodule
        datamodule.tokenizer.save_pretrained(self.dirpath)
        meta = {**self.metadata, "plw": pl_module.plw, "normalization": pl_module.normalization, **datamodule.stats}
        (self.dirpath / "plwlab.json").write_text(json.dumps(meta, indent=2) + "\n")
