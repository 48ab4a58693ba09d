"""Writing outputs so that a crash, a full disk or a read-only folder never leaves a half-written one behind.

Everything a command produces is written under a hidden staging name next to its final place (same file system)
and renamed into place when complete; an old output it replaces is moved aside first and removed only after the
new one is in place. Staging names carry the writer's PID, so leftovers of a killed process are recognised and
removed by the next command that writes there. File-system errors a user's machine causes (disk full, read-only,
no permission) become one-line errors that say where and how much space is needed.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlxtune.errors import MlxtuneError, RunFailed, UsageError

# `.NAME.partial-PID` (a copy being written) and `.NAME.old-PID` (an old output moved aside), plus any suffix a
# writer adds to its own temporary files
STAGING = re.compile(r"^\.(?P<name>.+?)\.(?P<kind>partial|old)-(?P<pid>\d+)(?P<suffix>\..*)?$")
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # never through a link planted where our file was
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: Path, data: str | bytes = b"", mode: int = 0o644) -> None:
    """Create `path` with `data`; never opens what is already there. A file mlxtune makes in a run or the library
    is new: a link, a hard link or a file someone planted under its name is an error (FileExistsError), never
    followed or truncated (O_EXCL; O_NOFOLLOW for the systems where O_EXCL alone still follows a final link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a new temporary file beside it, fsynced, renamed over it (a rename replaces
    a link at `path` itself, never what it points to)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a killed write, or something planted: the name is ours
        create_file(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fmt_size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space (for this user) on the file system that holds, or would hold, `path`."""
    return shutil.disk_usage(existing_ancestor(path)).free


class DiskFull(RunFailed):
    """The disk filled up while writing `where`; nothing written so far is lost. Its hint ends with what to do once
    space is free: "run the same command again", or (`then`) the run's `--resume` command when `where` lies in a
    run (`runs.explain_disk_full`: the layout sits above storage)."""

    REMEDY = "free some space (or choose an --out on another disk)"

    def __init__(self, message: str, where: Path):
        super().__init__(message, None)
        self.where = where
        self.then("run the same command again")

    def then(self, next_step: str) -> "DiskFull":
        self.hint = f"{self.REMEDY}, then {next_step}"
        return self


def disk_full_error(where: Path, need: int | None = None) -> DiskFull:
    free = free_bytes(where)
    needs = f"; this step needs about {fmt_size(need)}" if need else ""
    return DiskFull(f"disk full writing {where} ({fmt_size(free)} free on {existing_ancestor(where)}{needs})",
                    Path(where))


def not_writable_error(where: Path, reason: str) -> UsageError:
    return UsageError(f"cannot write {where}: {reason}",
                      "choose an --out in a folder you can write to (or fix its permissions)")


def check_free_space(where: Path, need: int, what: str) -> None:
    """A RunFailed before starting `what` if the file system of `where` has less than `need` bytes free."""
    free = free_bytes(where)
    if need > free:
        raise RunFailed(f"not enough free space for {what} in {existing_ancestor(where)}: needs about "
                        f"{fmt_size(need)}, {fmt_size(free)} free",
                        "free some space or choose an --out on another disk")


def check_writable(path: Path) -> None:
    """A UsageError now (before any model is loaded) if `path`, or the folder it would be made in, can't be written.

    A probe file is created and removed: permission bits say nothing about a read-only mount, or to root."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise not_writable_error(path, "it is a file, not a folder")
    folder = existing_ancestor(path)
    if not folder.is_dir():
        raise not_writable_error(path, f"{folder} is a file, not a folder")
    try:  # a new file of a fresh random name (mkstemp: O_EXCL), so no planted name is ever opened
        fd, probe = tempfile.mkstemp(prefix=".mlxtune-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise not_writable_error(path, exc.strerror or str(exc)) from None


def translate(exc: BaseException, where: Path, need: int | None = None) -> MlxtuneError | None:
    """Our error for a file-system failure the user's machine caused, or None when it is something else.

    MLX reports failed writes as RuntimeError ("[write] Unable to write N bytes"), and numpy (under the gguf writer)
    as an OSError without an errno: the cause is then read from the file system itself (no space left, or not
    writable)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in DISK_FULL:
            return disk_full_error(where, need)
        if exc.errno in NOT_WRITABLE:
            return not_writable_error(where, exc.strerror or str(exc))
        return None
    # numpy's tofile (the gguf writer's) reports a short write as OSError("N requested and M written"), no errno
    short_write = isinstance(exc, OSError) and re.search(r"\d+ requested and \d+ written", str(exc))
    if short_write or isinstance(exc, RuntimeError) and re.search(
            r"\[(write|save|save_safetensors)\b|[Uu]nable to (write|open)", str(exc)):
        if free_bytes(where) < max(need or 0, 1 << 20):
            return disk_full_error(where, need)
        folder = existing_ancestor(where)
        if not os.access(folder, os.W_OK) or _read_only(folder):
            return not_writable_error(where, "read-only or no permission")
    return None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextmanager
def writing(where: Path, need: int | None = None):
    """Turn disk-full / read-only failures inside the block into one-line errors about `where`."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = translate(exc, Path(where), need)
        if error is None:
            raise
        raise error from None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(final: Path, kind: str = "partial") -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def clean_stale(final: Path) -> list[Path]:
    """Remove what killed writers of `final` left (staging copies of dead PIDs); put back an old output that a
    killed swap had moved aside. Returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for item in sorted(final.parent.iterdir()):
        match = STAGING.match(item.name)
        if not match or match["name"] != final.name or pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not match["suffix"] and not (final.exists() or final.is_symlink()):
            os.replace(item, final)  # the swap died between its two renames: the old output is still good
            continue
        _remove(item)
        removed.append(item)
    return removed


def swap_in(staging: Path, final: Path) -> None:
    """Put the finished `staging` at `final`; an existing `final` is moved aside and removed only afterwards."""
    staging, final = Path(staging), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.replace(staging, final)
        return
    old = staging_path(final, "old")
    _remove(old)
    os.replace(final, old)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(old, final)
        raise
    _remove(old)


@contextmanager
def staged(final: Path, overwrite: bool = False, need: int | None = None):
    """Yields a staging path beside `final` to write into (file or directory: the block decides); on success it
    replaces `final` in one rename, on any failure it is removed and `final` is left as it was.

    `final` existing is a UsageError unless `overwrite`; disk-full and read-only failures become our errors."""
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite and not (final.is_dir() and not any(final.iterdir())):
        raise UsageError(f"{final} already exists", "choose another --out or pass --overwrite")
    check_writable(final.parent)
    clean_stale(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(final)
    _remove(staging)
    try:
        with writing(final, need):
            yield staging
            swap_in(staging, final)
    finally:
        _remove(staging)
        for leftover in final.parent.glob(glob.escape(staging.name) + ".*"):  # a writer's own temporary files
            _remove(leftover)


def clean_stale_temp(prefix: str) -> None:
    """Remove `{tempdir}/{prefix}{PID}-*` directories whose process is gone (what killed commands left in /tmp)."""
    for path in Path(tempfile.gettempdir()).glob(f"{glob.escape(prefix)}*"):
        match = re.match(re.escape(prefix) + r"(\d+)-", path.name)
        if match and not pid_alive(int(match[1])):
            _remove(path)


def temp_dir(prefix: str) -> Path:
    """A fresh temporary directory named with this PID, so that `clean_stale_temp` can recognise it later."""
    clean_stale_temp(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


# Environment variables whose values are credentials: never printed, logged or saved by mlxtune.
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY",
                    "MLXTUNE_API_KEY")


def redact(text: str) -> str:
    """`text` with the value of every credential in the environment replaced by ***."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def environment_error(exc: BaseException) -> MlxtuneError | None:
    """Our error for a failure the user's machine caused (disk full, read-only, no permission, out of memory) that
    reached the CLI without one, or None."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and re.search(
            r"\[(metal::)?malloc|[Oo]ut of memory|[Uu]nable to allocate", str(exc))):
        return RunFailed(f"out of memory ({str(exc).splitlines()[0][:120] or 'MemoryError'})",
                         "lower --batch-size or --max-seq-length, or see what fits with `mlxtune plan`")
    if isinstance(exc, OSError):
        where = Path(exc.filename) if getattr(exc, "filename", None) else Path.cwd()
        return translate(exc, where)
    return None
