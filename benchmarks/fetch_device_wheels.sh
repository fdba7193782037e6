#!/usr/bin/env bash
# Fill ./.whl with the wheels a lent GPU machine lacks (it has no network), for benchmarks/run_device_checks.sh.
#
#   bash benchmarks/fetch_device_wheels.sh          # here, where PyPI is reachable; ~30 MB
#
# The device image ('cuda', Python 3.12, torch 2.11 + CUDA 13; /work/.library/device/KINDS.md lists its packages)
# has torch, numpy, scipy, pyarrow, pandas, tokenizers, safetensors, accelerate, peft, einops, jaxtyping, torchdiffeq,
# but not diffusers, datasets' own pure-python parts or the peer, and older transformers / huggingface_hub than the
# ones tested here. The versions below are the ones this repo is tested with; run_device_checks.sh installs them with
# --no-deps into /tmp/site, so every package a missing one needs is named here too.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    # our stack
    transformers==5.25.0 huggingface_hub==2.4.0 diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # what they need that the device lacks or has too old
    httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 click==8.5.1 hf-xet==1.8.0 kernels==0.19.1 tomlkit==0.15.3
    # the peer (benchmarks/peer_transfusion_pytorch.py) and what it needs beyond the image
    transfusion-pytorch==0.20.0 axial_positional_embedding==0.3.12 beartype==0.23.1 einx==0.4.3 frozendict==2.5.1
    ema-pytorch==0.8.3 loguru==0.7.3 rotary-embedding-torch==0.9.1 torch-einops-utils==0.2.0
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl
