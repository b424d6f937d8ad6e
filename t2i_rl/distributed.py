"""Data-parallel training over the processes that `accelerate launch` (or torchrun) starts.

Each process (a rank) samples an equal share of every epoch with its own seeds. Before each
optimizer step the agents average the gradients over the ranks (`average_gradients`, what DDP
does, after the backward passes and before clipping), and where a statistic spans the batch
(per-prompt advantages, GRPO groups, reward weights, the hacked-fraction threshold, held-out
scores) they gather every rank's rewards first, so each rank computes what one process would on
the whole batch and the weights stay identical on every rank. Only rank 0 writes logs and
checkpoints.

The gradients are averaged explicitly rather than through a DDP-wrapped UNet because the agents
call the UNet several times per backward pass (guidance, the reference model with the adapters
off, chunks of steps, checkpointed steps), which a DDP wrapper does not follow.

With `shard_optimizer=true` (ZeRO stage 1) each rank keeps the AdamW states of about 1/N of the
parameters (`zero_optimizer`): the averaged, clipped gradients are whole on every rank, each rank
steps its shard and broadcasts the updated weights, so the training is the same while the states,
twice the trainable weights in float32, take 1/N of the memory. Checkpoints gather the shards on
rank 0 first (`consolidate_optimizer`); on resume every rank loads the whole state and keeps its shard.

In a one-process run every helper returns its input untouched and communicates nothing, so such
a run computes exactly what it computed before these helpers existed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

# parameters per all-reduce call (64 MiB of float32): few calls for LoRA, bounded memory for a full UNet
BUCKET_NUMEL = 1 << 24


def launched_world_size() -> int:
    """The number of processes the launcher started (its WORLD_SIZE), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launcher() -> None:
    """Refuse launches that shard the model (DeepSpeed ZeRO, FSDP): here every process holds whole
    copies of the weights and `average_gradients` synchronizes them, so such a launch would
    silently train without its sharding."""
    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(flag, "false").lower() == "true":
            raise ValueError(f"{name} launches are not supported: t2i_rl.train averages the gradients of whole "
                             "copies of the trainable weights itself (data parallel); launch with --multi_gpu "
                             "(shard_optimizer=true shards the AdamW states, ZeRO stage 1)")


def init(device: str) -> str:
    """Join the launcher's process group (gloo on the CPU, NCCL on GPUs) when it started several
    processes; return this process's device: `cuda` becomes `cuda:<local rank>`."""
    if launched_world_size() == 1 or dist.is_initialized():
        return device
    from accelerate import PartialState

    wanted = torch.device(device)
    state = PartialState(cpu=wanted.type == "cpu")
    kind = state.distributed_type.name
    if not kind.startswith("MULTI_"):
        raise ValueError(f"t2i_rl.train trains data-parallel over GPU or CPU processes; accelerate launched it as "
                         f"{kind}: launch with --multi_gpu")
    if wanted.type == "cpu":
        return "cpu"
    given = state.device
    if given.type != wanted.type or wanted.index not in (None, given.index):
        raise ValueError(f"device={device} does not match this process's device {given} ({state.num_processes} "
                         f"processes): use device={wanted.type}, each process then takes {wanted.type}:<local rank>")
    return str(given)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes logs, sample grids and checkpoints."""
    return rank() == 0


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """This rank's seed: `seed` itself on rank 0 (so a one-process run is unchanged), an independent
    stream derived from (seed, rank) on the others."""
    r = rank() if rank_ is None else rank_
    return seed if r == 0 else int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def _comm_device() -> torch.device:
    """Where tensors must be for the backend: NCCL talks between GPUs, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(params: list[torch.nn.Parameter], max_numel: int = BUCKET_NUMEL) -> Iterator[list[torch.nn.Parameter]]:
    bucket: list[torch.nn.Parameter] = []
    numel = 0
    for p in params:
        if bucket and numel + p.numel() > max_numel:
            yield bucket
            bucket, numel = [], 0
        bucket.append(p)
        numel += p.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks (in float32), before clipping and the step.

    A parameter that has no gradient on any rank keeps None (AdamW then skips it, as in one
    process); one that has a gradient on some ranks only counts zeros for the others."""
    world = world_size()
    if world == 1:
        return
    params = list(params)
    comm = _comm_device()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(present)
    synced = [p for p, n in zip(params, present.tolist()) if n]
    for bucket in _buckets(synced):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(comm, torch.float32)
                          for p in bucket])
        dist.all_reduce(flat)
        flat /= world
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            g = g.view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def zero_optimizer(params: list[torch.nn.Parameter], optimizer_class: type[torch.optim.Optimizer],
                   **options: Any) -> ZeroRedundancyOptimizer:
    """ZeRO stage 1: `optimizer_class(params, **options)` whose states are split over the ranks, each
    keeping about 1/N of them. `step` updates this rank's shard from the whole (averaged) gradients
    and broadcasts it, so every rank ends each step with the same weights as the unsharded optimizer."""
    return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, **options)


def consolidate_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Gather a sharded optimizer's states on rank 0, whose `state_dict()` then holds them all (for a
    checkpoint). A collective: every rank calls it. Nothing to do for an unsharded optimizer."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on each) concatenated along dim 0, in rank order."""
    world = world_size()
    if world == 1:
        return tensor
    local = tensor.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_objects(obj: Any) -> list[Any]:
    """One picklable object from every rank, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_list(items: list) -> list:
    """Every rank's list concatenated in rank order (the rows of `gather`)."""
    if world_size() == 1:
        return items
    return [x for part in gather_objects(list(items)) for x in part]


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor gathered by `gather` (every rank holds an equal share)."""
    world = world_size()
    if world == 1:
        return tensor
    share = len(tensor) // world
    return tensor[rank() * share:(rank() + 1) * share]


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that report it (identical on every rank)."""
    if world_size() == 1:
        return metrics
    every = gather_objects(metrics)
    keys = dict.fromkeys(k for m in every for k in m)
    out = {}
    for key in keys:
        values = [float(m[key]) for m in every if key in m]
        out[key] = sum(values) / len(values)
    return out


def shutdown() -> None:
    """Leave the process group at the end of a run (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
