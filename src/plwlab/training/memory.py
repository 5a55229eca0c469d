"""Will the run fit? A pre-flight estimate of the memory a run needs per device (weights, gradients, AdamW state,
activations, logits), from the model's config alone, checked before any weight is loaded, and the choice of
strategy it implies when the strategy is left to ``auto``.

Per device, with P parameters (T trainable), parameter bytes b (the master weights' dtype: 4 for fp32), S shards
(FSDP: every process; otherwise 1):

- weights ``P·b / S``, gradients ``T·b / S``, AdamW's two moments ``2·T·b / S``;
- activations of a micro-batch of N tokens through L decoder layers of width h and MLP width i, bf16 compute over
  an fp32 residual stream (HF LLaMA: fp32 RMSNorm copies, q/k/v, RoPE, SDPA inputs and output, SwiGLU's gate, up,
  product): about ``(40·h + 8·i)`` bytes per token and layer (twice that computing in fp32). With activation
  checkpointing only each layer's input (``4·h`` per token) is kept, plus one layer recomputed;
- logits ``N·V`` in the compute dtype, their gradient as large (the loss adds no full-size copy).

LLaMA-2-7B at micro-batch 4 x 512 in bf16 over fp32: 27 GB weights + 27 GB gradients + 54 GB AdamW on one GPU,
activations 16 GB (0.5 GB per layer; 1.6 GB with checkpointing), logits 0.3 GB. The activation coefficients are
checked against a measured LLaMA-7B layer in docs/cluster.md when a GPU is available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from plwlab import CONF_DIR
from plwlab.config import BatchGeometry, ConfigError

GB = 1e9
CPU_PARAMETER_LIMIT = 1_000_000_000  # a pretrained model above this on CPU is a mistake, not a plan
HEADROOM = 0.85  # share of a device's memory a plan may fill without activation checkpointing (allocator slack)
COMPUTE_BYTES = {"bf16-mixed": 2, "16-mixed": 2, "bf16-true": 2, "16-true": 2}  # Lightning precision -> bytes; else 4


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device needs for a run (see the module docstring for the formulas)."""

    params: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    shards: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        parts = (("weights", self.weights), ("gradients", self.gradients), ("AdamW", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits))  # fmt: skip
        return f"{self.total / GB:.1f} GB (" + " + ".join(f"{name} {v / GB:.1f}" for name, v in parts) + ")"


def model_config(model: DictConfig) -> Any | None:
    """The transformers config of the run's model, read without weights; None when it cannot be read here (a hub
    id while offline: loading the model reports that)."""
    try:
        if model.get("name_or_path"):
            return AutoConfig.from_pretrained(model.name_or_path)
        return AutoConfig.for_model(**{"vocab_size": 32000, **model.config})
    except (OSError, ValueError):
        return None


