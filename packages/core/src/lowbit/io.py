"""Safe output directories: exclusive, atomic, and clean after a killed run.

A run that writes ``OUT``:

1. takes ``OUT``'s lock at start (``.OUT.lock`` beside it, held with ``flock`` and naming the owner's
   pid) and holds it until its result is renamed into place. A second run into the same ``OUT``
   fails at once with one line; the kernel drops a killed run's lock, so no lock is ever stale.
2. while holding the lock, removes what runs into ``OUT`` that were killed (SIGKILL, power loss)
   left beside it: ``.OUT.tmp-PID-*`` and ``.OUT.old-PID`` whose process is gone.
3. writes everything into ``.OUT.tmp-PID-*`` and renames that to ``OUT``; with ``overwrite`` the
   old ``OUT`` is first renamed to ``.OUT.old-PID`` and removed once the new one is in place
   (SIGINT/SIGTERM are held back during those two renames). Any failure, Ctrl-C included, removes
   the temporary directory; a failed write (a full disk, an I/O error) becomes one OutputError line.

An ``OUT`` that is a symlink is written through: the result lands at the link's target (the
rules above apply there) and the link itself is left as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LowbitError, OutputError, one_line

#: resolved OUT → [lock file descriptor, nesting depth] for the locks this process holds
_HELD: dict[Path, list[int]] = {}


#: bytes lowbit adds to OUT's name for what it keeps beside it (``.OUT.tmp-PID-XXXXXXXX``, the longest)
NAME_OVERHEAD = len(".") + len(".tmp-") + 7 + len("-") + 8


def check_name(out: Path | str, flag: str = "--out") -> None:
    """Refuse an output path the file system cannot hold, before anything is created: each component
    (with the bytes lowbit adds to OUT's own name for its temporary, lock and work directories) within
    the file system's name limit, and the whole path within its path limit."""
    out = Path(out)
    probe = out.absolute().parent
    while True:  # the nearest existing ancestor says what the file system allows
        try:
            if probe.exists() or probe == probe.parent:
                break
        except OSError:  # a component too long for stat itself
            pass
        probe = probe.parent
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    parts = out.absolute().parts
    for i, part in enumerate(parts):
        limit = name_max - (NAME_OVERHEAD if i == len(parts) - 1 else 0)
        if len(os.fsencode(part)) > limit:
            short = part if len(part) <= 40 else part[:37] + "..."
            raise OutputError(f"{flag} {short}: a name of {len(os.fsencode(part))} bytes, but this file system "
                              f"allows {name_max} per name and lowbit adds up to {NAME_OVERHEAD} to the output's "
                              f"name for its temporary files; pick a shorter {flag}.")
    if len(os.fsencode(str(out.absolute()))) + NAME_OVERHEAD > path_max:
        raise OutputError(f"{flag} is a path of {len(os.fsencode(str(out.absolute())))} bytes; this file system "
                          f"allows {path_max}; pick a shorter {flag}.")


def resolve_out(out: Path | str, flag: str = "--out") -> Path:
    """The absolute directory a run into ``out`` writes: ``out`` itself, or a symlink's target, with
    ``..`` and symlinks in its parents resolved (``a/..`` is written as the directory it names, and its
    lock and temporary directories go beside that, not inside ``a``)."""
    out = Path(out)
    check_name(out, flag)
    if not out.is_symlink():
        return Path(os.path.realpath(out))
    try:
        return out.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise OutputError(f"--out {out} is a symlink that cannot be followed ({err}); pick another --out.") from err


def _existing_ancestor(out: Path) -> Path:
    """The nearest existing ancestor of ``out``'s parent, checked to be a writable directory."""
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {out}: {probe} is a file, not a directory; pick another --out.")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write to {out.parent} (permission denied); pick another --out.")
    return probe


