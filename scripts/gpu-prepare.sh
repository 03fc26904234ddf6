#!/usr/bin/env bash
# Here (a machine with pip and ../shared): fill gpu-carry/ (git-ignored, under 64 MiB) with what a GPU machine
# that reaches no package registry needs beside its own torch: the wheels bench needs there, and CIFAR-10 as one
# packed blob. Then run scripts/gpu-check.sh there with gpu-carry carried (the device tool: carry ["gpu-carry"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu-carry/wheels gpu-carry/data
# The GPU image (Python 3.12) has torch, numpy, pandas, scipy, seaborn, tqdm, pytest; not these.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d gpu-carry/wheels optuna==5.0.0 sqlalchemy==2.0.44 alembic mako colorlog cmaes greenlet
cp ../shared/data/cifar10-pack/* gpu-carry/data/
du -sh gpu-carry