def count_parameters(config: Any) -> int:
    """Parameters of a model built from ``config`` on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def layer_activation_bytes(hidden: int, intermediate: int, tokens: int, compute_bytes: int, checkpointing: bool) -> float:
    """Bytes one HF LLaMA decoder layer keeps for its backward over ``tokens`` tokens, per token:

    - mixed precision (``compute_bytes`` < 4): ``36·h + 8·i``: the fp32 residual stream and the two norms' fp32
      input and output (16·h), the bf16 casts autocast makes of the norms' outputs for each of the 5 input
      projections (10·h: it caches casts of weights only), q, k, v and the attention output (8·h), o_proj's input
      (2·h); the MLP's gate, up, SiLU and product (8·i);
    - fp32 compute: ``40·h + 16·i`` (no casts; the rotary embedding's fp32 q and k);
    - with activation checkpointing only the layer's fp32 input, ``4·h``.

    Measured by the tensors autograd saves (tests/test_gpu_check.py, within 10% on CPU; GQA's smaller k and v make
    it an upper bound); benchmarks/gpu_check.py measures a LLaMA-7B layer on a GPU."""
    if checkpointing:
        return 4 * hidden * tokens
    if compute_bytes < 4:
        return (36 * hidden + 8 * intermediate) * tokens
    return (40 * hidden + 16 * intermediate) * tokens


def plan_memory(cfg: DictConfig, geometry: BatchGeometry, shards: int, config: Any,
                checkpointing: bool | None = None) -> MemoryPlan:  # fmt: skip
    """The per-device :class:`MemoryPlan` of ``cfg`` when its parameters are split over ``shards`` processes, with
    activation checkpointing as ``checkpointing`` says (None: as ``model.gradient_checkpointing`` is ``true``)."""
    params = count_parameters(config)
    b = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    trainable = params if not cfg.model.lora else 0  # LoRA: the adapters are a rounding error here
    compute = COMPUTE_BYTES.get(str(cfg.trainer.get("precision")), 4)
    h, i = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    layers, vocab = config.num_hidden_layers, config.vocab_size
    tokens = geometry.micro_batch * cfg.data.max_length
    if checkpointing is None:
        checkpointing = cfg.model.gradient_checkpointing is True
    activations = layers * layer_activation_bytes(h, i, tokens, compute, checkpointing)
    if checkpointing:  # one layer's activations, recomputed in its backward
        activations += layer_activation_bytes(h, i, tokens, compute, False)
    return MemoryPlan(
        params=params, trainable=trainable, weights=params * b / shards, gradients=trainable * b / shards,
        optimizer=2 * trainable * b / shards, activations=activations, logits=2 * tokens * vocab * compute, shards=shards,
    )  # fmt: skip


def device_memory(accelerator: str) -> float | None:
    """Bytes of one device: the first CUDA GPU's, or this host's RAM on CPU (None if unknown)."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return None


def strategy_shards(strategy: DictConfig) -> bool:
    """Whether a strategy *config* shards the model with FSDP2 (``strategy=fsdp``); whether a built model is
    sharded is :func:`plwlab.training.sharding.is_sharded`."""
    return str(strategy.get("_target_", "")).endswith(("FSDP2Strategy", "ModelParallelStrategy"))


@dataclass(frozen=True)
class RunPlan:
    """What the pre-flight decided for a run, beside its config (which it leaves as written): the strategy config
    to train with, whether it shards the model, activation checkpointing on or off, and the memory estimate (None
    when the model's config cannot be read here)."""

    strategy: DictConfig
    sharded: bool
    gradient_checkpointing: bool
    memory: MemoryPlan | None


def preflight(cfg: DictConfig, geometry: BatchGeometry) -> RunPlan:
    """Before any weight is loaded: refuse a ``data.max_length`` beyond the model's context and a pretrained model
    of a billion parameters on CPU, choose the strategy when it is ``auto`` (:func:`choose_strategy`) and activation
    checkpointing when it is ``auto`` (:func:`choose_checkpointing`), and refuse a plan that does not fit
    (:func:`check_fits`). Nothing is checked when the model's config cannot be read here (checkpointing ``auto`` is
    then on, the safe choice)."""
    config = model_config(cfg.model)
    if config is None:
        checkpointing = cfg.model.gradient_checkpointing is not False
        return RunPlan(cfg.strategy, strategy_shards(cfg.strategy), checkpointing, None)
    context = getattr(config, "max_position_embeddings", None)
    if context and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds model {cfg.model.name}'s context of {context} "
                          f"tokens (max_position_embeddings); use data.max_length<={context}")  # fmt: skip
    accelerator = str(cfg.trainer.get("accelerator"))
    if accelerator == "cpu" and cfg.model.get("name_or_path") and count_parameters(config) > CPU_PARAMETER_LIMIT:
        raise ConfigError(
            f"model {cfg.model.name} has {count_parameters(config) / 1e9:.1f}B parameters and trainer.accelerator=cpu: "
            "that would take weeks; run it on a GPU node (the default trainer=auto uses its GPUs) or with trainer=gpu"
        )
    capacity = device_memory(accelerator)
    strategy = choose_strategy(cfg, geometry, config, capacity)
    sharded = strategy_shards(strategy)
    checkpointing = choose_checkpointing(cfg, geometry, config, capacity, sharded)
    memory = check_fits(cfg, geometry, config, capacity, sharded, checkpointing)
    return RunPlan(strategy, sharded, checkpointing, memory)


