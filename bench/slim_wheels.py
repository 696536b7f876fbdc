"""Make wheels small enough to carry to the lent GPU machine in one device call, and install them there.

    python -m bench.slim_wheels pack OUT.tar.xz WHEEL... [--python 312] [--sm 90] [--drop GLOB ...]
    python -m bench.slim_wheels install OUT.tar.xz --target /tmp/site      # there: no network needed
    python -m bench.slim_wheels list LIB.so...                             # the GPU images in a library
    python -m bench.slim_wheels wheel OUT_DIR NAME VERSION TAG ARCNAME=PATH...   # a wheel of prebuilt files

A device call carries at most 64 MiB, and the wheels the GPU image lacks are larger: DALI with its
dependencies is 247 MB, Transformer Engine's core library 276 MB. Most of that is what the machine never
uses. ``pack`` rewrites each wheel keeping only

* the CPython extension modules for one Python (``--python 312``: the GPU image's), the others dropped;
* in every ELF shared library, the GPU code for one architecture (``--sm 90``: H100/H200): each fat
  binary container in the ``.nv_fatbin`` and ``__nv_relfatbin`` sections keeps its sm_90 cubins and loses
  the cubins of other architectures and its PTX, compacted in place (the container keeps its offset and
  the library its size and layout; the freed bytes are zeroed, which xz then stores in almost nothing).
  A container with no cubin for the architecture is left whole, so nothing that could run is removed.
  The CUDA driver picks an exact-architecture cubin before any other image, so on the target GPU it
  loads what it would have loaded from the full wheel;
* the libraries' dynamic symbols, with the static symbol tables (names for debuggers) zeroed in place,
  unless ``--keep-symbols``;
* the files not matched by ``--drop`` globs (e.g. ``*/include/*``);

then writes the wheels (RECORD rewritten) uncompressed into one xz tarball with their SHA-256 sums. DALI
2.4.0 with its dependencies: 247 MB of wheels -> 49.8 MiB; TE 2.20.2's core: 276 MB -> ~24 MiB
(``bench/README.md`` has the commands).
``install`` checks the sums and ``pip install --no-deps --no-index`` s the wheels into ``--target``.
Only the Python standard library is used, so both ends need nothing installed.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_CUBIN = 1, 2
EXT_MODULE = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")


@dataclass(frozen=True)
class Image:
    """One entry of a fat binary container: a cubin (kind 2) or PTX (kind 1) for an architecture."""

    offset: int  # of the entry header, in the file
    size: int  # header + payload
    kind: int
    arch: int  # e.g. 90 for sm_90


@dataclass
class Container:
    offset: int  # of the container header, in the file
    header_size: int
    images: list[Image]


def _elf_section(data: bytes | bytearray, name: str) -> tuple[int, int] | None:
    """(file offset, size) of a section of a little-endian ELF64 file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(data):
        return None
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    want = name.encode()
    for name_index, _type, _flags, _addr, offset, size in headers:
        start = names_offset + name_index
        if data[start : start + len(want) + 1] == want + b"\0":
            return offset, size
    return None


FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")  # loaded images; relocatable ones for device linking
SYMBOL_SECTIONS = (".symtab", ".strtab")  # the static symbol table: the loader reads .dynsym/.dynstr only


def fatbin_containers(data: bytes | bytearray) -> list[Container]:
    """The fat binary containers in an ELF file's fat binary sections (empty if it has none)."""
    containers = []
    for name in FATBIN_SECTIONS:
        section = _elf_section(data, name)
        if section is not None:
            containers += _containers(data, *section)
    return containers


def _containers(data: bytes | bytearray, offset: int, size: int) -> list[Container]:
    pos, end = offset, offset + size
    containers = []
    while pos + 16 <= end:
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            pos += 8
            continue
        images, entry, body_end = [], pos + header_size, pos + header_size + body_size
        if body_end > end:
            raise ValueError(f"fat binary container at {pos:#x} runs past its section")
        while entry < body_end:
            kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            if entry_header < 32 or entry + entry_header + payload > body_end:
                raise ValueError(f"fat binary entry at {entry:#x} is malformed")
            images.append(Image(entry, entry_header + payload, kind, arch))
            entry += entry_header + payload
        containers.append(Container(pos, header_size, images))
        pos = body_end
    return containers


def prune_fatbins(data: bytearray, sm: int) -> tuple[int, int]:
    """Keep only the sm_``sm`` cubins in each container that has one; returns (bytes freed, containers kept whole)."""
    freed = whole = 0
    for container in fatbin_containers(data):
        keep = [im for im in container.images if im.kind == KIND_CUBIN and im.arch == sm]
        if not keep:
            whole += 1
            continue
        body = b"".join(bytes(data[im.offset : im.offset + im.size]) for im in keep)
        start = container.offset + container.header_size
        old_size = sum(im.size for im in container.images)
        data[start : start + len(body)] = body
        data[start + len(body) : start + old_size] = bytes(old_size - len(body))
        struct.pack_into("<Q", data, container.offset + 8, len(body))
        freed += old_size - len(body)
    return freed, whole


