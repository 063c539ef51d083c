#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that has no package registry but
# has Python, a CUDA torch, numpy, pandas, scipy, pyarrow, h5py, scikit-learn, matplotlib,
# pyyaml, pytest and hypothesis (as the project's device image does): the packages that
# the GPU tests and the in-process GPU benchmark import beyond those, at the versions of
# this machine's venv (the tested ones), for the GPU machine's Python and platform.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # DIR: default .whl (ignored by git)
#
# Ray is not among them: its wheel (about 80 MB) is larger than what may travel to such a
# machine, so the offline GPU check trains in-process (one GPU, no Ray Train) and leaves
# out the test that needs Ray. Needs this repo's venv (`make setup`) and the registry.
# GPU_PYTHON_VERSION (default 3.12) names the GPU machine's Python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
VENV_PY="${VENV_PY:-$ROOT/.venv/bin/python}"
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"
PACKAGES=(zarr numcodecs donfig google-crc32c tiledbsoma somacore more-itertools
          anndata array-api-compat legacy-api-wrap natsort scverse-misc
          pyarrow-hotfix shapely pydantic pydantic-core annotated-types typing-inspection tqdm)

mkdir -p "$DIR"
pins=()
for name in "${PACKAGES[@]}"; do
  version="$("$VENV_PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $VENV_PY" >&2; exit 2; }
  pins+=("$name==$version")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${platforms[@]}" -d "$DIR" "${pins[@]}"
total="$(du -cb "$DIR"/*.whl | tail -n 1 | cut -f 1)"
echo "gpu_wheels: ${#pins[@]} wheels in $DIR, $((total / 1048576)) MiB: ${pins[*]}"
