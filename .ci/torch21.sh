#!/usr/bin/env bash
# CI lane: the torch backend on the Ascend stack's torch, 2.1.0 (riceFM's own NPU environment is torch /
# torch-npu 2.1.0), with numpy<2 as torch < 2.3 requires. Runs the torch-backend tests: fixture, training
# (DDP, resume, AMP), devices with the mocked torch_npu, the fused attention's backward, embed, the
# converters' torch side, doctor.
# PyPI's torch 2.1.0 is the CUDA build (~3 GB with its nvidia wheels, ~50 s from a warm pip cache).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
venv=.venv-torch21
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# ~3 GB of CUDA wheels from PyPI: resume interrupted downloads instead of failing the lane
"$py" -m pip install --quiet --resume-retries 30 torch==2.1.0 "numpy<2"
"$py" -m pip install --quiet -e ".[torch,dev]" "numpy<2"
"$py" -c "import torch, numpy; print(f'torch {torch.__version__}, numpy {numpy.__version__}'); torch.from_numpy(numpy.ones(1))"
echo "torch 2.1 lane: installed in $((SECONDS - start))s"
"$py" -m pytest -q -p no:cacheprovider tests/test_torch_fixture.py tests/test_torch_train.py tests/test_torch_devices.py tests/test_torch_attention.py \
    tests/test_embed.py tests/test_converters_torch.py tests/test_doctor.py
echo "torch 2.1 lane: passed in $((SECONDS - start))s"
