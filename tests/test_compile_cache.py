"""Compiled artifacts that travel with a run (dist_resnet/compile_cache.py): the per-user key,
the MAC and environment checks made before anything is unpacked or unpickled, the refusal of a
foreign run's artifact, refreshing, concurrent writers of one store, and (slow) a compiled run
stopped by a signal and resumed warm on an emptied inductor cache directory."""

import io
import json
import multiprocessing
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import parse_error, train_records
from dist_resnet import compile_cache
from dist_resnet.compile_cache import Refused, Store, WarmStart

ENV = compile_cache.environment(torch.device("cpu"))
PARTS = {"widths": [8]}


@pytest.fixture(autouse=True)
def private_places(tmp_path, monkeypatch):
    """A key and an inductor cache directory of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_compile_cache_takes_a_directory(capsys):
    from dist_resnet.train import parse_args

    assert parse_args(["--compile-cache", "shared/cache"]).compile_cache == "shared/cache"
    assert parse_args([]).compile_cache is None
    assert "--compile-cache" in parse_error(["--compile-cache", ""], capsys)


def test_the_key_is_private_made_once_and_refused_when_others_can_read_it(tmp_path):
    key = compile_cache.user_key()
    path = tmp_path / "xdg" / "dist_resnet" / "compile-key"
    assert compile_cache.key_file() == path and len(key) == compile_cache.KEY_BYTES
    assert path.stat().st_mode & 0o777 == 0o600
    assert compile_cache.user_key() == key  # the same key on every use
    path.chmod(0o644)
    with pytest.raises(Refused, match="not a private file"):
        compile_cache.user_key()


def test_an_artifact_is_read_back_only_with_its_key_bytes_and_environment(tmp_path):
    store, key = Store(tmp_path / "store", "test"), compile_cache.user_key()
    assert store.read("entry", key, ENV, PARTS) is None  # nothing there: no refusal
    store.write("entry", key, ENV, PARTS, b"payload")
    assert store.read("entry", key, ENV, PARTS) == b"payload"
    with pytest.raises(Refused, match="MAC does not verify"):
        store.read("entry", os.urandom(compile_cache.KEY_BYTES), ENV, PARTS)  # another user's key
    with pytest.raises(Refused, match="another environment: torch 0.0 .here"):
        Store(tmp_path / "other", "test").write("entry", key, {**ENV, "torch": "0.0"}, PARTS, b"payload")
        Store(tmp_path / "other", "test").read("entry", key, ENV, PARTS)
    (tar,) = (tmp_path / "store").glob("entry.*.tar")
    tar.write_bytes(b"pazload")  # same size, altered
    with pytest.raises(Refused, match="MAC does not verify"):
        store.read("entry", key, ENV, PARTS)
    (tmp_path / "store" / "entry.json").write_text('{"format": 2, "sha256": "../../etc/passwd"}')
    with pytest.raises(Refused, match="not a compile-cache header"):
        store.read("entry", key, ENV, PARTS)


class _Marker:
    """A pickle whose loading creates a file: what a malicious artifact could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_tar(marker: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in ((compile_cache.MEGA, pickle.dumps(_Marker(marker))),
                              (compile_cache.FILES + "fx/evil.py", b"open('x', 'w')")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_a_crafted_artifact_in_a_foreign_run_is_refused_and_nothing_of_it_runs(tmp_path):
    """Another user's run directory holds an artifact under a MAC of their key (a resumed
    checkpoint someone shared): it is refused before any of it is unpacked or unpickled."""
    marker = tmp_path / "marker"
    foreign = Store(tmp_path / "foreign-run" / compile_cache.RUN_DIR, "--resume's run")
    warm = WarmStart([foreign], [], torch.device("cpu"), {"widths": [8]}, writer=True)
    foreign.write(warm.name, os.urandom(compile_cache.KEY_BYTES), ENV, {"widths": [8]}, _crafted_tar(marker))
    warm.load()
    assert len(warm.refusals) == 1 and "MAC does not verify" in warm.refusals[0]
    assert warm.status(0).startswith("cold (") and "MAC" in warm.status(0)
    assert not marker.exists()
    assert not list((tmp_path / "inductor").rglob("evil.py"))
    pickle.loads(pickle.dumps(_Marker(marker)))  # the control: loading it would have run it
    assert marker.exists()


def test_unpack_writes_only_plain_relative_files(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("inductor/ok/a.py", "inductor/../escaped", "inductor//abs"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("inductor/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    target = tmp_path / "cache"
    assert compile_cache.unpack(buffer.getvalue(), target) == (None, 1)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["cache/ok/a.py"]


def test_the_artifact_carries_new_files_and_is_refreshed_only_when_new_ones_appear(tmp_path):
    inductor = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    run_store = Store(tmp_path / "run" / compile_cache.RUN_DIR, "this run")
    first = WarmStart([run_store], [run_store], torch.device("cpu"), {"widths": [8]}, writer=True)
    first.load()
    assert first.status(3) == "cold" and not first.refusals
    (inductor / "ab").mkdir(parents=True)
    (inductor / "ab" / "kernel.so").write_bytes(b"\x7fELF compiled")  # what a compilation adds
    assert first.save() == []
    header = run_store.directory / f"{first.name}.json"
    assert json.loads(header.read_text())["environment"] == ENV

    # A new node: an empty inductor directory, filled from the run's artifact before compiling.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "new-node")
    again = WarmStart([run_store], [run_store], torch.device("cpu"), {"widths": [8]}, writer=True)
    again.load()
    assert (tmp_path / "new-node" / "ab" / "kernel.so").read_bytes() == b"\x7fELF compiled"
    assert again.status(0) == "warm" and again.status(2) == "partial: 2 graph(s) compiled"
    written = header.stat().st_mtime_ns
    assert again.save() == [] and header.stat().st_mtime_ns == written  # nothing new: not rewritten
    (old_tar,) = run_store.directory.glob("*.tar")
    (tmp_path / "new-node" / "cd").mkdir()
    (tmp_path / "new-node" / "cd" / "other.so").write_bytes(b"new graph")
    again.save()
    assert header.stat().st_mtime_ns != written
    assert len(list(run_store.directory.glob("*.tar"))) == 2  # young: perhaps a concurrent writer's
    os.utime(old_tar, (0, 0))
    written = header.stat().st_mtime_ns
    assert again.save() == [] and header.stat().st_mtime_ns == written  # nothing new since the last save
    (tmp_path / "new-node" / "ef").mkdir()
    (tmp_path / "new-node" / "ef" / "third.so").write_bytes(b"third graph")
    again.save()
    assert old_tar not in list(run_store.directory.glob("*.tar"))  # a stale one is removed


def _write_many(directory: str, tag: bytes, count: int) -> None:
    store, key = Store(directory, "shared"), compile_cache.user_key()
    for i in range(count):
        store.write("entry", key, ENV, PARTS, tag * (1000 + i))


def test_two_processes_writing_one_store_at_once_never_leave_a_bad_artifact(tmp_path):
    """Two real processes publish the same entry of one --compile-cache at the same time
    while this one reads it: every read is a whole artifact of one of them (or, while a tar
    is replaced, none), never a refusal."""
    shared = str(tmp_path / "shared")
    compile_cache.user_key()  # made once here: the writers read the same key
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(shared, tag, 200)) for tag in (b"a", b"b")]
    for writer in writers:
        writer.start()
    store, key, seen = Store(shared, "shared"), compile_cache.user_key(), set()
    while any(w.is_alive() for w in writers):
        payload = store.read("entry", key, ENV, PARTS)
        if payload is not None:
            assert set(payload) <= {ord("a")} or set(payload) <= {ord("b")}
            seen.add(payload[:1])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert store.read("entry", key, ENV, PARTS) in (b"a" * 1199, b"b" * 1199)
    assert not list(Path(shared).glob(".*.tmp"))
    assert seen


@pytest.mark.slow
def test_a_compiled_run_resumed_on_an_emptied_inductor_directory_starts_warm(compiled_resumed_run):
    """Slow (two compiling launches, tens of seconds each on a CPU; shared with
    tests/test_equivalence.py): a compiled 2-process run stopped by a signal in its first
    step, then resumed with the node's inductor cache directory emptied, as on a new node. Its
    startup record says warm; each piece wrote one."""
    out = compiled_resumed_run
    cold, warm = ((out.parent / name).read_text() for name in ("cold.log", "warm.log"))
    assert "compile cache: cold" in cold and "stopped by SIGUSR1" in cold, cold[-3000:]
    assert list((out / compile_cache.RUN_DIR).glob("*.json"))
    records = train_records(out, "startup")
    assert [r["compile_cache"] for r in records] == ["cold", "warm"], records
    assert [r["resumed"] for r in records] == [False, True]
    for record in records:
        assert record["to_first_step_s"] >= record["compile_s"] > 0
        assert {"imports_s", "data_s", "setup_s", "first_step_s"} <= record.keys()
        assert 0 < record["phases"]["compile"] <= record["compile_s"], record  # the compiler's share
        assert sum(record["phases"].values()) >= 0.95 * record["to_first_step_s"], record
    assert "compile cache: warm" in warm, warm[-3000:]
    assert (out / "model.safetensors").is_file()
