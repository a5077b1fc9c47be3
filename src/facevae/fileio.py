"""Safe file writes: atomic writes (a file under its final name is always complete), facevae's own directories
(marked), output files that replace only what facevae wrote, and directory locks. Imports nothing heavy."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from facevae.errors import UserError


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file directly in a directory, then the directory itself."""
    for child in path.iterdir():
        fsync_path(child)
    fsync_path(path)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of the new: temp, fsync, rename."""
    path = Path(path)
    fd, tmp = _new_temp(path)  # a file this call created: the only one it may remove
    try:
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


TEMP_INFIX = ".tmp-"  # atomic_write's temporary beside NAME: .NAME.tmp-<pid>-<n>


def _new_temp(path: Path) -> tuple[int, Path]:
    """Create atomic_write's temporary beside `path`, never an existing file or a link (O_EXCL, O_NOFOLLOW): a name
    that is taken, whoever made it, is passed over for the next."""
    for n in range(100):
        tmp = path.with_name(f".{path.name}{TEMP_INFIX}{os.getpid()}-{n}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _own_name(name: str, names: set[str]) -> bool:
    """Whether `name` is one of `names` or atomic_write's temporary of one."""
    temp = name.startswith(".") and TEMP_INFIX in name and name[1:].rsplit(TEMP_INFIX, 1)[0] in names
    return name in names or temp


def remove_own_dir(path: Path, names: set[str]) -> None:
    """Remove a folder facevae wrote: the files it may hold (`names`, and atomic_write's temporaries of them), then
    the folder. A link, a file, or a folder holding anything else is refused (UserError) before anything is removed."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{path} is a link or a file, not a folder facevae wrote; facevae leaves it alone: move it away")
    entries = list(os.scandir(path))
    strangers = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) or not _own_name(e.name, names))
    if strangers:
        raise UserError(f"{path} holds files facevae did not write ({', '.join(strangers[:3])}); facevae leaves it "
                        f"alone: move them away")
    for entry in entries:
        os.unlink(entry.path)  # a link is removed, never what it points to
    path.rmdir()


# ---------------------------------------------------------------- directories and files that are facevae's own
MARKER = ".facevae"  # in every directory facevae made (a run, a cache): JSON {"kind": "run" | "cache"}
LOCK = ".lock"  # in a run being trained or a cache being prepared: who holds it (pid, host, since)
PNG_SOFTWARE = "facevae"  # the PNG tEXt "Software" value of every picture facevae writes
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: one component of a path


def marker_kind(path: str | Path) -> str | None:
    """The kind recorded in a directory's facevae marker ("run", "cache"), or None when it has none."""
    try:
        with open(Path(path) / MARKER, "rb") as f:
            kind = json.loads(f.read(4096)).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_output_dir(path: str | Path, kind: str, *, flag: str = "--out", what: str | None = None,
                     empty_ok: bool = True) -> None:
    """Refuse (one-line UserError) unless `path` is new, an empty folder (unless not `empty_ok`), or a folder
    facevae marked as its `kind`.

    Nothing is written: the caller creates and marks the folder (mark_dir) only once everything else is checked.
    `what` names the folder in the message (default: "--out PATH"). `empty_ok=False` for a folder facevae may
    remove again (a partial cache): a user's empty folder is theirs, too.
    """
    path = Path(path)
    what = what or f"{flag} {path}"
    check_path_text(str(path), flag)
    if path.resolve() == Path(path.resolve().anchor):
        raise UserError(f"{what} is the root of the file system; name a new folder")
    if not path.exists():
        if path.is_symlink():
            raise UserError(f"{what} is a broken link; name a new folder")
        return
    if not path.is_dir():
        raise UserError(f"{what} is a file, not a folder; name a new folder")
    if marker_kind(path) == kind or (empty_ok and not any(os.scandir(path))):
        return
    other = marker_kind(path)
    held = f"a facevae {other}, not a {kind}" if other else ("files facevae did not write" if any(os.scandir(path))
                                                            else "a folder facevae did not make")
    raise UserError(f"{what} already holds {held}; facevae writes only into a new or empty folder or its own "
                    f"{kind}: choose another {flag}")