def zero_symbol_tables(data: bytearray) -> int:
    """Zero the static symbol table (names for debuggers; the dynamic loader never reads it); returns bytes zeroed.

    Done in place rather than with ``strip``, which can break libraries that auditwheel has patched."""
    zeroed = 0
    for name in SYMBOL_SECTIONS:
        section = _elf_section(data, name)
        if section is not None and section[0] + section[1] <= len(data):
            data[section[0] : section[0] + section[1]] = bytes(section[1])
            zeroed += section[1]
    return zeroed


def _record_line(name: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(content)}"


def _record(lines: list[str], record_name: str) -> str:
    """A wheel's RECORD: the files' lines (:func:`_record_line`), then the RECORD itself, unhashed."""
    return "\n".join([*lines, f"{record_name},,"]) + "\n"


def slim_wheel(
    src: Path, dest: Path, *, python: str, sm: int, drop: list[str], keep_symbols: bool = False
) -> dict:
    """Write ``dest``: ``src`` without other Pythons' extension modules, other GPUs' code and ``drop``."""
    stats = {"wheel": src.name, "files_dropped": 0, "fatbin_bytes_freed": 0, "containers_kept_whole": 0,
             "symbol_bytes_zeroed": 0}  # fmt: skip
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        records, record_name = [], None
        for info in zin.infolist():
            name = info.filename
            # the wheel's own RECORD, not a vendored package's
            if name.endswith(".dist-info/RECORD") and name.count("/") == 1:
                record_name = name
                continue
            ext = EXT_MODULE.search(name)
            if (ext and ext.group(1) != python) or any(fnmatch.fnmatch(name, g) for g in drop):
                stats["files_dropped"] += 1
                continue
            content = zin.read(info)
            if content[:4] == b"\x7fELF":
                buf = bytearray(content)
                freed, whole = prune_fatbins(buf, sm)
                stats["fatbin_bytes_freed"] += freed
                stats["containers_kept_whole"] += whole
                if not keep_symbols:
                    stats["symbol_bytes_zeroed"] += zero_symbol_tables(buf)
                content = bytes(buf)
            out = zipfile.ZipInfo(name, date_time=info.date_time)
            out.external_attr = info.external_attr
            zout.writestr(out, content)
            if not name.endswith("/"):
                records.append(_record_line(name, content))
        if record_name is None:
            raise ValueError(f"{src}: not a wheel (no .dist-info/RECORD)")
        zout.writestr(record_name, _record(records, record_name))
    return stats


def make_wheel(out_dir: Path, name: str, version: str, tag: str, files: dict[str, Path]) -> Path:
    """Write ``{name}-{version}-{tag}.whl`` holding ``files`` (path in the wheel -> file here), with its
    dist-info (METADATA, WHEEL, RECORD): how a prebuilt extension module becomes installable by pip."""
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name) or not re.fullmatch(r"[^-]+-[^-]+-[^-]+", tag):
        raise ValueError(
            f"make_wheel: name {name!r} or tag {tag!r} is not a wheel's (tag: python-abi-platform)"
        )
    dist = f"{name}-{version}.dist-info"
    purelib = "true" if tag.endswith("-none-any") else "false"
    contents = {arc: Path(src).read_bytes() for arc, src in files.items()}
    contents[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{dist}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: bench.slim_wheels\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n"
    ).encode()
    out = Path(out_dir) / f"{name}-{version}-{tag}.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for arc, content in contents.items():
            info = zipfile.ZipInfo(arc, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = 0o755 << 16 if arc.endswith(".so") else 0o644 << 16
            z.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED)
        records = [_record_line(arc, content) for arc, content in contents.items()]
        z.writestr(f"{dist}/RECORD", _record(records, f"{dist}/RECORD"))
    return out


