"""Datasets in an S3-compatible bucket: a real S3 server (moto's server mode, on a free local
port, started from the dev extra), TensorStore's own s3 driver, no mocks of ours."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ricefm.errors import RiceFMInputError
from ricefm.shards import ShardedCells
from ricefm.shards.build import BuildOptions, build_dataset
from ricefm.storage import Location

from conftest import REPO, gene_names, random_counts, write_h5ad

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "ricefm-test"
SECRET = "not-a-real-secret-7f3a"
OPTS = dict(cells_per_shard=600, block_cells=200, keep_obs=("kind",))


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _wait_for(port: int, seconds: float = 60) -> None:
    """Until a server (started as a subprocess) accepts connections on ``port``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on port {port} after {seconds} s")


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free port; the standard AWS_* environment points at it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "ricefm", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _objects(client, prefix: str) -> dict[str, bytes]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in sorted(keys)}


def _tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("objects")
    from ricefm.vocab import GeneVocab
    GeneVocab.from_genes(gene_names(800)).save(d / "vocab.json")
    src = write_h5ad(d / "cells.h5ad", random_counts(1500, 800, density=0.2, seed=4), gene_names(800),
                     obs={"kind": ["a", "b", "c"] * 500})
    local = d / "local"
    build_dataset([src], local, vocab_path=d / "vocab.json", options=BuildOptions(**OPTS), progress=False)
    return src, d / "vocab.json", local


def test_location_urls():
    assert Location.parse("s3://b/x/y/").kvstore("shard-00000/bins/")["path"] == "x/y/shard-00000/bins/"
    assert Location.parse("gs://b").kvstore("manifest.json") == {"driver": "gcs", "bucket": "b", "path": "manifest.json"}
    assert Location.parse("file:///tmp/ds").path == Location.parse("/tmp/ds").path
    with pytest.raises(RiceFMInputError, match="unsupported URL scheme 'ftp'"):
        Location.parse("ftp://host/x")
    with pytest.raises(RiceFMInputError, match="no bucket"):
        Location.parse("s3:///x")


def test_build_to_s3_is_the_local_build_object_for_object_and_reads_the_same(s3, source):
    src, vocab, local = source
    url = f"s3://{BUCKET}/corpus/one"
    manifest = build_dataset([src], url, vocab_path=vocab, options=BuildOptions(**OPTS), progress=False)
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert _objects(s3, "corpus/one") == _tree(local)  # every object, byte for byte; no build records left
    remote, here = ShardedCells(url), ShardedCells(local)
    assert remote.directory == url and len(remote) == len(here) == 1500
    np.testing.assert_array_equal(remote.lengths(), here.lengths())
    cells = [5, 1499, 700, 0, 601]
    a, b = remote.read(cells, ("gene_ids", "bins", "values")), here.read(cells, ("gene_ids", "bins", "values"))
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    np.testing.assert_array_equal(remote.obs_codes("kind")[0], here.obs_codes("kind")[0])
    remote.verify()  # every digest, read over S3
    # building again to the finished prefix is a no-op returning the dataset
    assert build_dataset([src], url, vocab_path=vocab, options=BuildOptions(**OPTS), progress=False) == manifest


def test_a_killed_build_is_refused_by_readers_and_a_rerun_writes_only_the_missing_shards(s3, source, monkeypatch):
    src, vocab, local = source
    url = f"s3://{BUCKET}/corpus/killed"
    code = ("import sys; from ricefm.shards.build import BuildOptions, build_dataset; "
            f"build_dataset([sys.argv[1]], sys.argv[2], vocab_path=sys.argv[3], options=BuildOptions(**{OPTS!r}), "
            "progress=False)")
    env = {**os.environ, "RICEFM_TEST_KILL_AFTER_BLOCKS": "7"}  # shards 0 and 1 (3 blocks each) are uploaded
    r = subprocess.run([sys.executable, "-c", code, str(src), url, str(vocab)], env=env, capture_output=True,
                       cwd=REPO)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    left = _objects(s3, "corpus/killed")
    assert "manifest.json" not in left and sorted(k for k in left if k.startswith("_building/")) == [
        "_building/shard-00000.json", "_building/shard-00001.json"]
    with pytest.raises(RiceFMInputError, match=r"s3://ricefm-test/corpus/killed: an unfinished build-data .* "
                                               r"shards uploaded: 2\); re-run the same"):
        ShardedCells(url)
    import ricefm.shards.build as build

    written = []
    real = build._write_shard
    monkeypatch.setattr(build, "_write_shard", lambda k, *a, **kw: written.append(k) or real(k, *a, **kw))
    build_dataset([src], url, vocab_path=vocab, options=BuildOptions(**OPTS), progress=False)
    assert written == [2]
    assert _objects(s3, "corpus/killed") == _tree(local)


