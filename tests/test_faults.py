"""Fault injection: damaged, missing and racing files, bad settings and kills, each as a user meets them.

Every case checks what the user sees (one line, the exit code) and what is preserved (nothing half
written, nothing created, the data or weights intact). The README's fault table lists the same cases.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from converters.formats import convert, load_checkpoint
from ricefm import training
from ricefm.errors import RiceFMInputError
from ricefm.integrity import CHECKSUMS
from ricefm.locks import ExclusiveLock, LockHeld
from ricefm.shards import ShardedCells, store
from ricefm.shards import sources
from ricefm.shards.build import BuildOptions, build_dataset
from ricefm_cli import cli
from ricefm_configs import tiny

from conftest import FIXTURES, REPO, gene_names, random_counts, write_h5ad

SHIPPED = REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "data"
    build_dataset([SHIPPED], out, progress=False, options=BuildOptions(cells_per_shard=1000))
    return out


@pytest.fixture
def damaged(dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    return copy


def flip(path: Path, at: int = 100, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stderr, stdout) of ``ricefm ARGV`` run in-process."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tiny_config(data_dir, **train):
    cfg = tiny.get_config()
    cfg.data.data_dir = str(data_dir)
    cfg.train.update({"max_steps": 4, "checkpoint_every": 2, **train})
    return cfg


# --- integrity: shards ---------------------------------------------------------------------------

def test_manifest_records_every_shard_file_and_verify_passes_an_intact_dataset(dataset, capsys):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    for shard in manifest["shards"]:
        on_disk = sorted(p.relative_to(dataset / shard["name"]).as_posix()
                         for p in (dataset / shard["name"]).rglob("*") if p.is_file())
        assert sorted(shard["files"]) == on_disk
        for rel, rec in shard["files"].items():
            data = (dataset / shard["name"] / rel).read_bytes()
            assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert "modality/c/0" in shard["files"]  # all-zero (fill value) chunks are stored too
    code, _, out = run_cli(["verify", dataset, "--quiet"], capsys)
    assert code == 0 and "intact" in out


def test_overwritten_and_deleted_chunks_stop_training_before_anything_is_written(damaged, tmp_path, capsys):
    flip(damaged / "shard-00000/gene_ids/c/0", at=5000)  # the case: bytes overwritten in one shard ...
    workdir = tmp_path / "run"
    with pytest.raises(RiceFMInputError, match=r"damaged dataset: shard-00000/gene_ids/c/0 has changed"):
        training.plan(tiny_config(damaged), workdir, 0, 1, 8)
    assert not workdir.exists()
    (damaged / "shard-00001/bins/c/0").unlink()  # ... and a data file of another shard deleted
    with pytest.raises(RiceFMInputError, match=r"shard-00001/bins/c/0 is missing"):
        ShardedCells(damaged)  # the cheap check every reader makes on open
    code, _, out = run_cli(["verify", damaged, "--quiet"], capsys)
    assert code == 1 and "2 problem(s)" in out and "gene_ids/c/0 has changed" in out and "bins/c/0 is missing" in out


def test_a_damaged_chunk_is_a_read_error_never_garbage(damaged):
    flip(damaged / "shard-00000/bins/c/0", at=200)  # same size: only the chunk's CRC32C can tell
    ds = ShardedCells(damaged)  # sizes match, so opening passes
    # TensorStore names the first check that fails (the CRC32C's digest mismatch, or the codec below it)
    with pytest.raises(RiceFMInputError, match=r"shard-00000/bins: unreadable chunk .*ricefm verify"):
        ds.read(np.arange(1000))
    with pytest.raises(RiceFMInputError, match="bins/c/0 has changed"):
        ds.verify()


def test_a_missing_chunk_is_an_error_not_the_fill_value(tmp_path):
    arr = store.create_array(tmp_path / "a", np.int32, per_nonzero=True)
    store.append(arr, np.arange(3 * store.OUTER_CHUNK // 2, dtype=np.int32))
    (tmp_path / "a/c/1").unlink()
    read = ("import sys; from ricefm.shards import store; "
            "print(store.open_array(sys.argv[1])[1048576:1048586].read().result())")  # a fresh process: no cache
    r = subprocess.run([sys.executable, "-c", read, str(tmp_path / "a")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "NOT_FOUND" in r.stderr and "[0 0 0" not in r.stdout, (r.stdout, r.stderr[-500:])


# --- integrity: checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for fmt in ("torch", "flax", "seed"):
        convert(FIXTURES, root / fmt, fmt)
    return root


@pytest.mark.parametrize("fmt,victim", [("torch", "model.safetensors"), ("seed", "best_model.pt"),
                                        ("flax", "params/manifest.ocdbt")])
def test_changed_checkpoint_bytes_are_refused(checkpoints, tmp_path, fmt, victim, capsys):
    ckpt = tmp_path / fmt
    shutil.copytree(checkpoints / fmt, ckpt)
    lines = (ckpt / CHECKSUMS).read_text().splitlines()  # the sha256sum format: `sha256sum -c` reads it
    for line in lines:
        digest, rel = line.split("  ", 1)
        assert hashlib.sha256((ckpt / rel).read_bytes()).hexdigest() == digest
    assert victim in {line.split("  ", 1)[1] for line in lines}
    flip(ckpt / victim, at=(ckpt / victim).stat().st_size // 2)
    with pytest.raises(RiceFMInputError, match=f"damaged checkpoint: {victim} has changed"):
        load_checkpoint(ckpt)
    code, _, out = run_cli(["verify", ckpt, "--quiet"], capsys)
    assert code == 1 and f"{victim} has changed" in out


def test_unsealed_damaged_checkpoints_are_one_line(checkpoints, tmp_path, capsys):
    cases = {
        "seed": lambda c: (c / "best_model.pt").write_bytes((c / "best_model.pt").read_bytes()[:5000]),  # truncated
        "torch": lambda c: (c / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{garbage"),
        "flax": lambda c: shutil.rmtree(c / "params/d"),  # partly deleted params/
    }
    for fmt, damage in cases.items():
        ckpt = tmp_path / fmt
        shutil.copytree(checkpoints / fmt, ckpt)
        (ckpt / CHECKSUMS).unlink()  # as a checkpoint made by other software would be
        damage(ckpt)
        code, err, _ = run_cli(["convert", ckpt, tmp_path / f"out-{fmt}", "--to", "torch"], capsys)
        assert code == 2 and f"unreadable {fmt} checkpoint" in one_line(err) and "restore it from a copy" in err
        assert not (tmp_path / f"out-{fmt}").exists()


def test_convert_to_a_file_or_an_unwritable_place_is_one_line(checkpoints, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, err, _ = run_cli(["convert", checkpoints / "torch", target, "--to", "flax"], capsys)
    assert code == 2 and "is a file" in one_line(err) and target.read_text() == "x"
    code, err, _ = run_cli(["convert", checkpoints / "torch", "/sys/ricefm-test-ckpt", "--to", "flax"], capsys)
    assert code == 2 and "cannot write there" in one_line(err)


# --- concurrency -----------------------------------------------------------------------------------

HOLD = ("import sys, time; from ricefm.locks import ExclusiveLock; "
        "lock = ExclusiveLock(sys.argv[1], 'test').acquire(); print('held', flush=True); time.sleep(600)")


def test_a_second_build_exits_2_naming_the_first_and_a_dead_holder_is_stale(tmp_path, capsys):
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ds.lock")], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err, _ = run_cli(["build-data", SHIPPED, "--output", out, "--quiet"], capsys)
        line = one_line(err)
        assert code == 2 and f"pid {holder.pid} on {socket.gethostname()}" in line and "ds.lock" in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.lock"]  # nothing else created
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "ds.lock").exists()  # left by the killed holder: stale, taken over
    code, _, out = run_cli(["build-data", SHIPPED, "--output", out, "--quiet", "--cells-per-shard", "1000"], capsys)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_racing_builds_leave_one_complete_dataset(dataset, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "ricefm_cli.cli", "build-data", str(SHIPPED), "--output", str(out), "--quiet",
           "--cells-per-shard", "1000"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and set(codes) <= {0, 2}, results
    assert all("is in use by pid" in err for code, err in results if code == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no lock, no .partial, no stray shard
    tree = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert tree(out) == tree(dataset)  # byte-identical to a build alone


def test_a_trainer_refuses_a_workdir_a_live_run_holds(dataset, tmp_path):
    workdir = tmp_path / "run"
    with ExclusiveLock(workdir / training.LOCK, "test"):
        with pytest.raises(LockHeld, match=f"--workdir {workdir} is in use by pid {os.getpid()}"):
            training.plan(tiny_config(dataset), workdir, 0, 1, 8)
    p = training.plan(tiny_config(dataset), workdir, 0, 1, 8)  # released: a new run may start
    p.release()
    assert not (workdir / training.LOCK).exists()


# --- settings, raw counts, unreadable inputs --------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["embed", "--batch-size", "-5"], "--batch-size -5: must be at least 1"),
    (["embed", "--max-seq-len", "1"], "--max-seq-len 1: must be at least 2"),
    (["benchmark", "--batch-size", "0", "--dataset", "rice_root"], "--batch-size 0: must be at least 1"),
])
def test_bad_embed_and_benchmark_settings_stop_before_any_model_loads(argv, message, tmp_path, capsys):
    command, rest = argv[0], argv[1:]
    io = ["--input", SHIPPED, "--output", tmp_path / "out.h5ad"] if command == "embed" else ["--output", tmp_path / "b"]
    code, err, _ = run_cli([command, "--checkpoint", tmp_path / "no-such-checkpoint", *io, *rest], capsys)
    assert code == 2 and message in one_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,message", [
    ("--config.data.max_seq_len=1", "--config.data.max_seq_len=1: leaves no gen token"),
    ("--config.train.max_steps=-5", "--config.train.max_steps=-5: must be at least 0"),
    ("--config.data.max_seq_lenn=5", "--config.data.max_seq_lenn: configs/tiny.py has no such field; did you mean "
                                     "--config.data.max_seq_len"),
])
def test_bad_trainer_settings_are_one_line_exit_2_and_create_nothing(dataset, tmp_path, override, message):
    workdir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ricefm_npu.train", "--config", "configs/tiny.py", "--data", str(dataset),
                        "--workdir", str(workdir), "--device", "cpu", override], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not workdir.exists()


@pytest.fixture(scope="module")
def normalized(tmp_path_factory):
    """Log-normalized X with the raw counts in layers["counts"], as scanpy users often save."""
    d = tmp_path_factory.mktemp("normalized")
    counts = random_counts(600, 300, density=0.3, seed=4)
    log = counts.copy()
    log.data = np.log1p(log.data / 10.0).astype(np.float32)
    return write_h5ad(d / "log.h5ad", log, gene_names(300), layers={"counts": counts})


def test_non_integer_values_are_refused_unless_allowed_and_the_manifest_says_which(normalized, vocab_path, tmp_path,
                                                                                   capsys):
    common = ["build-data", normalized, "--vocab", vocab_path, "--quiet"]
    code, err, _ = run_cli([*common, "--output", tmp_path / "a"], capsys)
    line = one_line(err)
    assert code == 2 and "non-integer values" in line and "--layer" in line and "layers here: counts" in line
    assert "--allow-non-counts" in line and [p.name for p in tmp_path.iterdir()] == ["vocab.json"]
    assert run_cli([*common, "--output", tmp_path / "b", "--allow-non-counts"], capsys)[0] == 0
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["build"]["allow_non_counts"] is True
    check = manifest["sources"][0]["counts_check"]
    assert check["cells_sampled"] == 600 and check["non_integer_sampled"] > 0.9 * check["values_sampled"]
    assert run_cli([*common, "--output", tmp_path / "c", "--layer", "counts"], capsys)[0] == 0
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert manifest["build"]["allow_non_counts"] is False and manifest["sources"][0]["counts_check"]["non_integer_sampled"] == 0


def test_non_integer_values_beyond_the_sample_abort_the_build_and_leave_nothing(vocab_path, tmp_path, monkeypatch):
    counts = random_counts(3000, 300, density=0.3, seed=5).tolil()
    counts[2900, 5] = 2.5
    counts = sp.csr_matrix(counts)
    monkeypatch.setattr(sources, "COUNTS_SAMPLE_ROWS", 10)  # samples rows 0-9, 996-1005, 1993-2002, 2990-2999
    src = write_h5ad(tmp_path / "late.h5ad", counts, gene_names(300))
    with pytest.raises(RiceFMInputError, match=r"non-integer values, e.g. 2.5 at cell 2900"):
        build_dataset([src], tmp_path / "ds", vocab_path=vocab_path, progress=False,
                      options=BuildOptions(cells_per_shard=1000, block_cells=500))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.h5ad", "vocab.json"]


def test_unreadable_inputs_and_outputs_are_one_line(tmp_path, capsys):
    data = SHIPPED.read_bytes()
    (tmp_path / "truncated.h5ad").write_bytes(data[:len(data) // 2])
    import anndata as ad

    ad.read_h5ad(SHIPPED)[:0].copy().write_h5ad(tmp_path / "empty.h5ad")
    (tmp_path / "taken").write_text("x")
    cases = [(tmp_path / "truncated.h5ad", tmp_path / "o1", "truncated or damaged"),
             (tmp_path / "empty.h5ad", tmp_path / "o2", "0 cells x 7000 genes; nothing to read"),
             (SHIPPED, Path("/sys/ricefm-test-ds"), "cannot create /sys/ricefm-test-ds.lock"),
             (SHIPPED, tmp_path / "taken", "is a file; choose a new folder")]
    for src, out, message in cases:
        code, err, _ = run_cli(["build-data", src, "--output", out, "--quiet"], capsys)
        assert code == 2 and message in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.h5ad", "taken", "truncated.h5ad"]  # no .partial


# --- kills and resumes ------------------------------------------------------------------------------

def test_kill_9_during_training_then_resume_is_bit_identical(dataset, tmp_path):
    from safetensors.numpy import load_file

    from ricefm_npu.train import train

    cfg = tiny_config(dataset, max_steps=6)
    train(cfg, tmp_path / "straight", device="cpu", progress=False)
    flags = ["--config", "configs/tiny.py", "--data", str(dataset), "--device", "cpu", "--workdir",
             str(tmp_path / "killed"), "--config.train.max_steps=6", "--config.train.checkpoint_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "ricefm_npu.train", *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "killed/checkpoints/latest" / CHECKSUMS
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.5))  # somewhere in steps 3-6 or a checkpoint swap
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run([sys.executable, "-m", "ricefm_npu.train", *flags, "--resume"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(tmp_path / "straight/checkpoints/latest/model.safetensors")
    b = load_file(tmp_path / "killed/checkpoints/latest/model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert not (tmp_path / "killed" / training.LOCK).exists()


def test_changed_training_state_refuses_resume(dataset, tmp_path):
    from ricefm_npu.train import train

    cfg = tiny_config(dataset)
    train(cfg, tmp_path, device="cpu", progress=False)
    flip(tmp_path / "checkpoints/latest/training_state.pt", at=300)
    with pytest.raises(RiceFMInputError, match="damaged checkpoint: training_state.pt has changed"):
        train(cfg, tmp_path, device="cpu", resume=True, progress=False)


def test_changed_jax_checkpoint_refuses_resume(dataset, tmp_path):
    from ricefm_jax.train import train

    cfg = tiny_config(dataset, max_steps=2)
    train(cfg, tmp_path, device="cpu", progress=False)
    step = tmp_path / "checkpoints/2"
    assert (step / CHECKSUMS).is_file() and (tmp_path / "best" / CHECKSUMS).is_file()
    victim = max((p for p in (step / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip(victim, at=victim.stat().st_size // 2)
    with pytest.raises(RiceFMInputError, match=f"damaged training checkpoint: params/.* has changed"):
        train(cfg, tmp_path, device="cpu", resume=True, progress=False)
