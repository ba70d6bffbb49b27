"""onnxformer.runtime.atomic: publishing a folder replaces the old one whole, with or without the
OS's atomic exchange; stale temporaries of dead writers go, a live writer's stay. Stdlib only
(the killed-process tests are tests/reliability/test_atomic_writes.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from onnxformer.runtime import atomic

pytestmark = pytest.mark.runtime_only


def folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path):
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_the_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # a platform without renameat2
    target = folder(tmp_path / "pkg", old="1", stale="x")
    tmp = atomic.staging_dir(target)
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.name.startswith(f".pkg.tmp-{os.getpid()}-") and tmp.stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp / "new").write_text("2")
    atomic.publish_dir(tmp, target)
    assert contents(target) == {"new": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # the old folder is gone too
    fresh = atomic.staging_dir(tmp_path / "other")
    atomic.publish_dir(fresh, tmp_path / "other")  # no previous folder
    assert (tmp_path / "other").is_dir() and not fresh.exists()


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited: its PID is free (reuse within this test is vanishingly unlikely)
    left = [folder(tmp_path / f".pkg.tmp-{pid}-abc"), folder(tmp_path / f".pkg.old-{pid}-def"),
            folder(tmp_path / f".step-000004.tmp-{pid}-ghi")]
    alive = folder(tmp_path / f".pkg.tmp-{os.getpid()}-jkl")  # a live writer's
    other = folder(tmp_path / f".pkgs.tmp-{pid}-mno")  # another target's
    assert set(atomic.remove_stale_temporaries(tmp_path, "pkg")) == set(left[:2])
    assert atomic.remove_stale_temporaries(tmp_path, "step-*") == [left[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_replace_text_is_all_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    atomic.replace_text(target, "step-000002\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError, match="power cut"):
        atomic.replace_text(target, "step-000004\n")
    assert target.read_text() == "step-000002\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_a_killed_writers_text_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    """replace_text's temporary carries the writer's pid like a staging folder, so the
    clean-up of a later writer removes it once that process is gone (and only then)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    left = tmp_path / f".latest.tmp-{dead}-abc123"
    left.write_text("step-000001\n")
    live = tmp_path / f".latest.tmp-{os.getpid()}-def456"
    live.write_text("step-000002\n")
    assert atomic.remove_stale_temporaries(tmp_path, "latest") == [left]
    assert not left.exists() and live.exists()
    atomic.replace_text(tmp_path / "latest", "step-000003\n")
    assert (tmp_path / "latest").read_text() == "step-000003\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latest", live.name])
