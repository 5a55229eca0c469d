"""FSDP2 sharding of an HF causal LM (``strategy=fsdp``): one ``fully_shard`` unit per decoder layer, then the root,
with a mixed-precision policy that computes in bf16 over fp32 master weights."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# Lightning precision flag -> compute dtype of the sharded path (other flags: no casting)
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """``bf16-mixed``: parameters are all-gathered and used in bf16, gradients reduce-scattered in fp32; the sharded
    parameters (the master weights) and the optimizer state keep their own dtype (fp32). Lightning's own plugin
    adds autocast on top, as HF's Trainer does with ``--bf16``. ``32-true``/``64-true``: no casting."""
    compute = COMPUTE_DTYPES.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute is not None else None)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: instances of the classes HF lists in ``_no_split_modules`` (LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} lists no decoder-layer class in _no_split_modules: cannot shard it per layer")
    return layers


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, precision: str) -> None:
    """Shard ``model`` in place over ``mesh``: every decoder layer is one FSDP2 unit (gathered for its forward and
    backward only), the root holds the rest (embeddings, final norm, LM head)."""
    policy = mixed_precision_policy(precision)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    """True once the model's parameters are DTensors (sharded by FSDP2)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Free any gathered parameters, so that every parameter is its local shard again. FSDP2 keeps the root unit
    gathered after a forward without backward (validation), until the next forward or backward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of a parameter and the global index of its first row (0 for an unsharded parameter)."""
    if not hasattr(param, "to_local"):
        return param, 0
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), int(offset[0]) if offset else 0