def check_writable(out: Path | str, overwrite: bool = False) -> Path:
    """Fail early (before hours of work) if ``out`` cannot be created."""
    shown, out = Path(out), resolve_out(out)
    if os.path.lexists(out) and not out.is_dir():  # --overwrite replaces directories, never a file or a device
        raise OutputError(f"output {shown} exists and is not a directory; --overwrite only replaces an output "
                          "directory. Pick another --out.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output {shown} already exists and is not empty; pass --overwrite or pick another --out.")
    _existing_ancestor(out)
    return shown


def _stat(path: Path):
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _ancestor_ids(path: Path) -> set[tuple[int, int]]:
    """(device, inode) of each existing proper ancestor of ``path`` once resolved (``a/link/..`` is the
    link target's parent, as the kernel reads it, not ``a``)."""
    return {(st.st_dev, st.st_ino) for st in map(_stat, Path(os.path.realpath(path)).parents) if st is not None}


def _overlap(a: Path, b: Path) -> str | None:
    """How ``a`` relates to ``b``: "is", "is inside", "contains", or None when apart. Paths are
    compared resolved (symlinks followed, ``..`` applied), and existing ones also by device and
    inode (a bind mount, a second spelling the resolution missed)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if ra == rb:
        return "is"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    sa, sb = _stat(a), _stat(b)
    if sa is not None and sb is not None and os.path.samestat(sa, sb):
        return "is"
    if sb is not None and (sb.st_dev, sb.st_ino) in _ancestor_ids(a):
        return "is inside"
    if sa is not None and (sa.st_dev, sa.st_ino) in _ancestor_ids(b):
        return "contains"
    return None


def check_apart(outputs: dict[str, Path | str | None], inputs: dict[str, Path | str | None]) -> None:
    """Refuse an output that overlaps an input or another output: the same file or directory, one
    inside the other, or one containing the other, however spelled (symlinks, ``..``, relative
    paths). Writing there would change or (with ``--overwrite``) delete what the command reads, so it
    is refused with or without ``--overwrite``. Keys name each path for the message (``--out``,
    ``the model``); None values and inputs that do not exist (a hub id) are skipped. Every command
    that writes calls this before any work."""
    outs = [(what, Path(p), resolve_out(p, what)) for what, p in outputs.items() if p is not None]
    ins = [(what, Path(p), Path(p).absolute()) for what, p in inputs.items() if p is not None and _stat(Path(p))]
    others = outs + ins
    for i, (ow, oshown, out) in enumerate(outs):
        for j, (iw, ishown, other) in enumerate(others[i + 1:], i + 1):
            how = _overlap(out, other)
            if how is None:
                continue
            why = ("two outputs of one command may not overlap" if j < len(outs) else
                   "writing it would change or delete what this command reads, with or without --overwrite")
            raise OutputError(f"{ow} {oshown} {how} {iw} {ishown}: {why}; pick an {ow} outside {ishown}.")


def check_file_output(path: Path | str, flag: str) -> None:
    """Fail early if the single file ``path`` (``--dump-awq``) cannot be written: its name too long for
    the file system, an existing entry there that is not a regular file (a directory, a FIFO, a
    device), or a parent that cannot be created."""
    shown, path = Path(path), resolve_out(path, flag)
    if os.path.lexists(path) and not path.is_file():
        raise OutputError(f"{flag} {shown} exists and is not a regular file; give the path of a file to write.")
    _existing_ancestor(path)


def fault_point(name: str) -> None:
    """A place where tests stop a run (``LOWBIT_TEST_PAUSE=name[,name…]``): announce it on stderr
    and wait (up to ``LOWBIT_TEST_PAUSE_SECONDS``, default 60, or until the file named by
    ``LOWBIT_TEST_RESUME`` exists), so that a test can SIGKILL or SIGINT the process exactly there
    or let it go on. A no-op unless that variable names the point."""
    if name not in os.environ.get("LOWBIT_TEST_PAUSE", "").split(","):
        return
    print(f"lowbit-test-pause: {name} {os.getpid()}", file=sys.stderr, flush=True)
    resume = os.environ.get("LOWBIT_TEST_RESUME")
    deadline = time.monotonic() + float(os.environ.get("LOWBIT_TEST_PAUSE_SECONDS", "60"))
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_debris(target: Path) -> None:
    """Remove temporary and old directories that dead runs into ``target`` left (lock held)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:tmp-(\d+)-.+|old-(\d+))")
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _lock_busy_message(shown: Path, lock: Path) -> str:
    try:
        owner = lock.read_text().strip() or "?"
    except OSError:
        owner = "?"
    return (f"another lowbit run (pid {owner}) is writing {shown}; wait for it to finish or pick another --out "
            f"(the lock is {lock}).")


