"""bench/slim_wheels.py: a library nvcc builds for two GPU architectures keeps exactly the chosen one's
cubins, byte for byte, and still loads and runs its host code; wheels round-trip through pack/install."""

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import slim_wheels

SOURCE = r"""
__global__ void scale(float *x, float a, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a; }
__global__ void shift(float *x, float b, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] += b; }
extern "C" int host_answer(int x) { return 6 * x; }
extern "C" void launch(float *x, int n) { scale<<<1, 32>>>(x, 2.0f, n); shift<<<1, 32>>>(x, 1.0f, n); }
"""
ARCHS = {"cubin": [80, 90], "ptx": [90]}  # what the nvcc command below asks for


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory) -> Path:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    folder = tmp_path_factory.mktemp("fatbin")
    (folder / "k.cu").write_text(SOURCE)
    gencode = [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=[sm_90,compute_90]",
    ]
    cmd = [
        "nvcc",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        *gencode,
        "-o",
        str(folder / "libk.so"),
        str(folder / "k.cu"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return folder / "libk.so"


def _images(data) -> dict[tuple[str, int], list[bytes]]:
    out: dict[tuple[str, int], list[bytes]] = {}
    for container in slim_wheels.fatbin_containers(data):
        for im in container.images:
            kind = "ptx" if im.kind == slim_wheels.KIND_PTX else "cubin"
            out.setdefault((kind, im.arch), []).append(bytes(data[im.offset : im.offset + im.size]))
    return out


def test_prune_keeps_exactly_the_target_cubins_and_the_library_still_runs(cuda_lib, tmp_path):
    original = cuda_lib.read_bytes()
    before = _images(original)
    assert sorted(before) == sorted(
        [("cubin", a) for a in ARCHS["cubin"]] + [("ptx", a) for a in ARCHS["ptx"]]
    )

    data = bytearray(original)
    freed, whole = slim_wheels.prune_fatbins(data, 90)
    zeroed = slim_wheels.zero_symbol_tables(data)
    after = _images(data)
    assert list(after) == [("cubin", 90)] and after[("cubin", 90)] == before[("cubin", 90)]  # byte for byte
    assert whole == 0 and freed == sum(len(b) for k, v in before.items() if k != ("cubin", 90) for b in v)
    assert zeroed > 0 and len(data) == len(original)  # same size and layout: nothing moved
    old, new = slim_wheels.fatbin_containers(original), slim_wheels.fatbin_containers(data)
    assert [c.offset for c in old] == [c.offset for c in new]
    for o, n in zip(
        old, new
    ):  # the freed tail of each container is zeros (what makes xz store it in nothing)
        start, end = (c.offset + c.header_size + sum(im.size for im in c.images) for c in (n, o))
        assert start < end and not any(data[start:end])
    pruned = tmp_path / "libk_sm90.so"
    pruned.write_bytes(bytes(data))
    # the dynamic loader, the static constructors that register the fat binary, and the dynamic
    # symbol table are all intact: load it in a fresh process and call its host code
    code = f"import ctypes; print(ctypes.CDLL({str(pruned)!r}).host_answer(7))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "42", res.stderr

    # no cubin for the architecture asked for: every container is left whole
    data = bytearray(original)
    assert slim_wheels.prune_fatbins(data, 75) == (0, len(slim_wheels.fatbin_containers(original)))
    assert bytes(data) == original


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    dist = "pkg-1.0.dist-info"
    files = {**files, f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"}
    files[f"{dist}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n"
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    return path


def _assert_record_matches(z: zipfile.ZipFile, record_name: str) -> None:
    """Every file of the wheel is in its RECORD with its own SHA-256 and size; the RECORD lists itself last."""
    lines = z.read(record_name).decode().splitlines()
    assert lines[-1] == f"{record_name},," and len(lines) == len(z.namelist())
    for line in lines[:-1]:
        name, digest, size = line.rsplit(",", 2)
        content = z.read(name)
        want = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={want}" and int(size) == len(content), name


def test_pack_install_round_trip(cuda_lib, tmp_path):
    lib = cuda_lib.read_bytes()
    wheel = _wheel(
        tmp_path / "pkg-1.0-py3-none-any.whl",
        {
            "pkg/__init__.py": b"ANSWER = 42\n",
            "pkg/_ext.cpython-312-x86_64-linux-gnu.so": lib,
            "pkg/_ext.cpython-311-x86_64-linux-gnu.so": lib,
            "pkg/include/pkg.h": b"int x;\n",
            "pkg/libk.so": lib,
            "pkg/_vendor/v-2.0.dist-info/RECORD": b"v/__init__.py,,\n",  # a vendored package's: a plain file
        },
    )
    archive = tmp_path / "out" / "slim.tar.xz"
    assert (
        slim_wheels.main(["pack", str(archive), str(wheel), "--python", "312", "--drop", "*/include/*"]) == 0
    )
    assert archive.stat().st_size < len(lib)
    target = tmp_path / "site"
    names = slim_wheels.install(archive, target)
    (target / "pkg/__init__.py").write_text("changed")  # a second install of the same archive is a no-op
    assert slim_wheels.install(archive, target) == names == [wheel.name]
    assert (target / "pkg/__init__.py").read_text() == "changed"
    slim_wheels.main(["install", str(archive), "--target", str(target / "fresh")])  # the CLI, elsewhere
    target = target / "fresh"
    installed = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert "pkg/_ext.cpython-312-x86_64-linux-gnu.so" in installed and "pkg/libk.so" in installed
    assert (target / "pkg/_vendor/v-2.0.dist-info/RECORD").read_bytes() == b"v/__init__.py,,\n"
    assert (
        "pkg/_ext.cpython-311-x86_64-linux-gnu.so" not in installed and "pkg/include/pkg.h" not in installed
    )
    assert (target / "pkg/__init__.py").read_bytes() == b"ANSWER = 42\n"
    for name in ("pkg/libk.so", "pkg/_ext.cpython-312-x86_64-linux-gnu.so"):
        assert list(_images((target / name).read_bytes())) == [("cubin", 90)]
    with zipfile.ZipFile(wheel) as z:
        assert "pkg/include/pkg.h" in z.namelist()  # the source wheel is untouched
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(archive, unpacked)
    with zipfile.ZipFile(unpacked / "wheels" / wheel.name) as z:  # the slimmed wheel's own RECORD
        _assert_record_matches(z, "pkg-1.0.dist-info/RECORD")


def test_a_wheel_without_its_own_record_is_refused(tmp_path):
    """Only the top-level .dist-info/RECORD is the wheel's: a vendored one does not make a wheel of a zip
    without it (pip would refuse the slimmed wheel on the GPU machine)."""
    bad = tmp_path / "b-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("b/__init__.py", "")
        z.writestr("b/_vendor/v-2.0.dist-info/RECORD", "v/__init__.py,,\n")
    with pytest.raises(ValueError, match="not a wheel"):
        slim_wheels.slim_wheel(bad, tmp_path / "out.whl", python="312", sm=90, drop=[])


def test_install_refuses_a_corrupted_archive(cuda_lib, tmp_path):
    wheel = _wheel(
        tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/__init__.py": b"", "pkg/libk.so": cuda_lib.read_bytes()}
    )
    archive = tmp_path / "slim.tar.xz"
    slim_wheels.pack(archive, [wheel], python="312", sm=90, drop=[])
    # rebuild the archive with one byte of the wheel changed, the sums left as they were
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(archive, unpacked)
    inner = next((unpacked / "wheels").glob("*.whl"))
    content = bytearray(inner.read_bytes())
    content[len(content) // 2] ^= 0xFF
    inner.write_bytes(bytes(content))
    bad = Path(shutil.make_archive(str(tmp_path / "bad"), "xztar", unpacked))
    with pytest.raises(RuntimeError, match="does not match its SHA-256 sum"):
        slim_wheels.install(bad, tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="is not a .whl file"):
        slim_wheels.pack(tmp_path / "x.tar.xz", [tmp_path / "missing.whl"], python="312", sm=90, drop=[])


def test_make_wheel_installs_with_pip_and_imports(tmp_path):
    (tmp_path / "mod.py").write_text("VALUE = 7\n")
    wheel = slim_wheels.make_wheel(
        tmp_path / "dist", "prebuilt_mod", "1.2.3", "py3-none-any", {"prebuilt_mod.py": tmp_path / "mod.py"}
    )
    assert wheel.name == "prebuilt_mod-1.2.3-py3-none-any.whl"
    target = tmp_path / "site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--target",
        str(target),
        str(wheel),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    code = (
        "import importlib.metadata as m, prebuilt_mod; print(prebuilt_mod.VALUE, m.version('prebuilt_mod'))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target)},
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.split() == ["7", "1.2.3"], res.stderr
    with zipfile.ZipFile(wheel) as z:
        _assert_record_matches(z, "prebuilt_mod-1.2.3.dist-info/RECORD")
    with pytest.raises(ValueError, match="not a wheel's"):
        slim_wheels.make_wheel(tmp_path, "bad-name", "1", "py3-none-any", {})
