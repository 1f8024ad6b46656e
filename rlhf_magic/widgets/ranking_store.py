"""Append-only JSONL storage for the ranking panel.

Every write is one `os.write` of one line to a file opened with O_APPEND, then fsync: records land at once,
nothing written before is ever truncated or rewritten. A torn last line (a crash mid-write) is left in place and
skipped by the reader; the next record starts on a new line so it is not glued to the torn one. A write that fails
with an error (a full disk, a removed folder) is cut back to where it began, under the lock, so the file is as it
was and the same record can be submitted again. A file the panel could not write is refused when it opens.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError, LabelWriteError
from ..preferences import RETRACTION, Preferences, apply_log, read_jsonl

try:
    import fcntl
except ImportError:  # Windows: single-process appends are still safe
    fcntl = None  # type: ignore[assignment]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def check_path(file: Any) -> Path:
    """The panel's output file: a .jsonl path whose folder exists (it is created on the first submit)."""
    if not isinstance(file, (str, os.PathLike)) or not str(file).strip():
        raise DataError(f"file must be a path such as 'prefs.jsonl', got {file!r}")
    path = Path(file).expanduser()
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"file = {str(file)!r}: rankings are stored as JSON lines; use a .jsonl name")
    if path.is_dir():
        raise DataError(f"file = {str(file)!r} is a folder; give a .jsonl file name")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist; create it first"
        raise DataError(f"file = {str(file)!r}: the folder {str(path.parent)!r} {what}")
    check_writable(path, str(file))
    return path.absolute()


def check_writable(path: Path, given: str) -> None:
    """Refuse a file the panel could not append to before anyone ranks: an existing file is opened for appending
    (nothing is written), else a probe file is created in its folder and removed again."""
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        else:
            probe = path.parent / f".{path.name}.{new_id()}.probe"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
    except OSError as e:
        raise DataError(
            f"file = {given!r}: the panel cannot write there ({reason(e, path)}); choose a file in a folder you can "
            f"write"
        ) from None


def reason(e: OSError, path: Path) -> str:
    """Why a write failed, in words: 'No space left on device', 'the folder '/x' no longer exists', ..."""
    if e.errno == errno.ENOENT and not path.parent.is_dir():
        return f"the folder {str(path.parent)!r} no longer exists"
    return e.strerror or str(e)


class PreferenceStore:
    """The panel's view of one preferences file: read (with retractions applied) and append."""

    def __init__(self, file: Any):
        self.path = check_path(file)
        self._stamp: tuple[int, int] | None = None
        self._active: list[dict] = []
        self._log: list[dict] = []  # every record in file order (replaced and retracted ones too)
        self.refresh(warn=True)  # foreign or broken records: DataError now, before anything is written

    def refresh(self, warn: bool = False) -> list[dict]:
        """Active ranking records (re-read only when the file changed, e.g. another panel appended)."""
        if not self.path.exists():
            self._stamp, self._active, self._log = None, [], []
            return self._active
        try:
            st = self.path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                with warnings.catch_warnings():
                    if not warn:
                        warnings.simplefilter("ignore")  # the torn-line warning was shown when the panel opened
                    log: list[dict] = []
                    self._active = apply_log(read_jsonl(self.path), log)
                self._stamp, self._log = stamp, log
        except OSError as e:
            raise DataError(f"could not read {self.path}: {reason(e, self.path)}") from e
        return self._active

    def preferences(self) -> Preferences:
        return Preferences(self.refresh(), str(self.path), self._log)

    def last_labeler(self) -> str:
        """The name on the newest record a person wrote in this file ('' if none): the panel's labeler, remembered
        per file. Simulated labelers ('sim:...') and the old default 'anonymous' are never taken for a person."""
        self.refresh()
        for rec in reversed(self._log):
            name = rec.get("labeler")
            if isinstance(name, str) and name.strip() and not name.startswith("sim:") and name != "anonymous":
                return name.strip()
        return ""

    def find(self, labeler: str, prompt: str) -> dict | None:
        """This labeler's active record for a prompt (the newest one)."""
        for rec in reversed(self.refresh()):
            if rec.get("labeler") == labeler and rec.get("prompt") == prompt:
                return rec
        return None

    def labelled(self, labeler: str) -> set[str]:
        return {r["prompt"] for r in self.refresh() if r.get("labeler") == labeler}

    def append(self, record: dict) -> dict:
        """Write one record as one line: lock, fix a torn tail, write, flush, fsync. An OSError (a full disk, a
        removed or read-only folder) is a LabelWriteError, and the file is left as it was."""
        import json

        line = json.dumps(record, ensure_ascii=False) + "\n"
        self.refresh()  # never append to a file that has turned foreign since it was opened
        try:
            created = not self.path.exists()
            _append_line(self.path, line)
        except OSError as e:
            raise LabelWriteError(f"could not save to {self.path}: {reason(e, self.path)}; nothing was written") from e
        if created:
            _fsync_dir(self.path.parent)
        self.refresh()
        return record

    def retract(self, record: dict, labeler: str, reason: str) -> dict:
        rec = {"kind": RETRACTION, "id": new_id(), "retracts": record["id"], "labeler": labeler}
        return self.append({**rec, "time": now_iso(), "reason": reason})


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """An exclusive advisory lock, so panels in several processes append whole lines."""
    if fcntl is None:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _append_line(path: Path, line: str) -> None:
    """Append `line` and fsync, under the lock; on an error, cut the file back to where this write began."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with _locked(fd):
            start = os.fstat(fd).st_size
            if _torn_tail(path):
                line = "\n" + line
            data = line.encode("utf-8")
            try:
                written = 0
                while written < len(data):  # a short write (rare, e.g. a full disk) continues the same line
                    n = os.write(fd, data[written:])
                    if n <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += n
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # a half-written (or unsynced) line must not stay behind
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                raise
    finally:
        os.close(fd)


def _torn_tail(path: Path) -> bool:
    """True when the file is non-empty and does not end with a newline (an interrupted write)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
