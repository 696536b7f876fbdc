"""Python side of the CUDA extension ``kernels._C`` (csrc/): availability and checked wrappers.

kernels._C is a plain pybind11 module built by setup.py with nvcc (static cudart, so importing it
needs no driver). Its functions take raw device addresses; the wrappers here validate every tensor
(device, dtype, shape, contiguity, memory overlap) and raise a ValueError naming the input before
any pointer reaches a kernel. Launches go on torch's current stream of the tensors' device.
"""

from __future__ import annotations

import functools
import re
import struct

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def _module():
    """(module, None) or (None, reason)."""
    try:
        from kernels import _C
    except ImportError as e:
        return None, f"kernels._C is not built ({e}); see csrc/README.md"
    return _C, None


def fatbin_archs(path: str) -> list[str] | None:
    """The GPU code a shared library embeds (its ELF .nv_fatbin section), named as nvcc's -gencode code=
    names it: "sm_90a" (SASS), "compute_90" (PTX); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:5] != b"\x7fELF\x02" or data[5] != 1:  # 64-bit little-endian ELF only
            return None
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<3H", data, 0x3A)
        secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names = secs[shstrndx][4]
        archs: set[str] = set()
        for name_off, _, _, _, off, size in secs:
            if data[names + name_off : data.index(b"\0", names + name_off)] != b".nv_fatbin":
                continue
            end = off + size
            while off + 16 <= end:  # fatbins one after another, 8-byte aligned
                magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, off)
                if magic != 0xBA55ED50:
                    off += 8
                    continue
                p, stop = off + hsize, off + hsize + fsize
                while p + 48 <= stop:  # entries: kind 1 PTX, 2 ELF; arch 90 = 9.0; flag bits 'a' / 'f'
                    kind, _, ehsize, esize = struct.unpack_from("<HHIQ", data, p)
                    (arch,), (flags,) = (
                        struct.unpack_from("<I", data, p + 28),
                        struct.unpack_from("<Q", data, p + 40),
                    )
                    suffix = "a" if flags & 0x100000 else ("f" if flags & 0x200000 else "")
                    archs.add(f"{'compute' if kind == 1 else 'sm'}_{arch}{suffix}")
                    p += max(ehsize + esize, 48)
                off = max(stop, off + 8)
        return sorted(archs) or None
    except (OSError, struct.error, ValueError, IndexError):
        return None


def arch_runs_on(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code built for archs ("sm_80", "sm_90a", "compute_90", ...) runs on a GPU of this compute
    capability: SASS sm_XY on X.Z with Z >= Y, PTX compute_XY (JIT) on any X.Y or newer, "a" code on X.Y
    alone, "f" (family) code on X.Z with Z >= Y."""
    for name in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", name)
        if m is None:
            continue
        major, minor = divmod(int(m.group(2)), 10)
        if m.group(3) == "a":
            ok = tuple(capability) == (major, minor)
        elif m.group(1) == "sm" or m.group(3) == "f":
            ok = capability[0] == major and capability[1] >= minor
        else:
            ok = tuple(capability) >= (major, minor)
        if ok:
            return True
    return False


@functools.cache
def built_archs() -> list[str] | None:
    """The architectures kernels._C holds code for (fatbin_archs), or None when not built / not readable."""
    mod, _ = _module()
    return fatbin_archs(mod.__file__) if mod is not None else None


def load_error(device: torch.device | int | None = None) -> str | None:
    """Why the extension cannot be used on device (default: the current one) here (not built, no driver, no
    device, no code for its architecture), or None."""
    mod, err = _module()
    if mod is None:
        return err
    try:
        n = mod.device_count()
    except RuntimeError as e:
        return str(e)
    if n == 0:
        return "kernels._C: no CUDA device visible"
    archs = built_archs()
    try:
        cap = torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError):  # a torch without CUDA: no CUDA tensor reaches the wrappers
        return None
    if archs is not None and not arch_runs_on(cap, archs):
        return (
            f"kernels._C holds code for {', '.join(archs)}, none of which runs on compute capability "
            f"{cap[0]}.{cap[1]}: rebuild with WMSD_CUDA_ARCHS naming it (csrc/README.md)"
        )
    return None


