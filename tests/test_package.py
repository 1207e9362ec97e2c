import subprocess
import sys

from conftest import REPO


def test_core_imports_neither_jax_nor_torch():
    code = ("import sys, ricefm.batching, ricefm.shards.build, ricefm_cli.cli, ricefm.binning, ricefm.vocab, "
            "ricefm.backends, ricefm.embed, ricefm.evaluate.annotation, ricefm.evaluate.report; "
            "bad = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_backend_packages_import():
    import converters  # noqa: F401
    import ricefm_jax  # noqa: F401
    import ricefm_npu  # noqa: F401


def test_demo_runs_on_shipped_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ricefm_cli.demo", f"--config={REPO / 'configs/tiny.py'}",
                        f"--workdir={tmp_path}", "--config.data.batch_size=50", "--train_steps=30",
                        "--noevaluate"],  # the evaluation suite has its own tests (test_evaluate.py)
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2,000 cells, 1,165,687 non-zero values" in r.stdout
    assert "one epoch: 40 batches of 50 (max_seq_len 64)" in r.stdout
    assert "pcpt_gene_ids            (50, " in r.stdout
    assert "pretrained 30 steps on cpu" in r.stdout and "embedded 2,000 cells" in r.stdout
    import anndata as ad
    assert ad.read_h5ad(tmp_path / "embeddings.h5ad").obsm["X_ricefm"].shape == (2000, 64)
