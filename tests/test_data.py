import gzip
import hashlib
import shutil
import subprocess
import sys

import pytest
import torch

from torchvision.datasets import MNIST

from conftest import TRAIN_PY, describe, run, wait_for
from dist_resnet.batches import make_sampler, shard_batches
from dist_resnet.data import FILES, DataError, ensure_mnist, load_split, raw_dir

ALL_FILES = [name for pair in FILES.values() for name in pair]


@pytest.fixture
def data_copy(mnist_dir, tmp_path):
    shutil.copytree(mnist_dir, tmp_path / "d")
    return tmp_path / "d"


def test_loads_idx_files_as_uint8_tensors(mnist_dir):
    images, labels = load_split(mnist_dir, "train")
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    assert labels.dtype == torch.int64 and len(labels) == len(images) == 2992
    assert set(labels.tolist()) == set(range(10))
    assert load_split(mnist_dir, "test", limit=50)[0].shape == (50, 1, 28, 28)


def test_missing_files_without_download_name_directory_and_files(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_path, download=False)
    message = str(err.value)
    assert str(raw_dir(tmp_path)) in message and "--no-download" in message
    assert all(name in message for name in ALL_FILES)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    # A mirror that refuses every connection, whatever network this machine has.
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match=r"could not download MNIST into .* Copy the four files .*\*-ubyte\.gz"):
        ensure_mnist(tmp_path / "new" / "data", download=True)
    # The directory the message asks the files to be copied into is made, and left empty.
    root = tmp_path / "new" / "data" / "MNIST" / "raw"
    assert root.is_dir() and not list(root.iterdir())
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="could not download MNIST"):
        ensure_mnist(tmp_path, download=True)
    assert [p.name for p in (tmp_path / "MNIST" / "raw").iterdir()] == ["notes.txt"]  # what was there stays


def test_a_raw_file_that_disagrees_with_its_gz_is_reported(data_copy):
    """What a decompression cut short left behind (before decompression went through a
    temporary file): a truncated raw file beside the good .gz."""
    raw = raw_dir(data_copy)
    name = "train-images-idx3-ubyte"
    content = (raw / name).read_bytes()
    with gzip.open(raw / f"{name}.gz", "wb") as f:
        f.write(content)
    (raw / name).write_bytes(content[: len(content) // 3])
    with pytest.raises(DataError, match=f"{name} .* disagrees with .*{name}.gz .* delete the one that is damaged"):
        ensure_mnist(data_copy, download=False)
    (raw / name).unlink()  # as the message says
    ensure_mnist(data_copy, download=False)
    assert (raw / name).read_bytes() == content


def test_a_decompression_bomb_is_refused_and_leaves_nothing(data_copy):
    raw = raw_dir(data_copy)
    name = "t10k-images-idx3-ubyte"
    (raw / name).unlink()
    with gzip.open(raw / f"{name}.gz", "wb") as f:
        for _ in range(80):
            f.write(bytes(1 << 20))  # 80 MiB of zeros: 80 KB packed
    with pytest.raises(DataError, match="unpacks to more than 64 MiB"):
        ensure_mnist(data_copy, download=False)
    assert sorted(p.name for p in raw.iterdir() if name in p.name) == [f"{name}.gz"]  # no partial file


def test_a_killed_decompression_leaves_no_partial_file(data_copy):
    """SIGKILL in the middle of unpacking: the raw file is never half there, and the next
    start unpacks it whole."""
    raw = raw_dir(data_copy)
    name = "train-images-idx3-ubyte"
    content = (raw / name).read_bytes() * 6  # 14 MB: long enough to be caught in the middle
    (raw / name).unlink()
    with gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as f:
        f.write(content)
    unpacker = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, gzip; from dist_resnet import data\n"
        "class Slow(gzip.GzipFile):\n"
        "    def read(self, n=-1):\n        time.sleep(0.2); return super().read(n)\n"
        "data.gzip.open = lambda file, mode: Slow(fileobj=file, mode=mode)\n"
        "data.ensure_mnist(sys.argv[1], download=False)"), str(data_copy)])
    wait_for(lambda: list(raw.glob(f".{name}.*.tmp")), timeout=60, what="the decompression to start")
    unpacker.kill()
    unpacker.wait()
    assert not (raw / name).exists()
    ensure_mnist(data_copy, download=False)
    assert (raw / name).read_bytes() == content


def test_gzipped_files_are_decompressed_in_place(data_copy):
    raw = raw_dir(data_copy)
    original = (raw / ALL_FILES[0]).read_bytes()
    with gzip.open(raw / f"{ALL_FILES[0]}.gz", "wb") as f:
        f.write(original)
    (raw / ALL_FILES[0]).unlink()
    ensure_mnist(data_copy, download=False)
    assert (raw / ALL_FILES[0]).read_bytes() == original


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_names_the_file(data_copy, damage):
    path = raw_dir(data_copy) / "t10k-images-idx3-ubyte"
    content = path.read_bytes()
    path.write_bytes({"truncate": content[: len(content) // 2], "garbage": b"\x00\x01not idx" * 10,
                      "empty": b""}[damage])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: not a readable MNIST IDX file"):
        load_split(data_copy, "test")


def test_an_idx_header_claiming_a_huge_shape_is_refused_before_any_allocation(data_copy):
    path = raw_dir(data_copy) / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3 + b"\0" * 100)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: not a readable MNIST IDX file .*size is not"):
        load_split(data_copy, "test")