def test_bad_locations_are_one_line_naming_the_url_without_secrets(s3, source, tmp_path):
    src, vocab, _ = source
    cases = [(f"s3://no-such-bucket-x/data", "NoSuchBucket"),
             (f"s3://{BUCKET}/nothing/here", "not a riceFM dataset \\(no manifest.json\\)")]
    for url, match in cases:
        with pytest.raises(RiceFMInputError, match=match) as e:
            ShardedCells(url)
        assert url in str(e.value) and SECRET not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RiceFMInputError, match="no-such-bucket-x.*NoSuchBucket") as e:
        build_dataset([src], "s3://no-such-bucket-x/data", vocab_path=vocab, options=BuildOptions(**OPTS),
                      progress=False)
    assert SECRET not in str(e.value)
    s3.put_object(Bucket=BUCKET, Key="occupied/notes.txt", Body=b"someone else's")
    with pytest.raises(RiceFMInputError, match="holds other objects \\(notes.txt"):
        build_dataset([src], f"s3://{BUCKET}/occupied", vocab_path=vocab, options=BuildOptions(**OPTS),
                      progress=False)
    # a shard object damaged in the bucket: the open-time check names it
    url = f"s3://{BUCKET}/corpus/damaged"
    build_dataset([src], url, vocab_path=vocab, options=BuildOptions(**OPTS), progress=False)
    s3.delete_object(Bucket=BUCKET, Key="corpus/damaged/shard-00001/bins/c/0")
    with pytest.raises(RiceFMInputError, match="damaged dataset: shard-00001/bins/c/0 is missing"):
        ShardedCells(url)


