"""Writing run files so that a crash, a kill or a full disk never leaves a half-written one,
and the lock that gives an output directory to one live run at a time."""

import fcntl
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path


def write_atomic(path: str | Path, content: bytes | str) -> Path:
    """Write the whole file under a temporary name in the same directory, then rename it over
    `path`: a reader sees the old file or the new one, never part of one."""
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    # open(..., "x") rather than mkstemp: mkstemp makes the file private (0600), and the
    # rename would carry that onto a file other users should be able to read.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write to a file opened for appending: a kill lands
    before or after it. A disk that fills mid-write can still cut it short; read_jsonl
    ignores such a last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file, and how many lines were skipped because they do not
    parse (a line cut short by a crash). A missing file holds no records."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError:
        return [], 0
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


MAX_RECORD_BYTES = 2**24  # a run's config.json has a few KB


def read_record(path: str | Path, version: int) -> dict:
    """A JSON object written with {"format": version}; ValueError names what is wrong with it:
    unreadable, not an object, or of another format (another version of dist_resnet)."""
    if not Path(path).is_file():  # a FIFO would block; a missing file says so below
        raise ValueError(f"{path}: missing, or not a regular file")
    if Path(path).stat().st_size > MAX_RECORD_BYTES:
        raise ValueError(f"{path}: {Path(path).stat().st_size} bytes, more than a record has")
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    found = values.get("format") if isinstance(values, dict) else None
    if found != version:
        raise ValueError(f"{path}: not written by this version of dist_resnet (format {found}, "
                         f"this version reads {version})")
    return values


def sync_dir(path: str | Path) -> None:
    """Make a directory's entries durable before a rename that publishes them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LockedError(Exception):
    """The lock is held by another live process; the message says which."""


class NotALockFile(Exception):
    """The lock's path is a link or something else than a file of its own."""


class DirectoryLock:
    """An exclusive lock on DIR/.lock, held while this process lives.

    flock() locks belong to the open file: the kernel releases them when the process ends,
    however it ends, so a lock left by a killed run is free again without anyone cleaning up.
    The file also records who holds it, for the message a second run gets."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        try:  # never through a link: the holder's details are written into the file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            if os.path.islink(self.path):
                raise NotALockFile(f"{self.path} is a symbolic link, not a lock file: remove it") from None
            raise
        if os.fstat(fd).st_nlink != 1 or not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotALockFile(f"{self.path} is linked to another file or is not a regular file: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by a live run ({holder})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock
            self.fd = None
