"""Compiled artifacts that travel with a run (docs/compile-cache.md), so that a resumed,
requeued or restarted run, or one of a sweep sharing --compile-cache, does not compile again.

What travels: one artifact per compiled configuration, a tar of (a) the compiler's own
portable cache, torch.compiler.save_cache_artifacts() (the "Mega-Cache" of PyTorch's "Compile
Time Caching in torch.compile": the graphs' FX, AOTAutograd and autotuning entries), and
(b) every file the compilation added to the node's inductor cache directory
(TORCHINDUCTOR_CACHE_DIR). The Mega-Cache alone holds the generated source but, on a CPU, not
the shared libraries built from it: loaded into an empty cache directory, every C++ kernel is
built again (docs/benchmarks.md, "Start-up"). The files alone would miss graphs the node had
compiled before this run began (found, not added). Both together are what a fresh node needs.

They are code: the tar holds pickles and shared libraries that the compiler will load and
run. So an artifact is loaded only when an HMAC-SHA256 under this user's own key (kept outside
every run directory, see key_file) verifies its header and bytes, BEFORE anything in it is
unpacked or deserialized, and only for the same torch, Triton, Python and device kind. A
foreign run's directory (--resume PATH of a run someone else shared), a damaged file or another
software stack is refused in one line; the run then compiles cold. The inductor cache directory
itself is the compiler's, trusted as PyTorch trusts it (private to the user under /tmp).

Stores are directories of per-key files, written by atomic rename: NAME.json (the header:
environment, size, SHA-256 and MAC) and NAME.<sha>.tar (the bytes it vouches for). Runs writing
the same store at once each publish whole files; a reader sees one writer's pair or the
other's, and a pair it finds torn (a replaced tar) reads as absent.
"""

import hashlib
import hmac
import importlib.metadata
import io
import json
import os
import platform
import re
import secrets
import stat
import tarfile
import time
from pathlib import Path

import torch

from dist_resnet import files

RUN_DIR = "compile-cache"  # in a run's output directory (rundir.RUN_FILES names it too)
FORMAT = 2  # 2: the MAC covers the entry's name and the configuration it was compiled for
MEGA = "mega-cache.bin"  # the tar member holding save_cache_artifacts()'s bytes
FILES = "inductor/"  # the tar members under it: files of the inductor cache directory
MAX_ARTIFACT_BYTES = 1 << 30  # a larger file is not read: no compilation of this model comes near it
MAX_HEADER_BYTES = 1 << 16
# An entry's tars older than this, and not the one its header names, are removed when it is
# written: a younger one may be a concurrent writer's, whose header is about to name it.
STALE_S = 60.0
KEY_BYTES = 32


class Refused(Exception):
    """An artifact, store or key that is not used, with why (one line)."""


def key_file() -> Path:
    """The per-user key: $XDG_CACHE_HOME/dist_resnet/compile-key (default ~/.cache), never in
    a run directory, so that a copied or shared run carries no key that would vouch for it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dist_resnet" / "compile-key"


def user_key() -> bytes:
    """This user's key, created (0600, random) on first use. Processes creating it at once
    all end up with the same one: each links a complete file into place, the first wins."""
    path = key_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Whoever may write the key's directory may replace or remove the key, or put a FIFO at
    # its path: the directory must be this user's and closed to others.
    info = os.stat(path.parent)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise Refused(f"the compile-cache key's directory {path.parent} is not this user's alone (mode "
                      f"{stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}): make it yours with "
                      f"`chmod 700 {path.parent}`")
    if not os.path.lexists(path):
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            temp.unlink(missing_ok=True)
    private = (f"the compile-cache key {path} is not a private file of this user (it must be a file of "
               "mode 0600, owned by you): remove it, a new one is made")
    try:
        with files.open_checked(path, 2 * KEY_BYTES, links=False) as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.getuid() or info.st_mode & 0o077:
                raise Refused(private)
            key = file.read(KEY_BYTES + 1)
    except files.NotReadable:
        raise Refused(private) from None
    except OSError as err:
        raise Refused(f"the compile-cache key {path} cannot be read ({err.strerror or err})") from None
    if len(key) != KEY_BYTES:
        raise Refused(f"the compile-cache key {path} is damaged ({len(key)} bytes): remove it, a new one is made")
    return key


def environment(device: torch.device) -> dict:
    """What an artifact is valid for: the software that compiled it and the device kind."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kind = f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    else:
        kind = f"{device.type} {platform.machine()}"
    return {"torch": torch.__version__, "triton": triton, "python": platform.python_version(), "device": kind}