@pytest.fixture(scope="module")
def rice_url(s3):
    url = f"s3://{BUCKET}/corpus/rice"
    build_dataset([REPO / "ricefm/resources/rice_root_SRP309176_2k.h5ad"], url, progress=False)
    return url


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow  # ~35 s: two 60-step torchrun runs and a resume
def test_two_torch_processes_from_a_bucket_killed_with_sigkill_resume_bit_identically(rice_url, tmp_path):
    """A node lost mid-run: torchrun and its workers get SIGKILL as soon as the first checkpoint is
    there (during the next steps or the next checkpoint write); ``--resume`` ends where an unbroken
    run ends, bit for bit."""
    from safetensors.numpy import load_file

    from ricefm.integrity import CHECKSUMS

    def command(workdir: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "ricefm_npu.train", "--config", str(REPO / "configs/tiny.py"), "--data", rice_url,
                "--device", "cpu", "--workdir", str(tmp_path / workdir), "--config.train.max_steps=60",
                "--config.train.checkpoint_every=10",
                "--config.data.read_block_cells=16", *extra]  # group reads: 32 steps' cells at once

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(command("straight"), capture_output=True, text=True, env=env, cwd=REPO)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(command("killed"), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = tmp_path / "killed/checkpoints/latest" / CHECKSUMS
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both workers (their own sessions)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    second = subprocess.run(command("killed", "--resume"), capture_output=True, text=True, env=env, cwd=REPO)
    assert second.returncode == 0, second.stderr[:3000]
    a = load_file(tmp_path / "straight/checkpoints/latest/model.safetensors")
    b = load_file(tmp_path / "killed/checkpoints/latest/model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    resumed_at = int(re.search(r"(\d+)/60 ", second.stderr).group(1))  # the progress bar starts there
    assert 10 <= resumed_at < 60 and "x2" in second.stdout, second.stderr[-2000:]

    def logged(workdir: str) -> list[int]:
        return [json.loads(line)["step"] for line in (tmp_path / workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged("killed") == logged("straight") == [10, 20, 30, 40, 50, 60]
    assert SECRET not in straight.stdout + straight.stderr + second.stdout + second.stderr


def test_wrong_credentials_are_one_line_naming_the_url_without_the_secret(tmp_path):
    """An S3 server that checks signatures (moto with IAM auth on after the 4 set-up calls): a wrong
    secret and an unknown key id are each refused in one line that names the URL and what to check."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port)
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="guarded")  # the 4th and last call without auth
        url = "s3://guarded/corpus"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": key["AccessKeyId"]}
        wrong_secret = "wrong-" + key["SecretAccessKey"][:10]
        cases = [({**env, "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}, r"not a riceFM dataset \(no manifest"),
                 ({**env, "AWS_SECRET_ACCESS_KEY": wrong_secret}, r"cannot read \(PERMISSION_DENIED: SignatureDoesNotMatch"),
                 ({**env, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": wrong_secret},
                  r"cannot read \(PERMISSION_DENIED: InvalidAccessKeyId")]
        for i, (creds, match) in enumerate(cases):
            code = ("import sys; from ricefm.shards import ShardedCells; from ricefm.errors import RiceFMInputError\n"
                    "try:\n    ShardedCells(sys.argv[1])\nexcept RiceFMInputError as e:\n    print(e)")
            r = subprocess.run([sys.executable, "-c", code, url], env={**os.environ, **creds}, capture_output=True,
                               text=True, cwd=REPO, timeout=120)
            message = r.stdout.strip()
            assert r.returncode == 0 and len(message.splitlines()) == 1, (r.stdout, r.stderr[-2000:])
            assert message.startswith(url) and re.search(match, message), message
            assert wrong_secret not in message and key["SecretAccessKey"] not in message
            if i:
                assert "credentials" in message, message
    finally:
        server.kill()
        server.wait()


@pytest.mark.slow  # ~25 s: a fresh interpreter compiling the JAX step
def test_two_jax_devices_train_from_a_bucket(rice_url, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = subprocess.run([sys.executable, "-m", "ricefm_jax.train", "--config", str(REPO / "configs/tiny.py"),
                        "--data", rice_url, "--workdir", str(tmp_path / "jax"), "--config.train.max_steps=2",
                        "--config.data.valid_fraction=0",  # no validation program to compile
                        "--config.train.checkpoint_every=100"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on 2 cpu device(s)" in r.stdout + r.stderr
    assert (tmp_path / "jax/best").is_dir() and SECRET not in r.stdout + r.stderr


def test_cli_builds_to_and_verifies_a_bucket(s3, source):
    src, vocab, _ = source
    url = f"s3://{BUCKET}/cli/ds"
    env = dict(os.environ)
    run = [sys.executable, "-m", "ricefm_cli.cli"]
    r = subprocess.run(run + ["build-data", str(src), "--output", url, "--vocab", str(vocab), "--quiet"], env=env,
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"dataset {url}: 1,500 cells" in r.stdout
    ok = subprocess.run(run + ["verify", url, "--quiet"], env=env, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and f"{url}: dataset, " in ok.stdout and ok.stdout.strip().endswith("intact")
    s3.put_object(Bucket=BUCKET, Key="cli/ds/shard-00000/gene_ids/c/0", Body=b"garbage")
    bad = subprocess.run(run + ["verify", url, "--quiet"], env=env, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "shard-00000/gene_ids/c/0 has 7 bytes" in bad.stdout
    assert SECRET not in r.stdout + r.stderr + ok.stdout + bad.stdout + bad.stderr


GCS_CHECK = """
import json, sys
from ricefm.shards import ShardedCells
from ricefm.shards.build import BuildOptions, build_dataset
from ricefm.storage import Location
from ricefm.errors import RiceFMInputError
src, vocab, url, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
opts["keep_obs"] = tuple(opts["keep_obs"])
build_dataset([src], url, vocab_path=vocab, options=BuildOptions(**opts), progress=False)
loc = Location.parse(url)
objects = {k: loc.read(k).hex() for k in loc.keys()}
cells = ShardedCells(url)
cells.verify()
loc.delete("shard-00002/values/c/0")
try:
    ShardedCells(url)
    damaged = ""
except RiceFMInputError as e:
    damaged = str(e)
print(json.dumps({"objects": objects, "cells": len(cells), "damaged": damaged}))
"""


def test_gcs_build_verify_and_damage_against_an_emulator(source, tmp_path):
    """gs:// through TensorStore's gcs driver against gcp-storage-emulator (dev extra): the build equals
    the local one object for object, verify reads it back, a deleted object is named. The emulator
    ignores Range headers, so the sharded cell reads (ranged GETs) are covered by the S3 tests only."""
    pytest.importorskip("gcp_storage_emulator")
    src, vocab, local = source
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory", "--default-bucket", "ricefm-gcs", "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(port)
        url = "gs://ricefm-gcs/corpus/rice"
        opts = {**OPTS, "keep_obs": list(OPTS["keep_obs"])}
        env = {**os.environ, "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}"}
        r = subprocess.run([sys.executable, "-c", GCS_CHECK, str(src), str(vocab), url, json.dumps(opts)], env=env,
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        server.kill()
        server.wait()
    assert {k: bytes.fromhex(v) for k, v in out["objects"].items()} == _tree(local)
    assert out["cells"] == 1500
    assert out["damaged"].startswith(f"{url}: damaged dataset: shard-00002/values/c/0 is missing"), out["damaged"]
