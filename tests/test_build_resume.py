"""A build killed mid-shard (SIGKILL) and re-run finishes to a dataset byte-identical to one built in one go."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ricefm.shards import ShardedCells
from ricefm.shards.build import BuildOptions, build_dataset
from ricefm.shards.manifest import load_manifest

from conftest import gene_names, random_counts, write_h5ad

OPTS = dict(cells_per_shard=3000, block_cells=500, keep_obs=("kind",))


def _build_in_subprocess(src, vocab, out, kill_after=None):
    env = dict(os.environ)
    if kill_after is not None:
        env["RICEFM_TEST_KILL_AFTER_BLOCKS"] = str(kill_after)
    code = ("import sys; from ricefm.shards.build import BuildOptions, build_dataset; "
            f"build_dataset([sys.argv[1]], sys.argv[2], vocab_path=sys.argv[3], options=BuildOptions(**{OPTS!r}), progress=False)")
    return subprocess.run([sys.executable, "-c", code, str(src), str(out), str(vocab)], env=env, capture_output=True)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    from ricefm.vocab import GeneVocab
    GeneVocab.from_genes(gene_names(2000)).save(d / "vocab.json")
    X = random_counts(6000, 2000, density=0.25, seed=9)
    src = write_h5ad(d / "big.h5ad", X, gene_names(2000), obs={"kind": ["a", "b", "c"] * 2000})
    ref = d / "reference"
    build_dataset([src], ref, vocab_path=d / "vocab.json", options=BuildOptions(**OPTS), progress=False)
    return src, d / "vocab.json", ref


@pytest.mark.parametrize("kill_after,complete_before", [(3, 0), (11, 1)])
def test_killed_build_resumes_to_identical_bytes(tmp_path, source, kill_after, complete_before):
    src, vocab, ref = source
    out = tmp_path / "ds"
    r = _build_in_subprocess(src, vocab, out, kill_after=kill_after)
    assert r.returncode == -signal.SIGKILL
    assert not out.exists()  # a finished dataset never appears half-written
    partial = load_manifest(tmp_path / "ds.partial", require_complete=False)
    assert not partial.complete
    assert sum(s["complete"] for s in partial.shards) == complete_before
    assert (tmp_path / "ds.partial" / f".shard-{complete_before:05d}.tmp").is_dir()  # the shard it was killed in
    r = _build_in_subprocess(src, vocab, out)
    assert r.returncode == 0, r.stderr.decode()
    assert not (tmp_path / "ds.partial").exists()
    got, want = _tree(out), _tree(ref)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert len(ShardedCells(out)) == 6000
    assert sum(len(v) for k, v in want.items() if "gene_ids/c" in k) > 0


def test_incomplete_dataset_is_refused_by_reader(tmp_path, source):
    src, vocab, _ = source
    _build_in_subprocess(src, vocab, tmp_path / "ds", kill_after=2)
    from ricefm.errors import RiceFMInputError
    with pytest.raises(RiceFMInputError, match="incomplete.*re-run the same `ricefm build-data`"):
        ShardedCells(tmp_path / "ds.partial")
