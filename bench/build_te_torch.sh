#!/usr/bin/env bash
# Cross-build Transformer Engine's PyTorch extension for the lent GPU machine's image, here, and pack it
# with TE's core library (sm_90 cubins only) and TE's Python dependencies into one tarball that one device
# call carries and bench/gpu_check.sh installs (issue 8's `te` FP8 backend):
#
#   bash bench/build_te_torch.sh [OUT.tar.xz]        # default .carry/te_sm90.tar.xz; ~8 min on 2 cores
#
# The image runs CPython 3.12.3 (Ubuntu 24.04) and torch 2.11.0+cu130 and has no TE. TE's PyTorch part,
# transformer_engine_torch, is an sdist of 33 C++ files (a torch CppExtension: g++ only, no nvcc) that must
# be compiled against that Python and that torch; building it there costs minutes of device time. This
# machine has neither, but the package registries have every header it needs:
#   torch's from the torch 2.11.0 cp312 wheel (the same build as the image's);
#   CPython 3.12.3's from Ubuntu noble's libpython3.12-dev (archive.ubuntu.com);
#   CUDA 13.0's (runtime, CRT, cuBLAS, cuSPARSE, cuSOLVER, cuRAND, cuFFT, NVRTC, CCCL, NVTX), cuDNN 9.19's
#   and NCCL's from NVIDIA's wheels (NCCL 2.27.7: the image's 2.28.9 is not on the index);
#   TE's own from the sdist.
# The compile and link lines are those torch.utils.cpp_extension and TE's build_tools give (-O3
# -fvisibility=hidden -g0, linked to c10, torch, torch_cpu, torch_python; NCCL EP off, below). pybind11 3
# keys its ABI on libstdc++'s C++11 ABI, not the g++ version, so g++ 12 here matches torch's build.
# Two checks here: every undefined symbol is exported by a library it will load with, and TE imports under
# CPython 3.12.3 with torch 2.11 (IMPORT_CHECK=0 skips it). Its kernels first run on a GPU call.
#
# WORK (default /tmp/te_xbuild) holds ~3 GB of downloads and objects (the import check's Python stack, ~6 GB,
# is bench/image_twin.sh's); JOBS (default nproc) compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.carry/te_sm90.tar.xz}
WORK=${WORK:-/tmp/te_xbuild}
JOBS=${JOBS:-$(nproc)}
TE=2.20.2
PY=${PYTHON:-python3}
SDIST_URL=https://files.pythonhosted.org/packages/3d/fb/c9ce298a38c22ed1059923a01cac7e1f4e4f7281d39a8679c8118febe079/transformer_engine_torch-$TE.tar.gz
SDIST_SHA=4c40ced8a6261649e689076f198d4feaf02277b1ba18931a66eccdaceb33c43e
PYDEV_URL=http://archive.ubuntu.com/ubuntu/pool/main/p/python3.12/libpython3.12-dev_3.12.3-1_amd64.deb
PYDEV_SHA=f5924a06298ae0689128498276d3a555e02615a4ecfa8f4417d679a097586f35
PYLIB_URL=http://archive.ubuntu.com/ubuntu/pool/main/p/python3.12/libpython3.12t64_3.12.3-1_amd64.deb
PYLIB_SHA=31df8af8521fb3fdf198d7507765d4ebf435c7165a50013b39d2761fd6c0d98c
download() {  # wheels for the image: CPython 3.12, manylinux x86_64
  local log rc=0
  log=$(mktemp)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 "$@" \
    > "$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  [ $rc -eq 0 ] || { echo "build_te_torch: pip download failed ($rc): ${*: -1} ..." >&2; exit 1; }
}
fetch() {  # URL SHA256 DEST
  [ -f "$3" ] || curl -fsSL -m 300 -o "$3" "$1"
  echo "$2  $3" | sha256sum -c --quiet - || { echo "build_te_torch: $3 does not match its SHA-256" >&2; exit 1; }
}
step() { echo "[build_te_torch $(date +%T)] $*"; }
mkdir -p "$WORK"/{dl,hdr,te,deps,obj,dist}