def available(device: torch.device | int | None = None) -> bool:
    """True when kernels._C is built and the CUDA device (default: the current one) can run it."""
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        device = device.index
    if device is None and torch.cuda.is_available():
        device = torch.cuda.current_device()
    return _available(device)


@functools.cache
def _available(index: int | None) -> bool:
    return load_error(index) is None


def _require() -> object:
    mod, err = _module()
    if mod is None:
        raise RuntimeError(err)
    return mod


def _check_cuda_tensor(
    name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":  # was "expected the CUDA device cpu" when x (or q) itself was on the CPU
        raise ValueError(f"{name}: on {t.device}, expected a CUDA tensor")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected the CUDA device {device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype}, expected {dtype}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses touched by t's elements."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two indices of t address the same memory (e.g. expanded or stride-0 views)."""
    extent = 1  # elements spanned by the dims of smaller stride
    for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if s < extent:
            return True
        extent = s * (n - 1) + extent
    return False


def _as_times(t: float | torch.Tensor, name: str, B: int, device: torch.device) -> torch.Tensor | None:
    """None for a python float, else a (B,) float32 contiguous tensor on device."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dim() == 0:
        t = t.reshape(1).expand(B)
    if t.shape != (B,):
        raise ValueError(f"{name}: expected a float or a ({B},) tensor, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def flow_step(
    x: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kernels/sampler.py's flow_step on the CUDA kernel (no autograd). All tensors: same CUDA device,
    same dtype (fp32/fp16/bf16), same shape, contiguous. 128-bit loads when every pointer is 16-byte
    aligned and the per-sample size allows, scalar loads otherwise."""
    mod = _require()
    if x.dtype not in DTYPE_CODES:
        raise ValueError(f"x: dtype {x.dtype}, expected one of {list(DTYPE_CODES)}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected a (B, ...) tensor with B > 0, got shape {tuple(x.shape)}")
    B = x.shape[0]
    N = x.numel() // B
    mode = 0 if sigma == 0.0 else (2 if x_next is not None else 1)
    if mode == 1 and noise is None:
        noise = torch.randn_like(x)
    named = [("x", x), ("v_cond", v_cond), ("v_uncond", v_uncond), ("noise", noise), ("x_next", x_next)]
    for name, a in named:
        if a is None and name != "v_cond":  # v_cond is required: None would pass a null pointer
            continue
        _check_cuda_tensor(name, a, x.device, x.dtype)
        if a.shape != x.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)}, expected x's {tuple(x.shape)}")
        if not a.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (strides {a.stride()})")
    from kernels.sampler import _check_float_times, _check_inputs

    _check_inputs(x, v_cond, v_uncond, noise, x_next, sigma)  # sigma, and x_next / noise given with it
    _check_float_times(t, t_next, sigma, B)  # NaN from bad host times, as flow_step checks them
    tt, tn = _as_times(t, "t", B, x.device), _as_times(t_next, "t_next", B, x.device)
    if (tt is None) != (tn is None):
        tt = tt if tt is not None else torch.full((B,), float(t), device=x.device)
        tn = tn if tn is not None else torch.full((B,), float(t_next), device=x.device)
    out = x_next if mode == 2 else torch.empty_like(x)
    if N == 0:  # empty samples (the launcher refuses N = 0): as the torch path, a zero log-prob
        return out, torch.zeros((B,), device=x.device, dtype=torch.float32) if mode else None
    ptrs = [a.data_ptr() if a is not None else 0 for _, a in named]
    aligned = all(p % 16 == 0 for p in ptrs + [out.data_ptr()])
    n_blocks, _ = mod.flow_step_plan(N, DTYPE_CODES[x.dtype], aligned)
    part = torch.empty((B, n_blocks), device=x.device, dtype=torch.float32) if mode else None
    logprob = torch.empty((B,), device=x.device, dtype=torch.float32) if mode else None
    mod.flow_step(
        *ptrs,
        0 if mode == 2 else out.data_ptr(),
        part.data_ptr() if mode else 0,
        n_blocks,
        logprob.data_ptr() if mode else 0,
        tt.data_ptr() if tt is not None else 0,
        tn.data_ptr() if tn is not None else 0,
        0.0 if tt is not None else float(t),
        0.0 if tn is not None else float(t_next),
        float(guidance),
        float(sigma),
        B,
        N,
        DTYPE_CODES[x.dtype],
        mode,
        x.device.index,
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    return out, logprob


def _period_extent(dims: list[tuple[int, int]], d: int, period: int) -> int | None:
    """Elements of one period that rows (size, stride) dims of d contiguous elements span, or None when a
    stride >= period is not a multiple of it."""
    if any(st >= period and st % period for _, st in dims):
        return None
    return sum((n - 1) * st for n, st in dims if st < period) + d


def _check_qk_disjoint(q: torch.Tensor, k: torch.Tensor) -> None:
    """q and k are written in place: they must not share an element. Views of one fused qkv tensor are
    accepted, token-major (B, S, 3, H, D) and head-major (B, 3, H, S, D) alike: some period P (one of q's
    strides) divides every larger stride of q and k, and within a period q and k fill disjoint ranges
    (the head-major layout was refused as overlapping: its token stride is no such period)."""
    if not _spans_overlap(q, k):
        return
    delta = (k.data_ptr() - q.data_ptr()) // q.element_size()
    qdims = [(n, st) for n, st in zip(q.shape[:3], q.stride()[:3]) if n > 1]
    kdims = [(n, st) for n, st in zip(k.shape[:3], k.stride()[:3]) if n > 1]
    for period in sorted({st for _, st in qdims if st > 0}):
        q_ext, k_ext = _period_extent(qdims, q.shape[3], period), _period_extent(kdims, k.shape[3], period)
        if q_ext is not None and k_ext is not None and q_ext <= delta % period <= period - k_ext:
            return
    raise ValueError("q and k overlap in memory; they are updated in place and must be disjoint")


def qk_norm_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_over: str = "head",
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place fused RMSNorm + interleaved RoPE of q (B, S, Hq, D) and k (B, S, Hk, D), one launch
    (math in kernels/qk_norm_rope.py). q/k: same CUDA device and dtype, last dim contiguous, strided
    (b, s, h) allowed; weights and tables are used as float32."""
    from kernels.qk_norm_rope import _check as _check_shapes

    _check_shapes(q, k, wq, wk, cos, sin, norm_over)  # the kernel indexes k, weights, tables with q's sizes
    mod = _require()
    _check_cuda_tensor("q", q, q.device)
    _check_cuda_tensor("k", k, q.device, q.dtype)
    if q.dtype not in DTYPE_CODES:
        raise ValueError(f"q: dtype {q.dtype}, expected one of {list(DTYPE_CODES)}")
    for name, a in (("q", q), ("k", k)):
        if a.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head) dim must be contiguous, strides {a.stride()}")
        if _self_overlapping(a):
            raise ValueError(f"{name}: has self-overlapping memory (expanded view?), strides {a.stride()}")
    _check_qk_disjoint(q, k)
    tabs = []
    for name, a in (("wq", wq), ("wk", wk), ("cos", cos), ("sin", sin)):
        _check_cuda_tensor(name, a, q.device)
        a = a.to(torch.float32).contiguous()
        if _spans_overlap(a, q) or _spans_overlap(a, k):
            raise ValueError(f"{name}: overlaps q or k in memory")
        tabs.append(a)
    if q.numel() == 0 and k.numel() == 0:  # no token, head or feature: nothing to do (the launcher refuses)
        return q, k
    B, S, Hq, D = q.shape
    mod.qk_norm_rope(
        q.data_ptr(),
        k.data_ptr(),
        *(a.data_ptr() for a in tabs),
        B,
        S,
        Hq,
        k.shape[2],
        D,
        *q.stride()[:3],
        *k.stride()[:3],
        float(eps),
        norm_over == "all",
        DTYPE_CODES[q.dtype],
        q.device.index,
        torch.cuda.current_stream(q.device).cuda_stream,
    )
    return q, k