def choose_checkpointing(cfg: DictConfig, geometry: BatchGeometry, config: Any, capacity: float | None,
                         sharded: bool) -> bool:  # fmt: skip
    """``model.gradient_checkpointing``: true or false as set; ``auto`` off when the run fits in
    :data:`HEADROOM` of a device without it (recomputing every layer costs about a third more compute), else on.
    Unknown capacity: on."""
    value = cfg.model.gradient_checkpointing
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"model.gradient_checkpointing must be true, false or auto, got {value!r}")
    if capacity is None:
        return True
    plan = plan_memory(cfg, geometry, geometry.world_size if sharded else 1, config, checkpointing=False)
    return per_device(cfg, geometry, plan) > HEADROOM * capacity


def per_device(cfg: DictConfig, geometry: BatchGeometry, plan: MemoryPlan) -> float:
    """Bytes a plan asks of one device: its total, times the processes on CPU, where all ranks share one host."""
    return plan.total * (geometry.world_size if str(cfg.trainer.get("accelerator")) == "cpu" else 1)


def check_fits(cfg: DictConfig, geometry: BatchGeometry, config: Any, capacity: float | None, sharded: bool,
               checkpointing: bool | None = None) -> MemoryPlan:  # fmt: skip
    """The run's :class:`MemoryPlan` (activation checkpointing as ``checkpointing`` says; None: as the config
    says); refuse (:class:`ConfigError`, one line with the numbers and the fix) a run whose estimate exceeds one
    device's ``capacity``, on CPU the whole host's RAM shared by its processes."""
    plan = plan_memory(cfg, geometry, geometry.world_size if sharded else 1, config, checkpointing)
    on_cpu = str(cfg.trainer.get("accelerator")) == "cpu"
    need = per_device(cfg, geometry, plan)
    if capacity is None or need <= capacity:
        return plan
    fixes = []
    if not on_cpu and not sharded:
        fsdp = plan_memory(cfg, geometry, max(geometry.world_size, 2), config)
        fixes.append(f"strategy=fsdp over {max(geometry.world_size, 2)} GPUs (≈ {fsdp.total / GB:.0f} GB each)")
    if not (checkpointing if checkpointing is not None else cfg.model.gradient_checkpointing is True):
        fixes.append("model.gradient_checkpointing=true")
    if not cfg.model.lora:
        fixes.append("LoRA (model.lora={r:16,lora_alpha:32})")
    fixes.append("a smaller data.batch_size with a larger global_batch_size")
    where = "this host has" if on_cpu else "a GPU here has"
    raise ConfigError(
        f"model {cfg.model.name} ({plan.params / 1e9:.2f}B parameters) needs ≈ {plan.describe()} per "
        f"{'process' if on_cpu else 'GPU'}, and {where} {capacity / GB:.0f} GB; use " + ", or ".join(fixes)
    )


def choose_strategy(cfg: DictConfig, geometry: BatchGeometry, config: Any, capacity: float | None) -> DictConfig:
    """``strategy=auto`` on several GPUs: FSDP when the model does not fit one GPU unsharded, else Lightning's
    choice (DDP). A named strategy, one process, CPU, or an unknown capacity keep the configured one."""
    if "_target_" in cfg.strategy or geometry.world_size == 1 or str(cfg.trainer.get("accelerator")) == "cpu":
        return cfg.strategy
    if capacity is None or plan_memory(cfg, geometry, 1, config).total <= capacity:
        return cfg.strategy
    return OmegaConf.load(CONF_DIR / "strategy" / "fsdp.yaml")  # as strategy=fsdp composes it