step "downloading torch 2.11.0's headers and link libraries, CUDA/cuDNN/NCCL headers, CPython 3.12 headers, the sdist"
download -d "$WORK/dl" torch==2.11.0 "nvidia-cublas==13.1.0.3" "nvidia-cusparse==12.6.3.3" "nvidia-cusolver==12.0.4.66" \
  "nvidia-curand==10.4.0.35" "nvidia-cufft==12.0.0.61" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" \
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-crt==13.0.88" "nvidia-nvtx==13.0.85" "nvidia-cudnn-cu13==9.19.0.56" "nvidia-nccl-cu13==2.27.7" \
  "nvidia-cudnn-frontend==1.32.0"
fetch "$SDIST_URL" "$SDIST_SHA" "$WORK/dl/transformer_engine_torch-$TE.tar.gz"
fetch "$PYDEV_URL" "$PYDEV_SHA" "$WORK/dl/libpython3.12-dev.deb"
TORCH_WHL=$(ls "$WORK"/dl/torch-2.11.0-cp312-*.whl)
[ -d "$WORK/torch/torch/include" ] || unzip -q -o "$TORCH_WHL" 'torch/include/*' 'torch/lib/*' -d "$WORK/torch"
for w in "$WORK"/dl/nvidia_*.whl; do unzip -q -o "$w" '*include/*' -d "$WORK/hdr" 2>/dev/null || true; done
[ -d "$WORK/py312" ] || dpkg-deb -x "$WORK/dl/libpython3.12-dev.deb" "$WORK/py312"
tar -xzf "$WORK/dl/transformer_engine_torch-$TE.tar.gz" -C "$WORK"
SRC="$WORK/transformer_engine_torch-$TE"
T="$WORK/torch/torch"
INC=(-I"$SRC/common_headers" -I"$SRC/common_headers/common" -I"$SRC/common_headers/common/include" -I"$SRC/csrc"
  -I"$WORK/hdr/nvidia/cu13/include" -I"$WORK/hdr/nvidia/cudnn/include" -I"$WORK/hdr/nvidia/nccl/include"
  -I"$WORK/hdr/include" -I"$T/include" -I"$T/include/torch/csrc/api/include"
  -I"$WORK/py312/usr/include/python3.12" -I"$WORK/py312/usr/include")
