"""FSDP2 sharding of an HF causal LM (``strategy=fsdp``): one ``fully_shard`` unit per decoder layer, then the root,
with a mixed-precision policy that computes in bf16 over fp32 master weights, over all processes (one node) or
within each node and replicated across nodes (HSDP, :class:`FSDP2Strategy`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from plwlab.training.model import decoder_layers

# Lightning precision flag -> compute dtype of the sharded path (other flags: no casting)
COMPUTE_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
DEFER_GRADIENT_SYNC = ("replicas", "all", "none")


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """``bf16-mixed``: parameters are all-gathered and used in bf16, gradients reduce-scattered in fp32; the sharded
    parameters (the master weights) and the optimizer state keep their own dtype (fp32). Lightning's own plugin
    adds autocast on top, as HF's Trainer does with ``--bf16``. ``32-true``/``64-true``: no casting."""
    compute = COMPUTE_DTYPES.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute is not None else None)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, precision: str, device: torch.device) -> None:
    """Shard ``model`` in place over ``mesh``: every decoder layer is one FSDP2 unit (gathered for its forward and
    backward only), the root holds the rest (embeddings, final norm, LM head).

    A pretrained model is read by rank 0 alone; the other ranks hold its architecture on the meta device
    (:func:`plwlab.training.model.load_model` with ``weights=False``). Once sharded, their shards are allocated on
    ``device`` and rank 0's weights broadcast into every rank's shards (``set_model_state_dict`` with
    ``broadcast_from_rank0``): host memory holds one copy of the model, not one per rank."""
    policy = mixed_precision_policy(precision)
    on_meta = any(p.is_meta for p in model.parameters())
    broadcast = _any_rank(on_meta, device)
    full = model.state_dict() if broadcast and dist.get_rank() == 0 else {}  # rank 0: the loaded weights
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not broadcast:
        return
    if on_meta:
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # real: built from the config
        model.to_empty(device=device)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (every rank calls it)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_sharded(model: torch.nn.Module) -> bool:
    """True once the model's parameters are DTensors (sharded by FSDP2)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Free any gathered parameters, so that every parameter is its local shard again. FSDP2 keeps the root unit
    gathered after a forward without backward (validation), until the next forward or backward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def replicas(param: torch.Tensor) -> int:
    """On how many processes the same shard of a parameter lives: the replicated dimensions of its mesh (HSDP:
    the nodes); 1 for an unsharded parameter."""
    if not hasattr(param, "placements"):
        return 1
    return math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if p.is_replicate())


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of a parameter and the global index of its first row (0 for an unsharded parameter)."""
    if not hasattr(param, "to_local"):
        return param, 0
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), int(offset[0]) if offset else 0


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` used for FSDP2 data parallelism only (``strategy=fsdp``): every process
    is one data-parallel rank, and :meth:`PLWModule.configure_model` shards the model over :attr:`sharding_mesh`.

    ``replicate_across_nodes`` (default): on several nodes, HSDP: each node holds one full copy, sharded over its
    own GPUs (a 2-D mesh ``(replicate=nodes, shard=devices)``), so the all-gathers and reduce-scatters of every
    layer stay on the node's links and only the gradient shards cross nodes, once per micro-batch. On one node,
    full sharding. ``defer_gradient_sync``: on the micro-batches of an accumulation window before the last
    (Lightning's ``block_backward_sync``), ``"replicas"`` (default) skips the all-reduce across nodes (gradients
    accumulate in the node's shards: no extra memory, and the traffic between nodes once per optimizer step),
    ``"all"`` skips every gradient reduction (each rank accumulates the whole, unsharded gradient: one more
    model's worth of gradients in memory, no communication until the last micro-batch), ``"none"`` reduces on
    every micro-batch. The step's exact denominator (PLWModule) is unaffected: only the summation order changes.
    """

    def __init__(self, replicate_across_nodes: bool = True, defer_gradient_sync: str = "replicas",
                 async_save: bool = True, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if defer_gradient_sync not in DEFER_GRADIENT_SYNC:
            raise ValueError(f"defer_gradient_sync must be one of {DEFER_GRADIENT_SYNC}, got {defer_gradient_sync!r}")
        self.replicate_across_nodes, self.defer_gradient_sync = replicate_across_nodes, defer_gradient_sync
        self.async_save = async_save
        self._sharding_mesh: DeviceMesh | None = None
        self._save: Future | None = None  # the asynchronous save in flight
        self._save_group: Any = None  # a gloo group for it: async_save's collectives run on CPU beside NCCL's

    @property
    def hsdp(self) -> bool:
        return self.replicate_across_nodes and self.num_nodes > 1

    @property
    def sharding(self) -> str:
        """How the model is split, for metrics.json: ``fsdp 4`` or ``hsdp 2x2`` (nodes x processes per node)."""
        per_node = self.world_size // self.num_nodes
        return f"hsdp {self.num_nodes}x{per_node}" if self.hsdp else f"fsdp {self.world_size}"

    @property
    def sharding_mesh(self) -> DeviceMesh:
        """The mesh the model is sharded over: ``(replicate, shard)`` for HSDP, else every process."""
        if self._sharding_mesh is None:
            if self.hsdp:
                self._sharding_mesh = init_device_mesh(self.root_device.type, (self.num_nodes, self.world_size // self.num_nodes),
                                                       mesh_dim_names=("replicate", "shard"))  # fmt: skip
            else:
                self._sharding_mesh = self.device_mesh["data_parallel"]
        return self._sharding_mesh

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """``async_save`` (default): the distributed checkpoint is copied aside (to host memory) and written by a
        background thread (``torch.distributed.checkpoint.async_save``), so training is blocked only by the copy;
        :meth:`finish_checkpoint` waits for the write. Otherwise Lightning's synchronous save."""
        if not (self.async_save and self._save_distributed_checkpoint):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.finish_checkpoint()
        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        self._save = dcp.async_save(state, checkpoint_id=path, process_group=self._save_group)
        if self.global_rank == 0:  # the rest of Lightning's checkpoint (loops, callbacks, ...): small, now
            torch.save(checkpoint, path / _METADATA_FILENAME)

    def checkpoint_in_flight(self) -> bool:
        """Whether this rank is still writing an asynchronous checkpoint."""
        return self._save is not None and not self._save.done()

    def finish_checkpoint(self) -> None:
        """Wait until this rank has written its part of the asynchronous checkpoint (raises what the write raised)."""
        if self._save is not None:
            save, self._save = self._save, None
            save.result()

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning enters this around the micro-batches of an accumulation window before the last."""
        setter = {"replicas": "set_requires_all_reduce" if self.hsdp else None, "all": "set_requires_gradient_sync",
                  "none": None}[self.defer_gradient_sync]  # fmt: skip
        roots = [m for m in self.lightning_module.children() if isinstance(m, FSDPModule)]
        if setter is None or not roots:
            yield
            return
        for root in roots:
            getattr(root, setter)(False)
        try:
            yield
        finally:
            for root in roots:
                getattr(root, setter)(True)
