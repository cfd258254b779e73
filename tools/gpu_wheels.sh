#!/usr/bin/env bash
# Wheels for bench/gpu_check.py's streamed part on a GPU machine that has torch but not LitData (and no network):
# LitData and the packages it imports that such an image usually lacks, for CPython 3.12 on x86-64 Linux, into
# .whl/ (ignored by git). On the GPU machine, before the check:
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=.site:src
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    litdata==0.2.76 obstore boto3 botocore s3transfer jmespath
ls -la .whl
