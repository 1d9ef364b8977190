"""Which samples make each process's batches, and where a split is kept while they are read.

make_sampler and shard_batches turn torch's DistributedSampler into one epoch's index tensors
for each rank. Every rank gets as many batches as the others (the sampler pads), so collectives
line up, and batch k of all ranks together is batch k of a single process of the whole batch
size. choose_path decides whether a data set stays resident on the device or is streamed by
worker processes (--data-path auto), from its size and the memory it would live in.
"""

import os

import torch
from torch.utils.data import DistributedSampler

# Automatic choice: a split stays resident while the whole data set takes at most this
# fraction of the memory it would live in (the GPU's, or the host's per process).
RESIDENT_FRACTION = 0.25


def choose_path(requested: str, nbytes: int, device, processes_per_node: int = 1) -> tuple[str, str]:
    """("resident" or "stream", why) for a data set of nbytes uint8 pixels (--data-path)."""
    if requested != "auto":
        return requested, f"--data-path {requested}"
    device = torch.device(device)
    if device.type == "cuda":
        capacity, where = torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    else:
        capacity = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // processes_per_node
        where = "host memory per process"
    fits = nbytes <= RESIDENT_FRACTION * capacity
    return ("resident" if fits else "stream",
            f"{nbytes / 2**20:.0f} MiB of pixels is {'at most' if fits else 'more than'} "
            f"{RESIDENT_FRACTION:.0%} of the {capacity / 2**30:.1f} GiB of {where}")


def make_sampler(num_samples: int, world_size: int, rank: int, shuffle: bool, seed: int = 0):
    """torch's DistributedSampler over sample indices: rank r takes every world_size-th index
    of the (shuffled, padded to a multiple of world_size) order."""
    return DistributedSampler(
        range(num_samples), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )


def shard_batches(sampler: DistributedSampler, batch_size: int, device,
                  drop_last: bool = False) -> tuple[torch.Tensor, ...]:
    """This rank's share of one epoch, as index tensors of at most batch_size on the device
    (exactly batch_size with drop_last, which drops a ragged last batch).

    Every rank gets the same number of batches (the sampler pads), so collectives line up.
    With P processes of batch B/P, batch k of all ranks together is exactly batch k of one
    process of batch B: positions k*B .. (k+1)*B of the same permutation.
    """
    indices = torch.tensor(list(sampler), dtype=torch.long, device=device)
    if drop_last:
        indices = indices[: len(indices) // batch_size * batch_size]
    return indices.split(batch_size)
