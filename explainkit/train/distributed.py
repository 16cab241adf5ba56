"""torchrun support. Without torchrun's environment every method is a cheap no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch


@dataclass
class DistContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def shard(self, perm: torch.Tensor) -> torch.Tensor:
        """This rank's disjoint share of an epoch's permutation (same perm on every rank)."""
        if not self.enabled:
            return perm
        return perm[self.rank :: self.world_size]

    def eval_indices(self, n: int) -> torch.Tensor:
        if not self.enabled:
            return torch.arange(n)
        return torch.arange(self.rank, n, self.world_size)

    def gather_eval(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Reassemble strided eval shards into the original order, without padding rows."""
        if not self.enabled:
            return local
        import torch.distributed as dist

        per_rank = -(-n // self.world_size)
        padded = torch.zeros(per_rank, local.shape[1], device=local.device, dtype=local.dtype)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        out = torch.empty(n, local.shape[1], device=local.device, dtype=local.dtype)
        for r, part in enumerate(parts):
            count = len(range(r, n, self.world_size))
            out[r :: self.world_size] = part[:count]
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank when rank 0's ``flag`` is true."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics, which are what the checkpoint holds.

        DDP broadcasts buffers at the start of each training forward, so after the last step
        each rank still has the statistics of its own last batch.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (small, picklable) on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(
    device_name: str, backend: str | None = None, timeout: timedelta | None = None
) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1).

    Each process uses ``cuda:LOCAL_RANK`` unless ``device_name`` is ``cpu`` or there is no
    CUDA. ``backend`` defaults to nccl on CUDA and gloo on the CPU; analysis passes gloo
    (it exchanges only small Python objects) and a long ``timeout``, because ranks wait
    while rank 0 runs analyzers that cannot be sharded.
    """
    if not launched_by_torchrun():
        return DistContext()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), **options)
    return DistContext(True, dist.get_rank(), dist.get_world_size(), device)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shutdown() -> None:
    """Leave the process group; the barrier first keeps a rank from tearing down gloo's
    connections while another still uses them (which aborts the process at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
