"""--augment: each training image's transform is drawn from its own key (seed, epoch, its index
in the training set), so every image of a global batch gets its own transform on every rank,
and any process count draws bitwise the same transforms; streaming workers are seeded by rank
and worker. In process: the ranks of a 2-process run are Recipes told they are rank 0 and 1."""

import pytest
import torch

from dist_resnet import data, transforms
from dist_resnet.recipe import Recipe
from dist_resnet.train import parse_args

BATCH = 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class AsRank:
    """The in-process Accelerator, saying it is rank `rank` of `world_size`: Recipe then takes
    that rank's sampler shard and per-process batch (its collectives, of one process, are
    never the point here)."""

    def __init__(self, accelerator, rank: int, world_size: int):
        self._accelerator, self.process_index, self.num_processes = accelerator, rank, world_size

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def first_inputs(accelerator, split, rank: int, world_size: int, epoch: int = 0, *options):
    """(the sample indices of this rank's first batch of `epoch`, the images its model received
    for them: augmented and normalised)."""
    config = parse_args(["--widths", "4,4,4", "--batch-size", str(BATCH), "--epochs", "2", "--seed", "11",
                         "--report-to", "none", *options])
    source = data.Resident(split, "cpu")
    recipe = Recipe(config, AsRank(accelerator, rank, world_size), source)
    assert recipe.train is source  # the step takes each sample's index with its batch, not from a wrapper
    seen = []
    recipe.net.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    index = recipe.batches(epoch)[0]
    recipe.step(index)
    return index, torch.cat(seen)


@pytest.fixture(scope="module")
def train_split(mnist_dir):
    return data.ArraySplit(*data.load_split(mnist_dir, "train", 256), transforms.MNIST_SPEC)


def test_every_image_of_a_global_batch_gets_its_own_transform_on_every_rank(accelerator, train_split):
    """The same picture at every index: what the model receives then differs only by the
    transform. Image i of rank 0's share and image i of rank 1's were once transformed alike
    (every rank's generator is seeded alike); now all 64 images of the global batch differ."""
    same = data.ArraySplit(train_split.images[:1].expand(256, -1, -1, -1).clone(), train_split.labels, transforms.MNIST_SPEC)
    shares = [first_inputs(accelerator, same, rank, 2, 0, "--augment")[1] for rank in range(2)]
    assert all(not torch.equal(a, b) for a, b in zip(*shares))
    batch = torch.cat(shares).flatten(1)
    assert len(torch.unique(batch, dim=0)) == BATCH
    plain = [first_inputs(accelerator, same, rank, 2)[1] for rank in range(2)]
    assert torch.equal(plain[0], plain[1])  # without --augment the picture reaches the model as it is


def test_one_and_two_processes_draw_bitwise_the_same_transforms(accelerator, train_split):
    """Each sample of the first global batch reaches the model bitwise alike whether one
    process or two train it (whatever rank reads it, wherever in its share), and its
    transform changes with the epoch."""
    index, whole = first_inputs(accelerator, train_split, 0, 1, 0, "--augment")
    shares = [first_inputs(accelerator, train_split, rank, 2, 0, "--augment") for rank in range(2)]
    by_sample = {int(i): image for share_index, share in shares for i, image in zip(share_index, share)}
    assert sorted(by_sample) == sorted(index.tolist())
    assert all(torch.equal(image, by_sample[int(i)]) for i, image in zip(index, whole))
    later_index, later = first_inputs(accelerator, train_split, 0, 1, 1, "--augment")
    sample = int(index[0])
    position = later_index.tolist().index(sample) if sample in later_index.tolist() else None
    keys = [transforms.sample_keys(11, epoch, torch.tensor([sample])) for epoch in (0, 1)]
    assert not torch.equal(*keys)  # the epoch changes the key...
    if position is not None:  # ...and so the transform
        assert not torch.equal(later[position], whole[0])


class Seeds(torch.utils.data.Dataset):
    """A split whose every image is the seed of the worker process that read it."""

    spec = transforms.MNIST_SPEC

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import numpy as np
        return torch.tensor([torch.initial_seed(), int(np.random.get_state()[1][0])]), i


def test_streaming_workers_are_seeded_by_rank_and_worker(monkeypatch):
    """Every worker of every rank starts from its own seed (torch's and numpy's), each rank's
    the same from epoch to epoch: a worker that drew random numbers would draw its own."""
    seeds = {}
    for rank in range(2):
        monkeypatch.setattr(data, "process_rank", lambda rank=rank: rank)
        streamed = data.Streamed(Seeds(), "cpu", workers=2)
        for epoch in range(2):
            got = torch.cat([images for images, _ in streamed.batches(torch.arange(8).split(1))])
            seeds.setdefault(rank, set()).update(map(tuple, got.tolist()))
    assert all(len(s) == 2 for s in seeds.values())  # two workers a rank, each the same each epoch
    assert len(seeds[0] | seeds[1]) == 4 and len({s[0] for s in seeds[0] | seeds[1]}) == 4
