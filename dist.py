"""Several processes, one job: what `torchrun` gives each process, and the few collectives that
training and evaluation need.

    torchrun --nproc_per_node 2 retuning.py train --task addition        # 2 processes, this machine
    torchrun --nproc_per_node 8 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 retuning.py train ...

torchrun starts one process per GPU (or per share of the CPU cores) and tells each its RANK, its
LOCAL_RANK on its machine and the WORLD_SIZE. Without those variables this module is one process
of a world of one, and every function here is a no-op, so the single-process path is the same
code. Collectives go over NCCL between GPUs and gloo between CPU processes.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    size: int = 1
    local_rank: int = 0  # among those on this machine: which GPU it drives

    @property
    def main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """Each process drives its own GPU: "cuda" becomes cuda:LOCAL_RANK under torchrun."""
        return f"cuda:{self.local_rank}" if self.size > 1 and device == "cuda" else device

    def share(self, items: list) -> list:
        """This process's part of a list: its block of consecutive items. With as many micro-batches
        per process as processes, each computes exactly the single process's micro-batches, so
        the two differ only in the order the gradients are summed."""
        n = len(items)
        return items[self.rank * n // self.size:(self.rank + 1) * n // self.size]


def init(device: str) -> World:
    """The world torchrun set up (WORLD_SIZE, RANK, LOCAL_RANK), joined once; else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(world.local_rank)
        # a probe or a save on rank 0 keeps the others waiting at their next collective: allow it
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return world


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, world: World):
    """Rank 0's Python object, on every rank (a refusal, a checkpoint read by rank 0 only)."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: World) -> list:
    """Every rank's object, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def total(values: list, world: World) -> list:
    """Element-wise sums over the ranks of a few numbers (float64 on the CPU, any backend)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def run_on_main(fn, world: World):
    """fn() on rank 0 only (a run folder claimed, a checkpoint read), its result or its refusal
    passed to every rank: all raise the same one-line error instead of the others waiting forever."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = (type(e), str(e))
    result, error = broadcast((result, error), world)
    if error:
        raise error[0](error[1])
    return result


def wrap(model, world: World):
    """DDP (PyTorch's DistributedDataParallel) over the trainable weights: each process computes
    its share of a step's gradients, and DDP averages them across processes in buckets (25 MB,
    its default: LoRA r=16 on SmolLM2 is one) while backward still runs. The frozen base is
    listed as ignored, so DDP neither broadcasts it at start (every process loaded the same
    file) nor watches it, and so is RoPE's buffer, a constant, which is then never broadcast. Every trainable
    weight gets a gradient at every step, so find_unused_parameters stays off (it would walk
    the autograd graph after every forward)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + \
        [n for n, _ in model.named_buffers()]
    dev = next(p for p in model.parameters() if p.requires_grad).device
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   gradient_as_bucket_view=True)
