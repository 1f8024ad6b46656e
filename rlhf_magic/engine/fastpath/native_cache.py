"""The cache folder of the compiled native code (native.py's kernels, cpu_pool.py's allocator), guarded so that
a shared or tampered folder never gets code run in this process.

- The folder (`<cache>/native`, see models.cache_dir) is created 0700 (chmod after creating: mkdir's mode is
  subject to the umask); an existing one of this user's is made 0700. A folder owned by someone else, or one that
  stays writable by group or others, raises `NativeCodeOff` (with one warning per folder), and callers fall back
  to torch: native code never makes a run fail.
- A library is loaded only if it is a regular file owned by this user, not writable by group or others, and its
  SHA-256 matches the one recorded for it in `manifest.json` when this code built it. The manifest is written
  atomically (temp file + os.replace) with mode 0600 and trusted only under the same owner and mode conditions.
- Anything else at a library's predictable path (a planted file, a stale build, an edited one) is rebuilt into a
  temp name and moved over it, never loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_WARNED: set[str] = set()  # folders already reported as unsafe (one warning per folder and process)


class NativeCodeOff(RuntimeError):
    """The cache folder cannot be trusted: no native code is built or loaded from it."""


def folder() -> Path:
    """Where compiled libraries live: the `native` folder of rlhf-magic's cache (RLHF_MAGIC_CACHE moves it)."""
    from ..models import cache_dir

    return cache_dir() / "native"


def library_path(name: str, source: str, command: Sequence[str], libs: Sequence[str] = (), key: str = "") -> Path:
    """The predictable path of a build: keyed by the source, the command, `libs` and `key`."""
    digest = hashlib.sha256((source + " ".join([*command, *libs]) + key).encode()).hexdigest()[:16]
    return folder() / f"{name}-{digest}.so"


def load_library(
    name: str, source: str, command: list[str], suffix: str, libs: Sequence[str] = (), key: str = ""
) -> ctypes.CDLL:
    """Compile `source` with `command` (compiler and flags; then the source, the output and `libs`, which must
    follow the source for linkers that drop unneeded libraries) into the cache folder once, and load it. A cached
    build is loaded only when its owner, mode and SHA-256 check out (see the module docstring); else it is rebuilt.
    Raises NativeCodeOff (unsafe folder), RuntimeError (compiler failed) or OSError."""
    return ctypes.CDLL(str(build_library(name, source, command, suffix, libs, key)))


def build_library(
    name: str, source: str, command: list[str], suffix: str, libs: Sequence[str] = (), key: str = ""
) -> Path:
    """The path of a verified build of `source` (see load_library), compiling it first where needed."""
    where = secure_folder(folder())
    out = library_path(name, source, command, libs, key)
    if verified(out):
        return out
    with _locked(where):  # one process builds; the others then find its verified build
        if verified(out):
            return out
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            src, lib = Path(tmp) / f"{name}.{suffix}", Path(tmp) / f"{name}.so"
            src.write_text(source)
            argv = [*command, str(src), "-o", str(lib), *libs]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()[:200]}")
            os.chmod(lib, 0o700)
            digest = sha256(lib)
            os.replace(lib, out)  # atomic: another process never loads a half-written library
        _record(where, out.name, digest)
    if not verified(out):
        raise RuntimeError(f"{out} changed while it was being built")
    return out


def secure_folder(path: Path) -> Path:
    """`path`, created 0700 where missing; raises NativeCodeOff (after one warning) where it is not private.

    A folder of this user's that others may enter (made by an older version under the umask: 0775 under the
    usual umask 002) is made 0700 first: what others may have put in it is never loaded (every library is checked
    on its own), and once it is private nobody else can change it between the check and the load."""
    try:
        _make_private(path)
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == _uid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)
            st = os.stat(path)  # (a file system that ignores chmod leaves it open: refused below)
        reason = _unsafe(st, folder=True)
    except OSError as err:
        reason = f"unusable ({err.strerror or err})"
    if reason is None:
        return path
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning(
            "rlhf-magic: native code off, using torch: the cache folder %s is %s; set RLHF_MAGIC_CACHE to a "
            "folder only you can write",
            path,
            reason,
        )
    raise NativeCodeOff(f"the cache folder {path} is {reason}")


def _make_private(path: Path) -> None:
    """Create `path` and any missing parent 0700 (mkdir's mode is masked by the umask, hence the chmod)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for part in reversed(missing):
        try:
            part.mkdir(mode=0o700)
        except FileExistsError:  # made by another process meanwhile: the checks that follow judge it
            continue
        os.chmod(part, 0o700)


def verified(path: Path) -> bool:
    """Whether `path` is a library this user built here: a private regular file whose SHA-256 the manifest holds."""
    try:
        if _unsafe(os.lstat(path), folder=False) is not None:
            return False
        want = read_manifest(path.parent).get(path.name)
        return want is not None and want == sha256(path)
    except OSError:
        return False


def read_manifest(where: Path) -> dict[str, str]:
    """The recorded SHA-256 of each library (by file name); empty where the manifest is missing, unreadable or
    could have been written by someone else."""
    path = where / MANIFEST
    try:
        if _unsafe(os.lstat(path), folder=False) is not None:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(where: Path, name: str, digest: str) -> None:
    """Add `name`'s digest to the manifest: written to a 0600 temp file, then moved over the old one."""
    entries = {**read_manifest(where), name: digest}
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=where)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, where / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _unsafe(st: os.stat_result, *, folder: bool) -> str | None:
    """Why a folder or file with this status cannot be trusted, or None."""
    if folder and not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    if not folder and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != _uid():
        return f"owned by uid {st.st_uid}, not by you (uid {_uid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _uid() -> int:
    """This process's user id (tests stand in another owner by replacing this)."""
    return os.getuid()


@contextlib.contextmanager
def _locked(where: Path) -> Iterator[None]:
    """An exclusive lock on the folder's `.lock` file (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(where / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
