#!/usr/bin/env bash
# Optuna and what it needs beyond the GPU machines' own packages, and timm (theirs may be older than atm
# needs), as wheels for their Python 3.12, into .whl/ (git-ignored) for benchmarks/gpu_check.sh to install
# there without a package index.
set -eu
cd "$(dirname "$0")/.."
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  optuna alembic sqlalchemy mako colorlog tqdm greenlet timm
