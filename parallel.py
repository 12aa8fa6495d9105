"""Several processes: `torchrun --nproc_per_node N <script>.py ...` trains data-parallel with FSDP.

Every rank runs the whole script; each takes its share of every optimizer step's micro-batches and of every
scoring pass; rank 0 alone writes files and prints. A plain `python <script>.py` never starts
torch.distributed, and then every function here leaves things as they are (one rank, all the micro-batches,
gradient scale 1). Nothing here runs at import time.
"""
import atexit
import os
import sys

import torch
import torch.distributed as dist

def init_distributed():
    """Under torchrun (which sets LOCAL_RANK, RANK, WORLD_SIZE): join the process group, NCCL with one GPU
    per rank, gloo on CPU. The other ranks' stdout goes to /dev/null (their errors still reach stderr)."""
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(dist.destroy_process_group)  # left to the interpreter's exit, gloo sometimes aborts a rank
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(model, cpu_offload=False):
    """FSDP (fully_shard) over all ranks: each transformer block (the model's _no_split_modules) is a unit whose
    parameters are gathered for its forward and backward and freed after; the rest (embeddings, final norm,
    heads) is the root unit. Gradients are reduce-scattered, and each rank keeps 1/N of the parameters,
    gradients and AdamW state. On CUDA the blocks compute in bf16 from fp32 master weights and reduce
    gradients in fp32 (FSDP's mixed precision); the root stays fp32 (its heads compute in fp32 anyway).
    cpu_offload: parameters, gradients and optimizer state live in CPU memory between uses.
    One process: the model is returned as it is."""
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=mixed, offload_policy=offload)
    # the root too is resharded after its forward: FSDP would otherwise keep it gathered for the backward, and
    # after a forward under no_grad (scoring, DPO's reference log-probs) the next backward misses its gradients
    return fully_shard(model, reshard_after_forward=True, offload_policy=offload)


def rank_share(micro_batches):
    """This rank's micro-batches of one optimizer step (or chunks of one scoring pass), as (items, grad_scale).
    FSDP gathers parameters inside every forward, so every rank must run the same number of forwards: a rank
    with one fewer repeats the first micro-batch with grad_scale 0 (it counts for nothing). A real micro-batch
    has grad_scale N (the number of ranks): FSDP averages the ranks' gradients, and N turns that mean back into the sum
    over the whole step, so the loss normalised "per pair of the whole step" gives the one-process gradient."""
    n = world_size()
    mine = micro_batches[rank()::n]
    per_rank = -(-len(micro_batches) // n)
    return [(mb, float(n)) for mb in mine] + [(micro_batches[0], 0.0)] * (per_rank - len(mine))


def sum_over_ranks(tensor):
    """The tensor summed over all ranks, in place (one process: unchanged)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_lists(items):
    """Every rank's list of picklable items, concatenated, on every rank (one process: the list)."""
    if not dist.is_initialized():
        return items
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def from_rank0(obj):
    """Rank 0's obj, on every rank; also a meeting point: no rank passes until rank 0 got here."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()
