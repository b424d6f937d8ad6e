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

Under `accelerate launch --use_deepspeed --zero_stage 1|2` DeepSpeed's ZeRO engine takes over the
gradient averaging, the clipping and the step (`deepspeed_config`, `Agent.use_deepspeed`): stage 2
partitions the gradients as well as the optimizer states, and `offload_optimizer_device cpu` moves
the states and the step to the CPU. Stage 3 (partitioned weights) is refused: sampling, the
reference model and the checkpoints call the whole UNet outside the engine.

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


def launched_rank() -> int:
    """This process's rank as the launcher set it (its RANK), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def deepspeed_launch() -> bool:
    """Whether `accelerate launch --use_deepspeed` started this process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_launcher() -> None:
    """Refuse FSDP launches: FSDP shards the weights, which sampling and the reference model use
    whole outside any wrapper, so such a launch could not train as launched."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError("FSDP launches are not supported: sampling and the reference model call the whole UNet "
                         "outside the FSDP wrapper; launch with --use_deepspeed --zero_stage 2 (gradients and "
                         "optimizer states sharded) or --multi_gpu")


PRECISION_FLAGS = {"fp16": "float16", "bf16": "bfloat16"}  # accelerate's --mixed_precision -> model.dtype


def check_precision(model_dtype: str) -> None:
    """Refuse an `accelerate launch --mixed_precision` that disagrees with model.dtype, which is what
    sets the precision here (the frozen weights in it, what trains in float32), rather than
    silently train in another precision than the launch asked for."""
    flag = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if flag in ("no", "") or PRECISION_FLAGS.get(flag) == model_dtype:
        return
    if flag not in PRECISION_FLAGS:
        raise ValueError(f"accelerate launch --mixed_precision {flag} is not supported: model.dtype sets the "
                         "precision (float32, bfloat16 or float16); launch with --mixed_precision no")
    raise ValueError(f"accelerate launch --mixed_precision {flag} disagrees with model.dtype = {model_dtype}, which "
                     f"sets the precision here: pass model.dtype={PRECISION_FLAGS[flag]} or launch with "
                     "--mixed_precision no")


def deepspeed_config(micro_batch_size: int, max_grad_norm: float) -> dict[str, Any]:
    """The DeepSpeed config of this launch (accelerate's flags or `--deepspeed_config_file`), with the
    values the agents decide filled in: the micro-batch, one micro-step per step as DeepSpeed counts
    (the agents mark their own accumulation boundaries), the clipping norm, and torch's AdamW accepted
    (also on an offloaded optimizer). Raises ValueError on settings this training cannot honour."""
    try:
        from accelerate.utils import DeepSpeedPlugin
        import deepspeed  # noqa: F401  (only to fail here, before any work, when it is missing)
    except ImportError as err:
        raise ValueError(f"--use_deepspeed needs DeepSpeed: pip install deepspeed ({err})") from None
    config = DeepSpeedPlugin().deepspeed_config
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2):
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported: use --zero_stage 1 (optimizer states "
                         "sharded) or 2 (gradients too); stage 3 shards the weights, which sampling and the "
                         "reference model use whole outside the engine")
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled") in (True, "true"):
            raise ValueError(f"DeepSpeed's {key} is not supported: the trainable weights stay in float32 and "
                             f"model.dtype sets the compute precision (autocast); remove {key} from the DeepSpeed "
                             "config or launch with --mixed_precision no")
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None):
        raise ValueError("DeepSpeed's offload_param needs ZeRO stage 3, which is not supported; "
                         "offload_optimizer is (--offload_optimizer_device cpu)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"the DeepSpeed config's {key!r} section is not supported: the agent's AdamW "
                             f"(agent.lr, agent.weight_decay) trains at a constant rate; remove {key!r}")
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ValueError(f"DeepSpeed gradient_accumulation_steps = {accumulation} is invalid: must be 1 or auto "
                         "(each agent accumulates its own micro-batches; agent.train_batch_size sets the step)")
    clipping = config.get("gradient_clipping", "auto")
    if clipping not in ("auto", max_grad_norm):
        raise ValueError(f"DeepSpeed gradient_clipping = {clipping} differs from agent.max_grad_norm = "
                         f"{max_grad_norm}: set one of them (the agent's is used when the launch says auto)")
    world = launched_world_size()
    config.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=1,
                  train_batch_size=micro_batch_size * world, gradient_clipping=float(max_grad_norm),
                  zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False)
    return config


def init(device: str) -> str:
    """Join the launcher's process group (gloo on the CPU, NCCL on GPUs; through DeepSpeed's when it
    launched) when it started several processes; return this process's device: `cuda` becomes
    `cuda:<local rank>`."""
    if launched_world_size() == 1 or dist.is_initialized():
        return device
    from accelerate import PartialState

    wanted = torch.device(device)
    if deepspeed_launch():  # DeepSpeed joins the group itself; on the CPU it needs gloo named
        state = PartialState(backend="gloo" if wanted.type == "cpu" else None)
    else:
        state = PartialState(cpu=wanted.type == "cpu")
    kind = state.distributed_type.name
    if not (kind.startswith("MULTI_") or kind == "DEEPSPEED"):
        raise ValueError(f"t2i_rl.train trains data-parallel over GPU or CPU processes; accelerate launched it as "
                         f"{kind}: launch with --multi_gpu or --use_deepspeed")
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


def gather_to_main(obj: Any) -> list[Any] | None:
    """One picklable object from every rank, in rank order, on rank 0 only (None on the others):
    for what only rank 0 writes, without a copy on every rank. Its tensors travel on the CPU, so
    that rank 0 does not unpickle another rank's GPU tensors onto that rank's GPU."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(_to_cpu(obj), out, dst=0)
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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