@contextlib.contextmanager
def output_lock(out: Path | str) -> Iterator[Path]:
    """Hold ``out``'s lock (see the module docstring) and yield the directory to write; re-entrant
    within a process. Missing parent directories are created, and removed again if left empty."""
    shown, target = Path(out), resolve_out(out)
    if target in _HELD:
        _HELD[target][1] += 1
        try:
            yield target
        finally:
            _HELD[target][1] -= 1
        return
    probe = _existing_ancestor(target)
    created = [p for p in target.parents if not p.exists() and probe in p.parents]
    lock = target.parent / f".{target.name}.lock"
    fd = -1
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = -1
                raise OutputError(_lock_busy_message(shown, lock)) from None
            try:  # the previous owner may have unlinked the file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _remove_debris(target)
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        if isinstance(err, LowbitError):
            raise
        raise OutputError(f"cannot lock {shown} for writing: {err.strerror or err}; pick another --out.") from err
    _HELD[target] = [fd, 1]
    try:
        yield target
    finally:
        del _HELD[target]
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        for p in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty


def exclusive_output(fn):
    """Decorator: hold the lock of the call's ``out`` argument (when not None) for the whole call,
    so that a long run owns its output directory from the first check to the final rename."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = sig.bind_partial(*args, **kwargs).arguments.get("out")
        if out is None:
            return fn(*args, **kwargs)
        with output_lock(out):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until a rename pair is complete, then act on them as usual. (A signal
    mask would not do: the kernel hands a process signal to any thread that does not block it, and
    torch's threads do not.) Only the main thread can set handlers; elsewhere nothing is deferred."""
    pending: list[int] = []
    old: dict[int, object] = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in pending:
            handler = old.get(s)
            if callable(handler):
                handler(s, None)  # SIGINT: KeyboardInterrupt
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), s)  # the default action (SIGTERM: terminate)


def write_error(shown: Path, err: OSError) -> OutputError:
    """The one-line error of a write into ``shown`` that failed with ``err`` (ENOSPC, EIO, EACCES…)."""
    what = err.strerror or one_line(err)
    where = f" ({Path(err.filename).name})" if err.filename else ""
    return OutputError(f"writing {shown} failed: {what}{where}; nothing was written. Free space or pick another --out.")


def link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a directory holding ``src``'s files (one level) as hard links, copies where the
    file system refuses links: the same bytes appear in the output without a second copy on disk."""
    dst.mkdir()
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            raise OutputError(f"{f} is not a regular file; cannot place it in {dst}.")
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


@contextlib.contextmanager
def atomic_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``out``, on failure it vanishes."""
    shown = Path(out)
    with output_lock(out) as target:
        check_writable(out, overwrite)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
            yield tmp
            fault_point("before-rename")
            old = None
            try:
                with _signals_held():
                    if target.exists():
                        old = target.with_name(f".{target.name}.old-{os.getpid()}")
                        target.rename(old)
                        fault_point("swap")
                    try:
                        tmp.rename(target)
                    except OSError:
                        if old is not None:
                            old.rename(target)
                            old = None
                        raise
                    tmp = None
            finally:  # also when a held-back Ctrl-C arrives right after the renames
                if old is not None and tmp is None:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            if isinstance(err, LowbitError):
                raise
            raise write_error(shown, err) from err
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
