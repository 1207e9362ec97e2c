"""The torch version layer (grad scaler per device and torch release), the torch/NumPy guard, Python 3.10
syntax, and `ricefm doctor` with and without a (mocked) Ascend stack."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from ricefm import environment
from ricefm.errors import RiceFMInputError
from ricefm_cli.cli import main as cli
from ricefm_cli.doctor import report
from ricefm_npu import compat, devices

from conftest import REPO
from fake_torch_npu import FakeGradScaler, FakeNPU


def test_torch_version_parsing():
    assert compat.torch_version("2.1.0+cu121") == (2, 1) and compat.torch_version("2.13.0+cpu") == (2, 13)
    assert compat.torch_version("2.3.0a0+git") == (2, 3)


def test_grad_scaler_per_device_and_release(monkeypatch):
    on, off = compat.grad_scaler(torch.device("cpu"), False), None
    assert not on.is_enabled()  # fp32 / bf16: a pass-through scaler
    monkeypatch.setattr(compat, "torch_version", lambda version=None: (2, 1))  # the Ascend stack's torch
    off = compat.grad_scaler(torch.device("cpu"), False)
    assert type(off).__module__.startswith("torch.cuda.amp") or "GradScaler" in type(off).__name__
    assert not off.is_enabled()
    with pytest.raises(ValueError, match="no fp16 grad scaler for cpu"):
        compat.grad_scaler(torch.device("cpu"), True)
    fake = FakeNPU()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    npu = types.SimpleNamespace(type="npu")  # torch.device("npu") needs torch_npu's backend rename (see below)
    scaler = compat.grad_scaler(npu, True)  # Ascend: torch_npu's own scaler, any release
    assert isinstance(scaler, FakeGradScaler) and scaler.enabled


def test_old_torch_with_numpy_2_is_refused_with_the_fix():
    msg = environment.torch_numpy_conflict("2.1.0", "2.0.2")
    assert msg == "torch 2.1.0 needs NumPy 1.x but NumPy 2.0.2 is installed; run: pip install 'numpy<2'"
    assert environment.torch_numpy_conflict("2.2.2+cpu", "2.3.1") is not None
    assert environment.torch_numpy_conflict("2.3.0", "2.3.1") is None
    assert environment.torch_numpy_conflict("2.1.0", "1.26.4") is None
    assert environment.torch_numpy_conflict(None, "2.3.1") is None  # no torch: nothing to refuse
    import numpy
    if numpy.__version__.startswith("2"):
        with pytest.raises(RiceFMInputError, match=r"pip install 'numpy<2'"):
            environment.check_torch_numpy("2.1.0")
    environment.check_torch_numpy(torch.__version__)  # this environment works


def test_torch_run_refuses_the_broken_combination_before_any_work(monkeypatch, tmp_path):
    from ricefm_configs import tiny
    from ricefm_npu.train import train

    monkeypatch.setattr(environment, "torch_numpy_conflict", lambda t, n: "torch 2.1.0 needs NumPy 1.x; run: pip install 'numpy<2'")
    with pytest.raises(RiceFMInputError, match="numpy<2"):
        train(tiny.get_config(), tmp_path / "w", device="cpu", progress=False)
    assert not (tmp_path / "w").exists()


def test_sources_parse_as_python_3_10():
    """pyproject says Python >= 3.10: no 3.11+ syntax (ast at 3.10) and none of 3.11's new stdlib names."""
    newer = ("tomllib", "typing.Self", "StrEnum", "datetime.UTC", "ExceptionGroup", "TaskGroup", "LiteralString",
             "typing.Never", "assert_never", "reveal_type", "file_digest", "contextlib.chdir", "except*")
    files = [p for pkg in ("ricefm", "ricefm_npu", "ricefm_jax", "converters", "ricefm_cli", "configs", "tests",
                           "benchmarks") for p in (REPO / pkg).rglob("*.py")]
    assert len(files) > 60
    for path in files:
        source = path.read_text()
        ast.parse(source, filename=str(path), feature_version=(3, 10))
        used = [name for name in newer if name in source and path.name != "test_doctor.py"]
        assert not used, (path, used)


def test_doctor_on_an_ascend_machine(tmp_path):
    """CANN 8.0.0 installed and sourced, a matching torch-npu, 8 NPUs (mocked). torch.device("npu") needs the
    backend rename importing torch_npu performs, process-global and irreversible: a fresh interpreter."""
    home = tmp_path / "ascend-toolkit" / "latest"
    (home / "lib64").mkdir(parents=True)
    (home / "version.cfg").write_text("# CANN\nversion=8.0.0\n")
    (home / "lib64" / "libhccl.so").write_text("")
    code = ("import sys, json, torch; from fake_torch_npu import FakeNPU; sys.modules['torch_npu'] = FakeNPU(count=8); "
            "torch.utils.rename_privateuse1_backend('npu'); from ricefm_npu import devices; "
            "devices.torch_npu_version = lambda: torch.__version__.split('+')[0] + '.post3'; "
            "from ricefm_cli.doctor import report, format_report; lines = report('auto'); "
            "print(json.dumps(dict(lines))); print(format_report(lines))")
    env = {**os.environ, "ASCEND_TOOLKIT_HOME": str(home), "LD_LIBRARY_PATH": str(home / "lib64"),
           "PYTHONPATH": str(REPO / "tests")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    first, *screen = r.stdout.splitlines()
    lines = json.loads(first)
    assert lines["CANN"] == f"8.0.0 at {home}"
    assert lines["NPU"] == "8 device(s)" and lines["torch-npu"].endswith(".post3")
    assert lines["torch run"] == ("--device auto -> npu:0; training: npu_fusion attention, fp16 (precision=auto, "
                                  "dropout 0.2); embedding: npu_fusion attention, fp32")
    assert lines["NPU run needs"] == "nothing: ready"
    assert "python" in lines and "numpy" in lines
    assert ("jax run" in lines) == (importlib.util.find_spec("jax") is not None)  # the torch-only lane has no JAX
    assert len(screen) <= 20  # one screen


def test_doctor_without_cann_imports_no_torch_npu(monkeypatch, tmp_path):
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    monkeypatch.setattr(environment, "DEFAULT_CANN_HOME", str(tmp_path / "no-ascend"))
    monkeypatch.setattr(devices, "torch_npu_version", lambda: "1.11.0.post14")  # an old one, and no CANN
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)

    class Refuse:  # an import of torch_npu here would fail inside libhccl.so: the doctor must not try
        def find_spec(self, name, path=None, target=None):
            if name == "torch_npu":
                raise AssertionError("torch_npu imported without CANN")

    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    lines = dict(report("auto"))
    assert lines["CANN"] == "not found" and lines["NPU"] == "none usable"
    assert lines["torch run"].startswith("--device auto -> cpu; training: math attention, fp32")
    needs = lines["NPU run needs"]
    assert "Ascend CANN" in needs and f"a torch-npu for torch {torch.__version__}" in needs
    lines = dict(report("npu"))
    assert "--device npu: Ascend NPU support is unavailable: Ascend CANN was not found" in lines["torch run"]
    assert cli(["doctor", "--device", "cpu"]) == 0


def test_cann_version_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ascend_toolkit_install.info").write_text("package_name=Ascend-cann-toolkit\nversion=7.0.0\n")
    assert environment.cann_version(tmp_path / "a") == "7.0.0"
    (tmp_path / "b").mkdir()
    assert environment.cann_version(tmp_path / "b") == "unknown version"