def mark_dir(path: str | Path, kind: str) -> None:
    """Create `path` (and its parents) and mark it as facevae's `kind` (after check_output_dir said it may)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if marker_kind(path) != kind:
        atomic_write(path / MARKER, json.dumps({"kind": kind, "note": "made by facevae"}) + "\n")


def check_path_text(text: str, what: str) -> None:
    """Refuse a path (or data SPEC) too long for the file system before anything tries to open it."""
    raw = os.fsencode(text)
    if len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        raise UserError(f"{what} is too long for a file name ({len(raw)} bytes; at most {MAX_PATH_BYTES}, and "
                        f"{MAX_NAME_BYTES} per folder or file name)")


def check_output_file(path: str | Path, *, force: bool = False, flag: str = "--out") -> Path:
    """Refuse to replace a file facevae did not write (any file but a PNG it made) unless `force`; refuse folders,
    pipes and devices always. Nothing is written."""
    path = Path(path)
    check_path_text(str(path), flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name such as {path / 'picture.png'}")
    if path.suffix.lower() != ".png":
        raise UserError(f"{flag} {path} does not end in .png; facevae writes PNG pictures")
    if not path.exists():
        return path
    if not stat.S_ISREG(path.stat().st_mode):
        raise UserError(f"{flag} {path} is not a regular file (a pipe or a device?); choose another {flag}")
    if not force and not is_facevae_png(path):
        raise UserError(f"{flag} {path} exists and facevae did not write it; choose another {flag} or add --force "
                        f"to replace it")
    return path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: str | Path) -> bool:
    """Whether a regular file starts with the PNG signature."""
    try:
        with open(path, "rb") as f:
            return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def is_facevae_png(path: str | Path) -> bool:
    """Whether a file is a PNG whose tEXt chunks (before the pixels) say facevae wrote it; reads at most 64 KB."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.startswith(PNG_SIGNATURE):
        return False
    at = 8
    while at + 8 <= len(head):
        length, kind = int.from_bytes(head[at:at + 4], "big"), head[at + 4:at + 8]
        if kind in (b"IDAT", b"IEND"):
            return False
        if kind == b"tEXt" and head[at + 8:at + 8 + length].startswith(b"Software\0" + PNG_SOFTWARE.encode()):
            return True
        at += 12 + length  # length, type, data, CRC
    return False


class DirLock:
    """An exclusive lock on a directory facevae writes (a run being trained, a cache being prepared).

    flock(2) on DIR/.lock: the kernel drops it when its holder dies however it dies (kill -9 included), so a lock
    left by a killed process is free again and taken over (and said so); the file records pid, host and start time
    for the message a second process prints.
    """

    def __init__(self, directory: str | Path, what: str):
        self.path, self.what, self.fd = Path(directory) / LOCK, what, -1

    def __enter__(self) -> "DirLock":
        import fcntl

        try:  # never through a link: a lock file is truncated and written
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(f"{self.path} is not a regular file")
        except OSError as e:
            raise UserError(f"cannot lock {self.what}: {LOCK} is a link or not a regular file ({e}); remove "
                            f"{self.path} if it is not yours") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise UserError(f"{self.what} is in use by {holder}; wait for it to finish or stop it") from None
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            print(f"facevae: took over the lock of {self.what} left by {_holder(previous)}, which is gone",
                  file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)  # an orderly exit leaves an empty (free) lock file
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _holder(data: bytes) -> str:
    """'process PID on HOST since TIME' from a lock file's contents."""
    try:
        info = json.loads(data)
        return f"process {int(info['pid'])} on {str(info['host'])[:100]} since {str(info['since'])[:40]}"
    except (ValueError, KeyError, TypeError):
        return "another process"