def entry_name(env: dict, parts: dict) -> str:
    """A store's file name for one compiled configuration: the environment and what shapes the
    graphs (parts). Inductor checks its own keys on load; this name only keeps configurations
    sharing a store from replacing each other's artifacts."""
    text = json.dumps({"environment": env, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _plain(parts: dict) -> dict:
    """parts as its JSON form (what a header holds), to compare with a header read back."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def _mac(key: bytes, header: dict, payload: bytes) -> str:
    fields = json.dumps({k: v for k, v in header.items() if k != "mac"}, sort_keys=True).encode()
    return hmac.new(key, fields + b"\n" + payload, hashlib.sha256).hexdigest()


class Store:
    """A directory of artifacts: a run's compile-cache/, or a --compile-cache DIR."""

    def __init__(self, directory: str | Path, label: str):
        self.directory, self.label = Path(directory), label

    def read(self, name: str, key: bytes, env: dict, parts: dict) -> bytes | None:
        """The verified payload of entry `name`; None when there is none; Refused when one is
        there but may not be used. Only JSON is parsed before the MAC has been checked, and
        nothing is read from a file that is not a regular one (files.open_checked)."""
        path = self.directory / f"{name}.json"
        try:
            raw = files.read_checked(path, MAX_HEADER_BYTES, links=False)
        except FileNotFoundError:
            return None
        except files.NotReadable as err:
            raise Refused(f"{path}: {err}") from None
        except OSError as err:
            raise Refused(f"{path}: unreadable ({err.strerror or err})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            header = None
        if not (isinstance(header, dict) and header.get("format") == FORMAT
                and isinstance(header.get("mac"), str) and type(header.get("size")) is int
                and isinstance(header.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", header["sha256"])):
            raise Refused(f"{path}: not a compile-cache header of this version of dist_resnet")
        if not 0 <= header["size"] <= MAX_ARTIFACT_BYTES:
            raise Refused(f"{path}: an artifact of {header['size']} bytes is not read")
        artifact = self.directory / f"{name}.{header['sha256'][:16]}.tar"
        try:
            with files.open_checked(artifact, MAX_ARTIFACT_BYTES, links=False) as file:
                # The header is not yet verified, but the file must be the size it states
                # before a byte of it is read and hashed.
                size = os.fstat(file.fileno()).st_size
                if size != header["size"]:
                    raise Refused(f"{artifact}: {size} bytes, not the {header['size']} its header states")
                payload = file.read(header["size"] + 1)
        except FileNotFoundError:  # replaced by a concurrent writer since its header was read
            return None
        except files.NotReadable as err:
            raise Refused(f"{artifact}: {err}") from None
        except OSError as err:
            raise Refused(f"{artifact}: unreadable ({err.strerror or err})") from None
        if len(payload) != header["size"] or not hmac.compare_digest(_mac(key, header, payload), header["mac"]):
            raise Refused(f"{artifact}: not written by this user's runs, or altered since (its MAC does not verify)")
        if header.get("name") != name or header.get("parts") != _plain(parts):
            raise Refused(f"{artifact}: compiled for another configuration than this run's (entry "
                          f"{str(header.get('name'))[:40]}, here {name})")
        if header.get("environment") != env:
            theirs = header.get("environment") or {}
            differ = ", ".join(f"{k} {theirs.get(k)} (here {v})" for k, v in env.items() if theirs.get(k) != v)
            raise Refused(f"{artifact}: compiled for another environment: {differ}")
        return payload

    def write(self, name: str, key: bytes, env: dict, parts: dict, payload: bytes) -> None:
        """Publish an artifact: the tar under its content's name, then the header that points
        at it (both by atomic rename); then the entry's stale tars are removed (STALE_S). The
        MAC covers the header (the entry's name, its configuration and environment) and the tar."""
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(payload).hexdigest()
        header = {"format": FORMAT, "name": name, "parts": _plain(parts), "environment": env,
                  "size": len(payload), "sha256": digest}
        header["mac"] = _mac(key, header, payload)
        artifact = f"{name}.{digest[:16]}.tar"
        files.write_atomic(self.directory / artifact, payload)
        files.write_atomic(self.directory / f"{name}.json", json.dumps(header, indent=1) + "\n")
        for old in self.directory.glob(f"{name}.*.tar"):
            try:
                if old.name != artifact and time.time() - old.stat().st_mtime > STALE_S:
                    old.unlink()
            except FileNotFoundError:  # a concurrent writer removed it first
                pass


def inductor_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every regular file under directory."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root, name)
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[str(path.relative_to(directory))] = (info.st_size, info.st_mtime_ns)
    return found


def pack(mega: bytes | None, directory: Path, names: list[str]) -> bytes:
    """The artifact: the Mega-Cache bytes and the named files of the inductor cache directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        members = ([(MEGA, mega)] if mega else []) + [(FILES + n, None) for n in sorted(names)]
        for member, content in members:
            if content is None:
                try:
                    content = (directory / member[len(FILES):]).read_bytes()
                except OSError:  # removed meanwhile (a concurrent compilation's temporary file)
                    continue
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def unpack(payload: bytes, directory: Path) -> tuple[bytes | None, int]:
    """Write a verified artifact's files into the inductor cache directory (each atomically,
    keeping a file already there) and return its Mega-Cache bytes, if any, and the number of
    files it held. Only regular files at plain relative paths are taken."""
    mega, count = None, 0
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
        for member in tar.getmembers():
            relative = member.name[len(FILES):]
            parts = Path(relative).parts
            if member.name == MEGA and member.isfile():
                mega = tar.extractfile(member).read()
            elif (member.isfile() and member.name.startswith(FILES) and parts and not Path(relative).is_absolute()
                  and ".." not in parts):
                target = directory / relative
                count += 1
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    files.write_atomic(target, tar.extractfile(member).read())
    return mega, count


def graphs_compiled() -> int:
    """Graphs inductor compiled in this process (cache misses); 0 when all were found."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"])


class WarmStart:
    """One rank's use of the stores around its first compiled step: load() before it,
    save() after it. `parts` says what shapes the compiled graphs (entry_name)."""

    def __init__(self, sources: list[Store], targets: list[Store], device: torch.device, parts: dict,
                 writer: bool):
        self.sources, self.targets, self.writer = sources, targets, writer
        self.env, self.parts = environment(device), parts
        self.name = entry_name(self.env, parts)
        self.loaded_from: list[Store] = []
        self.refusals: list[str] = []
        self.key = self.before = None

    def load(self) -> None:
        """Verify and load what the sources hold for this configuration; note what was refused."""
        try:
            self.key = user_key()
        except (Refused, OSError) as err:
            self.refusals.append(str(err) if isinstance(err, Refused) else
                                 f"the compile-cache key {key_file()} cannot be made ({err.strerror or err})")
            return
        directory = inductor_dir()
        for store in self.sources:
            try:
                payload = store.read(self.name, self.key, self.env, self.parts)
            except Refused as err:
                self.refusals.append(str(err))
                continue
            if payload is None:
                continue
            try:
                mega, count = unpack(payload, directory)
                # The compiler logs a warning and returns None for cache artifacts it cannot
                # read: verified, yet not loaded; the run compiles what it lacks.
                if mega and torch.compiler.load_cache_artifacts(mega) is None:
                    raise ValueError("the compiler did not accept its cache artifacts")
                if not (mega or count):
                    raise ValueError("it holds nothing to load")
            except Exception as err:  # verified, yet unusable: the compiler's own format moved
                self.refusals.append(f"{store.label}: artifact not loaded ({type(err).__name__}: {err})")
                continue
            self.loaded_from.append(store)
        self.before = snapshot(directory)

    def status(self, compiled: int) -> str:
        """compile_cache of the startup record: warm, cold, partial, or why a cache was ignored."""
        refused = f" ({self.refusals[0]})" if self.refusals else ""
        if not self.loaded_from:
            return "cold" + refused
        if compiled:
            return f"partial: {compiled} graph(s) compiled" + refused
        return "warm"

    def save(self) -> list[str]:
        """After the first step: publish the artifact in each target that did not provide it,
        or in all when new graphs were compiled. Returns lines saying what failed."""
        if not self.writer or self.key is None or self.before is None:
            return []
        directory = inductor_dir()
        now = snapshot(directory)
        added = [name for name, seen in now.items() if self.before.get(name) != seen]
        self.before = now  # a later save carries what is new since this one
        due = [t for t in self.targets if added or t.directory not in {s.directory for s in self.loaded_from}]
        if not due:
            return []
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as err:  # the compiler's own: the files still travel
            saved = None
            problems = [f"warning: the compiler's cache artifacts were not saved ({type(err).__name__}: {err})"]
        else:
            problems = []
        payload = pack(saved[0] if saved else None, directory, added)
        if len(payload) > MAX_ARTIFACT_BYTES:
            return [*problems, f"warning: the compiled artifact ({len(payload)} bytes) is too large to keep; not saved"]
        for target in due:
            try:
                target.write(self.name, self.key, self.env, self.parts, payload)
            except OSError as err:
                problems.append(f"warning: cannot save the compiled artifact in {target.directory} "
                                f"({err.strerror or err}); the next run compiles again")
        return problems


def compile_seconds() -> float:
    """Seconds this process spent compiling so far, forward and backward graphs, as torch's
    own compile-time metrics count them (0 where this torch does not keep them)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return sum(sum(compilation_time_metrics.get(name, ())) for name in ("_compile.compile_inner",
                                                                         "backward._backward_impl"))


def process_started() -> float:
    """The time.time() at which this process started: launch to first step counts from it."""
    import psutil  # accelerate's dependency

    return psutil.Process().create_time()