def pack(
    out: Path, wheels: list[Path], *, python: str, sm: int, drop: list[str], keep_symbols: bool = False
) -> list[dict]:
    """Slim each wheel and write them, with SHA256SUMS, into the xz tarball ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        slim_dir = Path(tmp, "wheels")
        slim_dir.mkdir()
        stats, sums = [], []
        for wheel in wheels:
            if not wheel.is_file() or wheel.suffix != ".whl":
                raise FileNotFoundError(f"slim_wheels pack: {wheel} is not a .whl file")
            dest = slim_dir / wheel.name
            stats.append(slim_wheel(wheel, dest, python=python, sm=sm, drop=drop, keep_symbols=keep_symbols))
            sums.append(f"{hashlib.sha256(dest.read_bytes()).hexdigest()}  {wheel.name}")
            print(f"slim_wheels: {stats[-1]}", flush=True)
        (slim_dir / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        # x86 branch filter + LZMA2 preset 9: ~10% smaller than plain preset 6 on these libraries
        if shutil.which("xz"):  # multithreaded; the stdlib's lzma is single-threaded
            with open(out, "wb") as f:
                tar = subprocess.Popen(["tar", "-cf", "-", "-C", tmp, "wheels"], stdout=subprocess.PIPE)
                xz = ["xz", "-T0", "--x86", "--lzma2=preset=9", "-c"]
                subprocess.run(xz, stdin=tar.stdout, stdout=f, check=True)
                if tar.wait() != 0:
                    raise RuntimeError("slim_wheels pack: tar failed")
        else:
            filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
            with lzma.open(out, "wb", filters=filters) as f, tarfile.open(fileobj=f, mode="w") as tar:
                tar.add(slim_dir, arcname="wheels")
    print(f"slim_wheels: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return stats


def install(archive: Path, target: Path) -> list[str]:
    """Unpack ``archive``, check the sums, and pip-install its wheels into ``target`` (no network).

    A marker in ``target`` named by the archive's hash makes a second install of the same archive (a later
    call on the same warm machine) a no-op."""
    marker = Path(target) / f".slim_wheels-{hashlib.sha256(Path(archive).read_bytes()).hexdigest()[:16]}"
    if marker.is_file():
        print(f"slim_wheels: {archive} is already installed in {target}")
        return marker.read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(tmp, filter="data")
            else:  # the same refusals by hand: no absolute paths, no "..", no links or devices
                for m in tar.getmembers():
                    if (
                        Path(m.name).is_absolute()
                        or ".." in Path(m.name).parts
                        or not (m.isfile() or m.isdir())
                    ):
                        raise RuntimeError(
                            f"slim_wheels install: {archive} holds {m.name!r}, not a plain file"
                        )
                tar.extractall(tmp)
        folder = Path(tmp, "wheels")
        wheels = []
        for line in (folder / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
                raise RuntimeError(f"slim_wheels install: {name} in {archive} does not match its SHA-256 sum")
            wheels.append(str(folder / name))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*cmd, "--no-cache-dir", "--upgrade", "--target", str(target), *wheels], check=True)
    names = [Path(w).name for w in wheels]
    marker.write_text("\n".join(names) + "\n")
    print(f"slim_wheels: installed {len(names)} wheel(s) into {target}: {' '.join(names)}")
    return names


def describe(path: Path) -> str:
    data = path.read_bytes()
    counts: dict[tuple[str, int], list[int]] = {}
    for container in fatbin_containers(data):
        for im in container.images:
            key = ("ptx" if im.kind == KIND_PTX else "cubin", im.arch)
            counts.setdefault(key, [0, 0])
            counts[key][0] += 1
            counts[key][1] += im.size
    lines = [f"{path}: {len(data) / 1e6:.1f} MB"]
    lines += [
        f"  {kind} sm_{arch}: {n} image(s), {size / 1e6:.2f} MB"
        for (kind, arch), (n, size) in sorted(counts.items())
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slim_wheels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="slim wheels into one xz tarball")
    p.add_argument("out", type=Path, help="the .tar.xz to write")
    p.add_argument("wheels", type=Path, nargs="+")
    p.add_argument(
        "--python", default="312", help="CPython tag whose extension modules to keep (default 312)"
    )
    p.add_argument("--sm", type=int, default=90, help="GPU architecture whose cubins to keep (default 90)")
    p.add_argument(
        "--drop", action="append", default=[], help="glob of wheel paths to leave out (repeatable)"
    )
    p.add_argument("--keep-symbols", action="store_true", help="keep the libraries' static symbol tables")
    i = sub.add_parser("install", help="check and pip-install a tarball written by pack")
    i.add_argument("archive", type=Path)
    i.add_argument("--target", type=Path, required=True, help="folder to install into (pip --target)")
    w = sub.add_parser("wheel", help="make a wheel of prebuilt files (e.g. a cross-built extension module)")
    w.add_argument("out_dir", type=Path)
    w.add_argument("name")
    w.add_argument("version")
    w.add_argument("tag", help="python-abi-platform, e.g. cp312-cp312-linux_x86_64")
    w.add_argument(
        "files", nargs="+", help="ARCNAME=PATH: where the file goes in the wheel, and where it is here"
    )
    ls = sub.add_parser("list", help="the GPU images (cubins, PTX) in ELF libraries")
    ls.add_argument("libs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "pack":
        if not re.fullmatch(r"\d+t?", args.python):
            parser.error(f"--python: expected a CPython tag such as 312, got {args.python!r}")
        pack(
            args.out,
            args.wheels,
            python=args.python,
            sm=args.sm,
            drop=args.drop,
            keep_symbols=args.keep_symbols,
        )
    elif args.command == "install":
        install(args.archive, args.target)
    elif args.command == "wheel":
        pairs = [f.split("=", 1) for f in args.files]
        if any(len(p) != 2 for p in pairs):
            parser.error("wheel: files are given as ARCNAME=PATH")
        print(make_wheel(args.out_dir, args.name, args.version, args.tag, dict(pairs)))
    else:
        for lib in args.libs:
            print(describe(lib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
