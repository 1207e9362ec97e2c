"""Folder swaps survive a kill at any point: the target is always a complete version, never absent once
written, and recovery leaves no temporary sibling behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ricefm import atomic
from ricefm.atomic import recover_dir, staged_dir

from conftest import REPO


def write_version(target: Path, version: int, files: int = 20) -> None:
    with staged_dir(target) as folder:
        for i in range(files):
            (folder / f"part{i:02d}").write_text(f"{version}\n" * 200)


def assert_complete(target: Path) -> int:
    versions = {p.read_text().split()[0] for p in target.iterdir()}
    assert len(list(target.iterdir())) == 20 and len(versions) == 1, (target, versions)
    return int(versions.pop())


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_replaces_and_a_failed_block_changes_nothing(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)  # the fallback other systems take
    target = tmp_path / "ckpt"
    write_version(target, 1)
    write_version(target, 2)
    assert assert_complete(target) == 2
    with pytest.raises(RuntimeError):
        with staged_dir(target) as folder:
            (folder / "part00").write_text("3\n")
            raise RuntimeError("writer failed")
    assert assert_complete(target) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recovery_from_every_interrupted_state(tmp_path):
    target, tmp, old = tmp_path / "t", tmp_path / ".t.tmp", tmp_path / ".t.old"

    def make(path, version):
        path.mkdir()
        for i in range(20):
            (path / f"part{i:02d}").write_text(f"{version}\n")

    make(old, 1), make(tmp, 2)  # two renames, killed between them: the new folder is complete
    recover_dir(target)
    assert assert_complete(target) == 2 and not tmp.exists() and not old.exists()
    (tmp).mkdir(), (tmp / "part00").write_text("3\n")  # killed while writing the next one: it goes
    recover_dir(target)
    assert assert_complete(target) == 2 and not tmp.exists()
    make(old, 1)  # killed while deleting the previous folder after the swap
    recover_dir(target)
    assert assert_complete(target) == 2 and not old.exists()


def exchange_supported(where: Path) -> bool:
    (where / "a").mkdir(parents=True)
    (where / "b").mkdir()
    try:
        return atomic._exchange(where / "a", where / "b")
    finally:
        import shutil
        shutil.rmtree(where)


def test_kill_9_at_random_points_never_leaves_a_broken_or_missing_folder(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from test_atomic import write_version; from pathlib import Path; "
            "t = Path(sys.argv[1]); write_version(t, 0); print('ready', flush=True)\n"
            "for v in range(1, 100000): write_version(t, v)")
    target = tmp_path / "ckpt"
    seen = []
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", code, str(target), str(REPO / "tests")], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.02 + 0.013 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if exchange_supported(tmp_path / "probe"):
            assert target.is_dir()  # never absent (the atomic exchange), even before recovery
        recover_dir(target)
        seen.append(assert_complete(target))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert max(seen) > 0  # the kills landed while versions were being written


def test_atomic_file_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "data.h5ad"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target, ".h5ad") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".h5ad" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5ad"]
    with atomic.atomic_file(target, ".h5ad") as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the block ends
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5ad"]