def test_image_and_label_counts_must_agree(data_copy):
    raw = raw_dir(data_copy)
    shutil.copy(raw / "train-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="301 images but .* holds 2992 labels"):
        load_split(data_copy, "test")


def test_cli_missing_data_exits_2_with_one_clear_message(tmp_path):
    result = run([sys.executable, TRAIN_PY, "--data-dir", tmp_path, "--no-download",
                  "--report-to", "none", "--output-dir", tmp_path / "out"], timeout=120)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("error: MNIST not found in") == 1 and "*-ubyte.gz" in result.stderr
    assert all(name in result.stderr for name in ALL_FILES)


def test_cli_corrupt_data_exits_2_naming_the_file(data_copy, tmp_path):
    (raw_dir(data_copy) / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    result = run([sys.executable, TRAIN_PY, "--data-dir", data_copy, "--report-to", "none",
                  "--output-dir", tmp_path / "out"], timeout=120)
    assert result.returncode == 2, describe(result)
    assert "train-labels-idx1-ubyte: not a readable MNIST IDX file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("num_samples, world_size", [(100, 1), (100, 3), (1000, 4), (7, 8)])
def test_shards_are_disjoint_and_complete(num_samples, world_size):
    shards = [list(make_sampler(num_samples, world_size, rank, shuffle=True, seed=3))
              for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # equal shares, so collectives line up
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(num_samples))
    padding = len(flat) - num_samples
    assert 0 <= padding < world_size
    if padding == 0:
        assert len(set(flat)) == len(flat)  # disjoint


def test_shuffle_changes_each_epoch_and_agrees_across_ranks():
    orders = []
    for epoch in range(3):
        samplers = [make_sampler(64, 2, rank, shuffle=True, seed=0) for rank in range(2)]
        for s in samplers:
            s.set_epoch(epoch)
        orders.append([list(s) for s in samplers])
    assert orders[0] != orders[1] != orders[2]
    for epoch_order in orders:  # every rank drew from the same permutation
        assert sorted(epoch_order[0] + epoch_order[1]) == list(range(64))


@pytest.mark.parametrize("num_samples, batch", [(96, 16), (100, 16), (100, 12)])
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_batches_together_are_the_single_process_batch(world_size, num_samples, batch):
    """N processes x B/N see, step by step, exactly the samples 1 process x B sees: also in
    an epoch that ends in a ragged batch (100 images are 6 batches of 16 and one of 4)."""
    single = make_sampler(num_samples, 1, 0, shuffle=True, seed=5)
    single.set_epoch(2)
    single_batches = shard_batches(single, batch, "cpu")
    per_rank = []
    for rank in range(world_size):
        sampler = make_sampler(num_samples, world_size, rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        per_rank.append(shard_batches(sampler, batch // world_size, "cpu"))
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(single_batches)
    for step, expected in enumerate(single_batches):
        together = torch.cat([batches[step] for batches in per_rank])
        assert sorted(together.tolist()) == sorted(expected.tolist())


@pytest.mark.slow  # four processes at once, each importing torch
def test_processes_sharing_one_data_directory_never_read_a_half_written_file(mnist_dir, tmp_path):
    """Four processes (as the nodes of a job sharing ./data would) unpack the same .gz files at
    once and read them: each gets the whole data set."""
    shared = tmp_path / "shared"
    raw = raw_dir(shared)
    raw.mkdir(parents=True)
    for name in ALL_FILES:
        with gzip.open(raw / f"{name}.gz", "wb", compresslevel=1) as f:
            f.write((raw_dir(mnist_dir) / name).read_bytes())
    script = ("import sys, hashlib; from dist_resnet import data; data.ensure_mnist(sys.argv[1], download=False); "
              "images, labels = data.load_split(sys.argv[1], 'train'); "
              "print(hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest())")
    readers = [subprocess.Popen([sys.executable, "-c", script, str(shared)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [reader.communicate(timeout=120) for reader in readers]
    assert all(reader.returncode == 0 for reader in readers), outputs
    images, labels = load_split(mnist_dir, "train")
    expected = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    assert {out.strip() for out, _ in outputs} == {expected}


def test_each_epoch_of_a_run_trains_in_the_samplers_order_of_that_epoch(mnist_dir, tmp_path, monkeypatch):
    """What train.py feeds the step (Recipe.batches, then the split's batches): epoch e's
    training indices are DistributedSampler's order for epoch e (torch.randperm seeded with
    seed + e, its definition), a new order each epoch."""
    from conftest import train_here
    from dist_resnet import data

    train_size, batch, seed = 192, 64, 3
    fed = []
    original = data.Resident.batches

    def recording(self, index_batches):
        index_batches = list(index_batches)
        if len(self) == train_size:  # the training split (the test split has 64 images)
            fed.extend(index.tolist() for index in index_batches)
        return original(self, index_batches)

    monkeypatch.setattr(data.Resident, "batches", recording)
    result = train_here(["--data-dir", mnist_dir, "--widths", "4,4,4", "--batch-size", batch, "--train-limit",
                         train_size, "--test-limit", 64, "--epochs", 2, "--seed", seed, "--no-download",
                         "--report-to", "none", "--output-dir", tmp_path / "out"], threads=1)
    assert result.returncode == 0, describe(result)
    orders = [torch.randperm(train_size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
              for epoch in range(2)]
    assert orders[0] != orders[1]
    assert [i for index in fed for i in index] == orders[0] + orders[1]
    assert [len(index) for index in fed] == [batch] * 6
