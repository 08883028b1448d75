"""The processes of one job: which rank this is, and what the ranks tell each other.

A launcher (torchrun, or SLURM through RANK and WORLD_SIZE) starts the ranks; each embeds
every WORLD_SIZE-th chunk of the plan (``plan.rank_chunks``). With MASTER_ADDR set, or a
process group the caller started, the ranks share a process group: rank 0's checks of the
output folder, and whether each rank succeeded, reach every rank. Without one, ranks learn
of each other only through the output folder's files.

The launcher's environment variables are read here and nowhere else.
"""

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's processes."""
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine, which share its cores
    created_group: bool = False  # this process started the process group (and ends it)

    @property
    def alone(self):
        return self.world_size == 1

    def finish(self):
        """End the process group if this process started it."""
        if self.created_group:
            torch.distributed.destroy_process_group()


def from_environment():
    """The :class:`Ranks` the launcher's environment describes. With several ranks and
    MASTER_ADDR, a gloo process group is started (for the ranks' messages, which need no
    GPU) unless the caller has started one."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    created = False
    if world_size > 1 and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist
        if dist.is_available() and not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            created = True
    return Ranks(rank, world_size, local, created)


def grouped():
    """Whether the ranks share a process group."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def barrier():
    """Wait for every rank; False (at once) without a process group."""
    if not grouped():
        return False
    torch.distributed.barrier()
    return True


def _collective_device():
    """Where tensors of a collective must be: the current GPU for NCCL (a group the caller
    started), the CPU for gloo (the group :func:`from_environment` starts)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_succeeded(succeeded):
    """``(grouped, all succeeded)``: with a process group, every rank says whether it
    succeeded (a collective, so also a barrier); without one, this rank's own outcome."""
    if not grouped():
        return False, succeeded
    failed = torch.tensor([0 if succeeded else 1], device=_collective_device())
    torch.distributed.all_reduce(failed)
    return True, failed.item() == 0


# Errors rank 0 may raise for the user's inputs: the other ranks raise the same type.
_SHARED_ERRORS = (FileExistsError, FileNotFoundError, ValueError, TimeoutError)


def on_rank_zero(ranks, action):
    """Run ``action`` on rank 0 only. With a process group, every rank learns whether it
    failed and raises the same error, rather than waiting at the next barrier (until the
    group's timeout) for a rank that has stopped."""
    error = None
    if ranks.rank == 0:
        try:
            action()
        except Exception as caught:  # re-raised below, after the other ranks are told
            error = caught
    if grouped():
        outcome = [None if error is None else (type(error).__name__, str(error))]
        torch.distributed.broadcast_object_list(outcome, src=0, device=_collective_device())
        if ranks.rank != 0 and outcome[0] is not None:
            kind, message = outcome[0]
            shared = {cls.__name__: cls for cls in _SHARED_ERRORS}
            raise shared.get(kind, RuntimeError)(f"rank 0 stopped the job: {message}")
    if error is not None:
        raise error