# NCCL EP (MoE expert parallelism, -DNVTE_WITH_NCCL_EP) is left out: its source needs NCCL 2.28's window
# types, and the index has NCCL 2.27 and 2.32 headers only; without it ep.cpp compiles to nothing, as TE's
# build_tools do for GPUs below sm_90. Nothing here uses expert parallelism.
FLAGS=(-fno-strict-overflow -Wsign-compare -DNDEBUG -fwrapv -fPIC -O3 -fvisibility=hidden -g0 -w
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=transformer_engine_torch -std=c++17)
export FLAGS_STR="${FLAGS[*]} ${INC[*]}" OBJ="$WORK/obj"
stamp=$(echo "$FLAGS_STR" | sha256sum | cut -c1-16)  # objects from other flags are rebuilt
[ "$(cat "$OBJ/.flags" 2>/dev/null)" = "$stamp" ] || { rm -f "$OBJ"/*.o; echo "$stamp" > "$OBJ/.flags"; }

step "compiling $(find "$SRC/csrc" -name '*.cpp' | wc -l) files with $JOBS jobs"
find "$SRC/csrc" -name '*.cpp' | sort | xargs -P "$JOBS" -I{} bash -c \
  'o="$OBJ/$(echo "{}" | sed "s#.*/csrc/##; s#/#_#g; s#\.cpp\$#.o#")"
   [ "$o" -nt "{}" ] || { g++ $FLAGS_STR -c "{}" -o "$o.part" && mv "$o.part" "$o"; }'
SO="$WORK/dist/transformer_engine_torch.cpython-312-x86_64-linux-gnu.so"
g++ -shared -o "$SO" "$OBJ"/*.o -L"$T/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -Wl,--allow-shlib-undefined
step "linked $(du -h "$SO" | cut -f1) $(basename "$SO")"

# (ml-dtypes 0.5.4, not 0.6: it accepts numpy 1.26 as well as 2.x, whichever the image has)
step "downloading TE $TE (core, Python) and its import-time dependencies"
download -d "$WORK/te" "transformer-engine==$TE" "transformer-engine-cu13==$TE"

# What the dynamic loader will do there, checked here: every symbol the extension leaves undefined must be
# exported by CPython 3.12.3, torch 2.11's libraries, TE's core library (loaded first, globally), the CUDA,
# cuDNN and NCCL libraries torch loads, or the C/C++ runtime.
fetch "$PYLIB_URL" "$PYLIB_SHA" "$WORK/dl/libpython3.12t64.deb"
[ -d "$WORK/pylib" ] || dpkg-deb -x "$WORK/dl/libpython3.12t64.deb" "$WORK/pylib"
for w in "$WORK"/dl/nvidia_*.whl "$WORK"/te/transformer_engine_cu13-*.whl; do
  unzip -q -o "$w" '*.so*' -d "$WORK/libs" 2>/dev/null || true
done
SYS=/lib/x86_64-linux-gnu
$PY - "$SO" "$WORK/pylib" "$T/lib" "$WORK/libs" $SYS/libc.so.6 $SYS/libm.so.6 $SYS/libstdc++.so.6 \
  $SYS/libgcc_s.so.1 $SYS/libpthread.so.0 $SYS/libdl.so.2 $SYS/librt.so.1 $SYS/ld-linux-x86-64.so.2 <<'PYEOF'
import subprocess, sys
from pathlib import Path

def symbols(path, undefined):
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, str(path)], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    if undefined:  # "U name": required; "w name": weak, optional
        return {r[-1].split("@")[0] for r in rows if r[-2] == "U"}
    return {r[-1].split("@")[0] for r in rows if len(r) >= 3}

need = symbols(sys.argv[1], True)
libs = [q for p in map(Path, sys.argv[2:]) for q in (p.rglob("*.so*") if p.is_dir() else [p.resolve()])]
libs = [p for p in libs if p.is_file() and not p.is_symlink()]
have = set().union(*(symbols(p, False) for p in libs))
missing = sorted(need - have)
print(f"build_te_torch: {len(need)} undefined symbols, {len(need) - len(missing)} found in {len(libs)} libraries")
if missing:
    print("build_te_torch: not exported by any library it will load with:", *missing[:30], sep="\n  ")
    sys.exit(1)
PYEOF
TE_TORCH_WHL=$($PY -m bench.slim_wheels wheel "$WORK/dist" transformer_engine_torch "$TE" cp312-cp312-linux_x86_64 \
  "$(basename "$SO")=$SO")
download -d "$WORK/deps" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 einops==0.8.2 onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0 ml-dtypes==0.5.4 \
  protobuf==7.36.2 nvdlfw-inspect==0.2.2 packaging==25.0 pyyaml==6.0.3
step "packing"
$PY -m bench.slim_wheels pack "$OUT" "$TE_TORCH_WHL" "$WORK"/te/*.whl "$WORK"/deps/*.whl

[ "${IMPORT_CHECK:-1}" = "1" ] || exit 0
# The import itself, here, under the GPU image's Python stack (bench/image_twin.sh: Ubuntu's CPython 3.12.3,
# torch 2.11.0+cu130, Triton 3.6), with the packed wheels installed beside it. TE imports without a GPU
# driver, and loading the extension runs its pybind11 module init against torch's types: what breaks first
# if the ABI is wrong. Kernels need a GPU and are not run.
step "import check under CPython 3.12.3 and torch 2.11 (bench/image_twin.sh)"
bash bench/image_twin.sh setup > /dev/null
rm -rf "$WORK/unpacked" "$WORK/te_site" && mkdir -p "$WORK/unpacked" && tar -xJf "$OUT" -C "$WORK/unpacked"
bash bench/image_twin.sh install "$WORK/te_site" --no-deps "$WORK"/unpacked/wheels/*.whl
TWIN_PYTHONPATH="$WORK/te_site" bash bench/image_twin.sh python -c '
import sys, torch
import transformer_engine.pytorch as te
import transformer_engine_torch as tex
names = [n for n in dir(tex) if not n.startswith("_")]
print(f"build_te_torch: Python {sys.version.split()[0]}, torch {torch.__version__}: transformer_engine.pytorch "
      f"imports; the extension registered {len(names)} names, cuDNN {tex.get_cudnn_version()}")
'
