"""Run files written whole or not at all, and the lock that gives a directory to one live run."""

import json
import os
import subprocess
import sys

import pytest

from dist_resnet import files


def test_write_atomic_replaces_by_rename_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "curves.png"
    files.write_atomic(path, b"first")
    before = path.stat().st_ino
    files.write_atomic(path, "second")  # replaced by rename, not rewritten in place
    assert path.read_text() == "second" and path.stat().st_ino != before
    assert os.listdir(tmp_path) == ["curves.png"]
    assert path.stat().st_mode & 0o044  # readable by others, as a plain file would be


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    (tmp_path / "plot.png").write_text("old")
    (tmp_path / "in_the_way").mkdir()
    with pytest.raises(IsADirectoryError):
        files.write_atomic(tmp_path / "in_the_way", b"new")
    assert sorted(os.listdir(tmp_path)) == ["in_the_way", "plot.png"]  # no temporary file left


def test_a_half_written_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        files.append_line(path, json.dumps({"step": step}))
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "train_lo\xff\n')  # a write cut short, and a byte that is not UTF-8
        f.write(b'{"step": 4, "train_lo')  # what a kill in the middle of a write would leave
    records, skipped = files.read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2] and skipped == 2
    assert files.read_jsonl(tmp_path / "missing.jsonl") == ([], 0)


def test_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from dist_resnet import files; "
        "files.DirectoryLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path), os.getcwd()], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.LockedError, match=f"in use by a live run \\(pid {holder.pid} on "):
            files.DirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = files.DirectoryLock(tmp_path)  # the kernel freed it when its holder died
    lock.acquire()
    lock.release()
