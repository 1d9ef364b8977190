"""Reading files the suite did not just write, with bounds; writing run files so that a
crash, a kill or a full disk never leaves a half-written one; and the lock that gives an
output directory to one live run at a time."""

import errno
import fcntl
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

# ---- reading what someone else may have put there ---------------------------------------------
#
# Every file the suite reads that it did not write itself in this process (options files, run
# records, metrics.jsonl, checkpoints, weights, compile-cache entries, data files, images) is
# opened here, never with a plain open(): a FIFO at such a path would block the open forever,
# /dev/zero would be read until the memory ran out, and a symbolic link in a place of the
# run's own could point anywhere. docs/untrusted-input.md lists the readers and their bounds.


class NotReadable(ValueError):
    """A file that is not read: not a regular file, larger than its bound, or a link where
    none is expected. str() says why, without the path (the caller names the file)."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def open_checked(path: str | Path, max_bytes: int, *, links: bool = True) -> BinaryIO:
    """The file at path, opened for reading in binary (the caller closes it: `with`), once it
    is known to be a regular file of at most max_bytes. links=False refuses a symbolic link as
    the last part of the path (in places that hold the run's own files, or the user's private
    ones). A missing file raises FileNotFoundError, another failure to open OSError, anything
    else NotReadable; nothing has been read by then.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer); the
    checks are made on the opened file itself (fstat), so the file cannot be swapped between
    check and read."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not links:
            raise NotReadable("a symbolic link, where the file itself is expected") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotReadable(f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise NotReadable(f"{info.st_size} bytes, more than the {max_bytes} such a file may have")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_checked(path: str | Path, max_bytes: int, *, links: bool = True) -> bytes:
    """The whole content of a regular file of at most max_bytes (open_checked's rules)."""
    with open_checked(path, max_bytes, links=links) as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew while being read
        raise NotReadable(f"more than the {max_bytes} bytes such a file may have")
    return data


def fd_path(file: BinaryIO) -> str:
    """A path naming the already opened (and checked) file itself, for libraries that only
    take a path (safetensors maps the file): opening it opens the same file, whatever has
    happened at the original path since."""
    return f"/proc/self/fd/{file.fileno()}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{file.fileno()}"


MAX_LOG_BYTES = 2**30  # metrics.jsonl: a run logging every step for a million steps has ~300 MB
MAX_LINE_BYTES = 2**16  # a record of a log has a few hundred bytes


def read_lines(path: str | Path, max_bytes: int = MAX_LOG_BYTES, max_line: int = MAX_LINE_BYTES, *,
               links: bool = True) -> Iterator[bytes]:
    """The lines of a regular file of at most max_bytes, one at a time (a long log is never
    held whole); a line longer than max_line raises NotReadable naming it."""
    with open_checked(path, max_bytes, links=links) as file:
        for number, line in enumerate(iter(lambda: file.readline(max_line), b""), 1):
            if len(line) >= max_line and not line.endswith(b"\n"):
                raise NotReadable(f"line {number} is longer than {max_line} bytes, as no line of it is")
            yield line


# ---- writing ------------------------------------------------------------------------------------

def write_atomic(path: str | Path, content: bytes | str | Iterable[bytes]) -> Path:
    """Write the whole file under a temporary name in the same directory, then rename it over
    `path`: a reader sees the old file or the new one, never part of one. content may be an
    iterable of chunks (a file too large to hold whole)."""
    path = Path(path)
    chunks = [content.encode()] if isinstance(content, str) else [content] if isinstance(content, bytes) else content
    # open(..., "x") rather than mkstemp: mkstemp makes the file private (0600), and the
    # rename would carry that onto a file other users should be able to read.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "xb") as file:
            for chunk in chunks:
                file.write(chunk)
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


def read_jsonl(path: str | Path, max_bytes: int = MAX_LOG_BYTES) -> tuple[list[dict], int]:
    """The records of a JSON-lines file, and how many lines were skipped because they do not
    parse (a line cut short by a crash). A missing file holds no records; one that is not a
    regular file, is larger than max_bytes or has an overlong line raises NotReadable."""
    records, skipped = [], 0
    for _, record in jsonl_records(path, max_bytes):
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


def jsonl_records(path: str | Path, max_bytes: int = MAX_LOG_BYTES) -> Iterator[tuple[bytes, dict | None]]:
    """Each non-blank line of a JSON-lines file with its record, None for a line that is not
    a JSON object (cut short by a crash), read a line at a time (read_lines). A missing file
    has none."""
    try:
        for line in read_lines(path, max_bytes, links=False):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode())
            except (UnicodeDecodeError, ValueError, RecursionError):
                record = None
            yield line, record if isinstance(record, dict) else None
    except FileNotFoundError:
        return


MAX_RECORD_BYTES = 2**24  # a run's config.json has a few KB


def read_record(path: str | Path, version: int) -> dict:
    """A JSON object written with {"format": version}; ValueError names what is wrong with it:
    unreadable, not an object, or of another format (another version of dist_resnet)."""
    try:
        values = json.loads(read_checked(path, MAX_RECORD_BYTES, links=False).decode())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except NotReadable as err:
        raise ValueError(f"{path}: {err}") from None
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
