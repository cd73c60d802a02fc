"""Scale-out with ``torchrun --nproc_per_node N``: each rank takes a contiguous block of the work.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything runs in one process. With it,
a process group is started (``nccl`` on CUDA, ``gloo`` otherwise) and each rank uses
``cuda:<LOCAL_RANK>`` when the config asks for CUDA. torch is imported only when needed, so that
:func:`launch_rank` (the CLI's lock, before any model work) stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, items: Sequence[T]) -> tuple[int, list[T]]:
        """This rank's contiguous block of ``items`` and the index of its first item.

        Blocks in rank order concatenate back to ``items``, so shards written rank by rank give the
        same rows in the same order as one process.
        """
        start = self.rank * len(items) // self.world
        end = (self.rank + 1) * len(items) // self.world
        return start, list(items[start:end])

    def barrier(self) -> None:
        if self.world > 1:
            import torch

            torch.distributed.barrier()

    def device(self, configured: str) -> str:
        import torch

        if self.world > 1 and configured in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return configured


def launch_rank() -> int:
    """This process's torchrun rank, from the environment (0 without torchrun); known before any
    process group exists."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextmanager
def distributed() -> Iterator[Dist]:
    """The torchrun environment as a :class:`Dist`; starts and ends the process group if needed."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    rank, local_rank = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        started = True
    try:
        yield Dist(rank, world, local_rank)
    finally:
        if started:
            torch.distributed.destroy_process_group()
