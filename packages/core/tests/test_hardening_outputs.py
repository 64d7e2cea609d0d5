"""Output safety (issue 21): a symlinked --out, what killed runs leave behind, two runs into one
--out, and a failed write (a full disk) — each one clear line, never a half-written output."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from lowbit.cli import main
from lowbit.errors import OutputError
from lowbit.io import atomic_dir, output_lock


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_symlink_out_is_written_through(capsys, ckpt, tmp_path):
    target = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(target)  # dangling: the export creates the target
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "lowbit.json").is_file()
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", link)
    assert code == 2 and "--overwrite" in one_line(err)
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", link, "--overwrite")
    assert code == 0, err
    assert link.is_symlink() and (target / "lowbit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-PID, no lock


def test_symlink_loop_is_one_line(capsys, ckpt, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", tmp_path / "a")
    assert code == 2 and "symlink" in one_line(err)


def test_debris_of_dead_runs_is_cleaned_and_live_ones_kept(capsys, ckpt, tmp_path):
    dead = dead_pid()
    stale_tmp = tmp_path / f".out.tmp-{dead}-abcd1234"
    stale_old = tmp_path / f".out.old-{dead}"
    live_tmp = tmp_path / f".out.tmp-{os.getppid()}-efgh5678"  # a live process (pytest's parent)
    other = tmp_path / f".outer.tmp-{dead}-x"  # another --out's debris: not ours to touch
    for d in (stale_tmp, stale_old, live_tmp, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text(f"{dead}\n")  # the lock file a SIGKILLed run leaves
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live_tmp.name, other.name])


def test_a_second_run_into_a_locked_out_fails_at_once(capsys, ckpt, tiny_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from lowbit.io import output_lock
        with output_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", out)
        assert code == 2 and f"another lowbit run (pid {holder.pid}) is writing" in one_line(err)
        code, _, err = run(capsys, "quantize", tiny_dir, "--out", out, "--no-progress", "--group-size", "32")
        assert code == 2 and "another lowbit run" in one_line(err)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", out)  # the killed holder's lock is gone
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_lock_is_reentrant_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with output_lock(out):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    with pytest.raises(OutputError, match="failed"), atomic_dir(tmp_path / "gone" / "x") as tmp:
        raise OSError(errno.EIO, "Input/output error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # created parents removed again


@pytest.mark.parametrize("where", ["safetensors", "json"])
def test_full_disk_while_writing_is_one_line_and_leaves_nothing(capsys, ckpt, tmp_path, monkeypatch, where):
    """ENOSPC injected at the write call (the real thing on a tiny tmpfs is in tests/integration)."""
    from pathlib import Path

    import lowbit.hf as hf

    if where == "safetensors":  # the shard writer putting a shard's header into its file
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(hf, "_put_header", full)
    else:
        real = Path.write_text

        def full(self, *a, **k):
            if self.name == "lowbit.json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real(self, *a, **k)
        monkeypatch.setattr(Path, "write_text", full)
    code, _, err = run(capsys, "export", ckpt, "--format", "lowbit", "--out", tmp_path / "out")
    assert code == 2 and "No space left on device" in one_line(err) and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []
