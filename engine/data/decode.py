"""Video decoders behind one interface: DALI on the GPU, DALI on the CPU, PyAV everywhere.

A decoder turns an encoded file plus a list of frame indices into uint8 frames ``(T, H, W, 3)`` RGB,
as a torch tensor on the decoder's device. :func:`probe` reads the container with PyAV (no pixel
decoding) to learn codec, size, pixel format, frame rate and frame count, which frame sampling needs
before any decoder runs.

Which decoder takes a file (``decoder="auto"``), as measured on this stack (DALI 2.x, PyAV 18):

====================  =====================================  ===================================
backend               codecs                                 where
====================  =====================================  ===================================
``dali`` (mixed)      h264, hevc, av1, mpeg4, vp8, vp9, mjpeg  NVDEC on a CUDA device
``dali_cpu``          vp8, vp9, mjpeg                        DALI's libavcodec CPU path
``pyav``              anything FFmpeg decodes                CPU, the fallback
====================  =====================================  ===================================

``auto`` tries the backends in that table's order, each that is available and supports the codec, until
one decodes the file: PyAV takes what DALI rejects. ``dali`` is NVDEC, then DALI's CPU path for a file
NVDEC refuses (an H100's NVDEC takes VP9 from 128 x 128 only, H.264 smaller). NVDEC needs the driver's
library (``libnvcuvid.so.1``; a container has it only with ``NVIDIA_DRIVER_CAPABILITIES`` including
``video``): without it ``auto`` uses ``dali_cpu`` with a warning, and ``dali`` is an error that says so.
DALI errors leave its pipeline unusable, so a failed pipeline is rebuilt (building one costs ~5 ms).

FFmpeg's VP9 decoder (PyAV's and DALI's) conceals damaged data without an error, so the dataset first decodes a
VP9 clip's packets with libvpx (:func:`check_vp9`, ~42 ms for 33 480p frames on one CPU core), which rejects
them; :func:`probe` rejects a Matroska/WebM or MP4/MOV file shorter than its container says (a truncated copy).

Measured on an H100 (bench/results/20261127_nvidia-h100.md): NVDEC decodes H.264 68-81x and VP9 15x as
fast as PyAV, DALI's CPU path VP9 9.4x.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from engine.log import get_logger

log = get_logger("data")

DALI_GPU_CODECS = frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# 8-bit pixel formats every backend turns into RGB24 the same way (yuv_to_rgb: DALI's conversion; nv12, which
# software decoders do not output, via swscale); others (10-bit, alpha, palette) are rejected by the dataset
# as an unexpected pixel format rather than silently converted.
SUPPORTED_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12"})
DECODERS = ("auto", "dali", "dali_cpu", "pyav")


class DecodeError(RuntimeError):
    """A file could not be decoded into the requested frames; the message says why."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns from the container: enough to pick frames and a decoder."""

    codec: str
    width: int
    height: int
    pix_fmt: str
    fps: float
    # counted from the demuxed video packets, less those an edit list discards (container counts are often
    # missing)
    num_frames: int
    # presentation times (s, from the first frame, sorted) of the frames, or () where packets lack them:
    # frame sampling goes by time for a variable-frame-rate file (engine.data.transforms.frame_indices)
    timestamps: tuple[float, ...] = ()
    # degrees the container's display matrix turns the stored frames counterclockwise for display (a phone's
    # portrait video is stored landscape with -90 or 90); the decoders give the stored frames
    rotation: int = 0
    # width / height of a stored pixel (the sample aspect ratio; anamorphic video: DV, DVD, broadcast): players
    # show a frame w * pixel_aspect wide; the decoders give the stored frames
    pixel_aspect: float = 1.0


def _display_rotation(ctx, packet) -> int | None:
    """The display rotation (a multiple of 90) of the first frame ``ctx`` gives for ``packet`` (None: no frame
    yet; the packet None flushes), read from the display matrix the decoder attaches to every frame."""
    import av

    try:
        frames = ctx.decode(packet)
    except (av.error.FFmpegError, ValueError, OSError):
        return 0  # the pixel decoders report a stream they cannot decode
    return (round(frames[0].rotation / 90) * 90 + 180) % 360 - 180 if frames else None


def _ebml_vint(b: bytes, i: int, *, marker: bool = False) -> tuple[int, int]:
    """The EBML variable-length integer at ``b[i]``: (value, length in bytes); IDs keep their length marker."""
    n = next((k for k in range(1, 9) if b[i] & (0x80 >> (k - 1))), 8)
    v = b[i] if marker else b[i] & (0xFF >> n)
    for k in range(1, n):
        v = (v << 8) | b[i + k]
    return v, n


def _matroska_end(p: Path) -> int | None:
    """Where a Matroska/WebM file's Segment says the file ends (None: another container, or a segment of unknown
    size, as live writers leave it). FFmpeg's demuxer reads a truncated file to where it stops, without an error."""
    with p.open("rb") as f:
        head = f.read(64)
    try:
        if head[:4] != b"\x1a\x45\xdf\xa3":
            return None
        i = 4
        size, n = _ebml_vint(head, i)
        i += n + size  # past the EBML header
        seg, n = _ebml_vint(head, i, marker=True)
        if seg != 0x18538067:
            return None
        i += n
        size, n = _ebml_vint(head, i)
        return None if size == (1 << (7 * n)) - 1 else i + n + size
    except IndexError:
        return None


def _isobmff_end(p: Path) -> int | None:
    """Where an MP4/MOV (ISO BMFF) file's top-level boxes say it ends (None: another container, or a last box
    that runs to the end of the file, size 0). A copy cut short keeps a faststart file's index (moov first), and
    FFmpeg's demuxer gives the frames before the cut without an error."""
    size_on_disk = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8 or head[4:8] not in (b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide"):
            return None
        at = 0
        while at < size_on_disk:
            f.seek(at)
            h = f.read(16)
            if len(h) < 8:
                return None  # a few trailing bytes, not a box: some writers pad
            size = int.from_bytes(h[:4], "big")
            if size == 1:  # 64-bit size after the type
                if len(h) < 16:
                    return at + 16
                size = int.from_bytes(h[8:16], "big")
            elif size == 0:
                return None  # the last box, to the end of the file
            if size < 8:
                return None  # not a box layout we know: leave it to FFmpeg
            at += size
        return at


def probe(path: str | Path) -> VideoInfo:
    """Read a video's stream parameters with PyAV, without decoding pixels. Raises DecodeError."""
    import av

    p = Path(path)
    if p.is_dir():
        raise DecodeError(f"video '{p}': a folder, not a video file")
    if not p.is_file():
        raise DecodeError(f"video '{p}': file does not exist")
    if p.stat().st_size == 0:
        raise DecodeError(f"video '{p}': zero-length file")
    try:
        end = _matroska_end(p) or _isobmff_end(p)
    except OSError as e:  # unreadable (permissions, I/O error): a skip like any file PyAV cannot open
        raise DecodeError(f"video '{p}': cannot read file ({type(e).__name__}: {e})") from None
    if end is not None and p.stat().st_size < end:
        raise DecodeError(f"video '{p}': truncated file ({p.stat().st_size} bytes, its container says {end})")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise DecodeError(f"video '{p}': no video stream (not a video file?)")
            s = container.streams.video[0]
            ctx = s.codec_context
            rate = s.average_rate or s.guessed_rate or s.base_rate
            n, pts, rotation = 0, [], None
            for pkt in container.demux(s):
                if rotation is None and pkt.size > 0:
                    rotation = _display_rotation(ctx, pkt)
                # an edit list (an MP4 cut with stream copy) marks its pre-roll packets discard: decoders
                # (PyAV, DALI) drop those frames, so counting them would promise frames that never come
                if pkt.size > 0 and not pkt.is_discard:
                    n += 1
                    if pkt.pts is not None and pkt.time_base is not None:
                        pts.append(float(pkt.pts * pkt.time_base))
            pts.sort()
            if rotation is None:
                rotation = _display_rotation(ctx, None) or 0
            sar = s.sample_aspect_ratio or ctx.sample_aspect_ratio  # the container's, else the bitstream's
            return VideoInfo(
                # the format's name (av1), not the decoder PyAV picked for it (libdav1d), which no backend lists
                codec=ctx.codec.canonical_name or ctx.name,
                width=int(ctx.width),
                height=int(ctx.height),
                pix_fmt=str(ctx.pix_fmt or ""),
                fps=float(rate) if rate else 0.0,
                num_frames=n,
                timestamps=tuple(t - pts[0] for t in pts) if len(pts) == n and n else (),
                rotation=rotation,
                pixel_aspect=float(sar) if sar and sar > 0 else 1.0,
            )
    except DecodeError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(f"video '{p}': cannot read container ({type(e).__name__}: {e})") from None


class Decoder(Protocol):
    """Decode frames ``indices`` of each file into uint8 ``(T, H, W, 3)`` RGB tensors."""

    name: str
    device: torch.device

    def supports(self, codec: str) -> bool: ...

    def decode_batch(
        self, items: Sequence[tuple[Path, Sequence[int]]]
    ) -> list[torch.Tensor | DecodeError]: ...


def _check_indices(path: Path, indices: Sequence[int]) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx or min(idx) < 0:
        raise ValueError(f"video '{path}': frame indices must be a non-empty list of ints >= 0, got {idx}")
    return idx


def _resize_linear(c: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear resampling of ``c`` along ``axis`` to ``size`` samples with centred siting (bilinear,
    align_corners=False, edges clamped): out[i] reads c at (i + 0.5) * n / size - 0.5. At exactly 2x, out[2i] =
    3/4 c[i] + 1/4 c[i-1] and out[2i+1] = 3/4 c[i] + 1/4 c[i+1]."""
    n = c.shape[axis]
    if n == size:
        return c
    src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * c.ndim
    shape[axis] = size
    frac = (src - i0).astype(np.float32).reshape(shape)
    return np.take(c, i0, axis=axis) * (1 - frac) + np.take(c, i1, axis=axis) * frac


def yuv_to_rgb(y, u, v, *, full_range: bool = False) -> torch.Tensor:
    """8-bit planar ``y (..., H, W)`` and chroma ``u, v (..., Hc, Wc)`` (4:2:0, 4:2:2 or 4:4:4, odd sizes
    included) -> uint8 RGB ``(..., H, W, 3)``.

    The conversion DALI's decoder applies: chroma resized bilinearly to (H, W) with centred siting (for an
    odd width the 2x-subsampled plane is stretched by W / Wc, not cut from a 2x upsampling), then BT.601
    (Kr = 0.299, Kb = 0.114): Y' = (Y - 16) * 255/219, U' = (U - 128) * 255/224 (limited range; full range
    uses Y and U - 128); R = Y' + 2(1 - Kr) V', B = Y' + 2(1 - Kb) U', G = (Y' - Kr R - Kb B) / (1 - Kr - Kb).
    PyAV's own rgb24 path (swscale) differs from DALI by ~36-42 dB PSNR at colour edges; this one matches it
    to 1/255, so both backends give the same frames. NumPy, single-threaded: predictable inside data-loader
    workers.

    BT.601 for every file, a BT.709 tag (HD video) included, on purpose: DALI's decoders ignore the tag, and
    so does FFmpeg's swscale by default (decord, torchvision), the decoding pretrained video models saw. A
    709-tagged file's saturated colours come out up to ~28 levels off its true RGB, as in those pipelines.
    """
    y, u, v = (np.asarray(p, dtype=np.float32) for p in (y, u, v))
    h, w = y.shape[-2:]
    u, v = (_resize_linear(_resize_linear(c, c.ndim - 2, h), c.ndim - 1, w) for c in (u, v))
    u = u - 128.0
    v = v - 128.0
    if not full_range:
        y, u, v = (y - 16.0) * (255 / 219), u * (255 / 224), v * (255 / 224)
    kr, kb = 0.299, 0.114
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    rgb = np.stack([r, g, b], axis=-1)
    return torch.from_numpy(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


# planar 8-bit formats converted by yuv_to_rgb: name -> (vertical, horizontal) chroma subsampling
_PLANAR = {"yuv420p": (2, 2), "yuvj420p": (2, 2), "yuv422p": (1, 2), "yuvj422p": (1, 2), "yuv444p": (1, 1),
           "yuvj444p": (1, 1)}  # fmt: skip


def _frame_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V of a planar PyAV frame (a format of _PLANAR), without the line padding."""
    h, w = frame.height, frame.width
    sy, sx = _PLANAR[frame.format.name]
    planes = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in frame.planes]
    ch, cw = -(-h // sy), -(-w // sx)
    return planes[0][:h, :w].copy(), planes[1][:ch, :cw].copy(), planes[2][:ch, :cw].copy()


def _full_range(frame) -> bool:
    """The frame's samples span 0..255: a ``yuvj`` format, or ``color_range`` JPEG (as phones and current
    encoders mark a ``yuv420p`` stream); DALI reads the same flag."""
    return frame.format.name.startswith("yuvj") or int(getattr(frame, "color_range", 0) or 0) == 2


def frames_to_rgb(frames: list) -> torch.Tensor:
    """PyAV VideoFrames -> uint8 ``(T, H, W, 3)``: planar YUV via :func:`yuv_to_rgb`, else swscale.

    One frame at a time: the conversion's float32 temporaries of a whole clip took ~8x its uint8 RGB (6.5 GB
    for 49 1080p frames, per loader thread)."""
    sizes = {(f.width, f.height) for f in frames}
    if len(sizes) > 1:
        raise DecodeError(f"resolution changes within the stream: {sorted(sizes)}")
    fmts = {f.format.name for f in frames}
    w, h = sizes.pop()
    out = torch.empty((len(frames), h, w, 3), dtype=torch.uint8)
    if len(fmts) == 1 and fmts <= _PLANAR.keys():
        full = all(_full_range(f) for f in frames)
        for k, f in enumerate(frames):
            out[k] = yuv_to_rgb(*_frame_planes(f), full_range=full)
    else:
        for k, f in enumerate(frames):
            out[k] = torch.from_numpy(f.to_ndarray(format="rgb24"))
    return out


def _keyframe_plan(path: Path, first: int) -> tuple[int, dict[int, int]] | None:
    """Where to start decoding for frame ``first``, from the packets alone (no pixel decoding): ``(keyframe
    pts, pts -> frame index)``, the keyframe being the last one (in decode order) shown at
    or before frame ``first``. None where decoding from the start is as good or the packets cannot tell (no
    pts, duplicate pts, the first keyframe, B-frames whose packets' pts follow the decode order: AVI stores no
    presentation times, and a seek matched frames by pts to the wrong indices)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            shown, keys, decoded = [], [], []
            for pkt in container.demux(stream):
                if pkt.size <= 0:
                    continue
                if pkt.pts is None:
                    return None
                decoded.append(pkt.pts)
                if pkt.is_keyframe:
                    keys.append(pkt.pts)
                if not pkt.is_discard:  # frames an edit list drops are never output (as probe counts)
                    shown.append(pkt.pts)
            if stream.codec_context.has_b_frames and decoded == sorted(decoded):
                return None  # B-frames, yet pts in decode order: not the frames' presentation times
    except (av.error.FFmpegError, ValueError, OSError, IndexError):
        return None
    shown.sort()
    index = {t: k for k, t in enumerate(shown)}
    if len(index) != len(shown) or first >= len(shown):
        return None
    before = [j for j, pts in enumerate(keys) if pts <= shown[first]]
    if not before or before[-1] == 0:
        return None
    return keys[before[-1]], index


@functools.cache
def _libvpx_vp9() -> bool:
    import av

    if "libvpx-vp9" in av.codecs_available:
        return True
    log.warning("PyAV has no libvpx-vp9 decoder: damaged VP9 files are not detected")
    return False


def check_vp9(path: str | Path, indices: Sequence[int]) -> None:
    """Raise DecodeError where libvpx rejects a VP9 packet that frames ``indices`` depend on (from the keyframe at
    or before the first through the last). FFmpeg's VP9 decoder, which PyAV and DALI use, conceals damage: a
    file with garbage inside a frame's data decoded to wrong frames with no error and no corrupt flag."""
    import av

    if not _libvpx_vp9():
        return
    p = Path(path)
    idx = _check_indices(p, indices)
    plan = _keyframe_plan(p, min(idx))
    last, n, k = max(idx), 0, None
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            ctx = av.CodecContext.create("libvpx-vp9", "r")
            ctx.thread_count = 1
            for pkt in container.demux(stream):
                if pkt.size <= 0:
                    continue
                if plan is not None:
                    if n == 0 and not (pkt.is_keyframe and pkt.pts == plan[0]):
                        continue  # before the keyframe the clip starts from
                    k = plan[1].get(pkt.pts)
                else:
                    k = n
                n += 1
                ctx.decode(pkt)
                if k is not None and k >= last:
                    break
    except (av.error.FFmpegError, ValueError, OSError) as e:
        where = f"frame {k}" if k is not None else "a packet"
        raise DecodeError(f"video '{p}': damaged VP9 data at {where} ({type(e).__name__}: {e})") from None


class PyAVDecoder:
    """CPU decode with PyAV: from the keyframe at or before the clip's first frame (a seek), else from the start.

    Frame k is the k-th frame shown (presentation order, edit-list drops left out), as a decode from the start
    counts it: after a seek, decoded frames are matched to indices by their pts. Anything unexpected after the
    seek (a frame past the clip's first, an unknown pts, a decode error) falls back to decoding from the start.
    """

    name = "pyav"
    device = torch.device("cpu")

    def supports(self, codec: str) -> bool:
        return True

    def decode(self, path: Path, indices: Sequence[int]) -> torch.Tensor:
        idx = _check_indices(path, indices)
        frames = self._decode_from_keyframe(path, idx)
        if frames is None:
            frames = self._decode_from_start(path, idx)
        try:
            return frames_to_rgb([frames[i] for i in idx])  # (T, H, W, 3)
        except DecodeError as e:
            raise DecodeError(f"video '{path}': {e}") from None

    def _decode_from_keyframe(self, path: Path, idx: list[int]) -> dict[int, object] | None:
        import av

        plan = _keyframe_plan(path, min(idx))
        if plan is None:
            return None
        kf_pts, index = plan
        wanted, last = set(idx), max(idx)
        frames: dict[int, object] = {}
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                # MP4 and Matroska seek by pts (a keyframe's dts, earlier with B-frames, lands a GOP early)
                container.seek(kf_pts, stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.pts < kf_pts:
                        continue  # an earlier keyframe's frames, or leading frames of an open GOP
                    k = index.get(frame.pts)
                    if k is None or getattr(frame, "is_corrupt", False):
                        return None
                    if k in wanted:
                        frames[k] = frame
                    if k >= last:
                        break
        except (av.error.FFmpegError, ValueError, OSError, IndexError):
            return None
        return frames if len(frames) == len(wanted) else None

    def _decode_from_start(self, path: Path, idx: list[int]) -> dict[int, object]:
        import av

        wanted, last = set(idx), max(idx)
        frames: dict[int, object] = {}
        n = 0
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    if getattr(frame, "is_corrupt", False):  # FFmpeg concealed damage in it (or a reference)
                        raise DecodeError(f"video '{path}': frame {n} is corrupt (damaged stream)")
                    if n in wanted:
                        frames[n] = frame
                    n += 1
                    if n > last:
                        break
        except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
            raise DecodeError(
                f"video '{path}': decode failed after {n} frames ({type(e).__name__}: {e})"
            ) from None
        if n <= last:
            raise DecodeError(f"video '{path}': only {n} decodable frames (expected >= {last + 1})")
        return frames

    def decode_batch(self, items: Sequence[tuple[Path, Sequence[int]]]) -> list[torch.Tensor | DecodeError]:
        out: list[torch.Tensor | DecodeError] = []
        for path, idx in items:
            try:
                out.append(self.decode(path, idx))
            except DecodeError as e:
                out.append(e)
        return out


@functools.cache
def dali_available() -> str | None:
    """None when ``nvidia.dali`` imports, else the reason it does not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia.dali not importable ({e})"
    return None


NVDEC_LIBRARY = "libnvcuvid.so.1"


@functools.cache
def nvdec_available(library: str = NVDEC_LIBRARY) -> str | None:
    """None when the driver's NVDEC library (which DALI's GPU video decoder loads) loads, else the reason.

    Containers get it only when ``NVIDIA_DRIVER_CAPABILITIES`` includes ``video`` (or ``all``)."""
    try:
        ctypes.CDLL(library)
    except OSError as e:
        return (
            f"the NVDEC library {library} does not load ({e}); in a container, set "
            "NVIDIA_DRIVER_CAPABILITIES to include 'video'"
        )
    return None


_FORKED_AWAY: list[dict] = []  # DALI pipelines a forked process inherited and must neither run nor destroy


class DaliDecoder:
    """DALI ``fn.decoders.video`` on in-memory files; ``device="gpu"`` uses the mixed (NVDEC) backend.

    A batch runs as one DALI iteration with per-sample frame lists. When the batch fails, DALI does
    not say which sample broke, so each sample is retried alone to isolate it.

    ``device_id``: the GPU it decodes on; None (default) takes the current CUDA device at first use (a decode,
    ``device``, or pickling for a DataLoader worker), so a decoder made before ``torch.cuda.set_device`` (in a
    dataset) decodes on the rank's GPU.
    """

    def __init__(self, device: str = "cpu", *, num_threads: int = 2, device_id: int | None = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliDecoder device: expected 'cpu' or 'gpu', got {device!r}")
        reason = dali_available()
        if reason:
            raise RuntimeError(f"decoder 'dali{'' if device == 'gpu' else '_cpu'}': {reason}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("decoder 'dali': needs a CUDA device (use 'dali_cpu' or 'pyav')")
        if device == "gpu" and (reason := nvdec_available()):
            raise RuntimeError(f"decoder 'dali': {reason} (or use 'dali_cpu' or 'pyav')")
        self.name = "dali" if device == "gpu" else "dali_cpu"
        self.codecs = DALI_GPU_CODECS if device == "gpu" else DALI_CPU_CODECS
        self._gpu = device == "gpu"
        self._num_threads = num_threads
        self._device_id = device_id
        self._pipes: dict[int, object] = {}
        self._lock = threading.Lock()  # one DALI iteration at a time per decoder (loader threads share it)
        self._pid = os.getpid()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self._gpu_id()) if self._gpu else torch.device("cpu")

    def _gpu_id(self) -> int:
        if self._device_id is None:
            self._device_id = torch.cuda.current_device()
        return self._device_id

    def __getstate__(self) -> dict:
        # sent to a DataLoader worker (spawn): DALI pipelines and the lock stay behind, the worker builds its own;
        # the GPU is the sender's current one (a spawned worker's current device is GPU 0)
        if self._gpu:
            self._gpu_id()
        return {**self.__dict__, "_pipes": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _pid=os.getpid())

    def supports(self, codec: str) -> bool:
        return codec in self.codecs

    def _pipeline(self, batch_size: int):
        pipe = self._pipes.get(batch_size)
        if pipe is not None:
            return pipe
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=batch_size,
            num_threads=self._num_threads,
            device_id=self._gpu_id() if self._gpu else None,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        def video_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(
                encoded, device="mixed" if self._gpu else "cpu", frames=frames, pad_mode="none"
            )

        pipe = video_pipe()
        pipe.build()
        self._pipes[batch_size] = pipe
        return pipe

    def _run(self, items: Sequence[tuple[Path, Sequence[int]]]) -> list[torch.Tensor]:
        encoded = []
        for p, _ in items:
            try:
                encoded.append(np.fromfile(p, dtype=np.uint8))
            except OSError as e:
                raise RuntimeError(f"cannot read file ({e})") from None
        pipe = self._pipeline(len(items))
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("frames", [np.asarray(_check_indices(p, i), dtype=np.int32) for p, i in items])
        try:
            (out,) = pipe.run()
        except RuntimeError:
            self._pipes.pop(len(items), None)  # DALI marks the pipeline invalid after any error
            raise
        if self._gpu:
            return [_dali_gpu_to_torch(out[i], self.device) for i in range(len(items))]
        return [torch.from_numpy(np.array(out[i])) for i in range(len(items))]

    def decode_batch(self, items: Sequence[tuple[Path, Sequence[int]]]) -> list[torch.Tensor | DecodeError]:
        if not items:
            return []
        if self._pid != os.getpid():
            # a forked process (DataLoader worker): the parent's pipelines lost their threads (running one hangs)
            # and its lock may have been held; kept referenced, as their destructors would wait on those threads
            _FORKED_AWAY.append(self._pipes)
            self._pipes, self._lock, self._pid = {}, threading.Lock(), os.getpid()
        try:
            with self._lock:
                return list(self._run(items))
        except RuntimeError as e:
            if len(items) == 1:
                return [DecodeError(_dali_reason(items[0][0], self.name, str(e)))]
        return [self.decode_batch([item])[0] for item in items]


def _dali_gpu_to_torch(tensor, device: torch.device) -> torch.Tensor:
    """Copy one DALI GPU tensor into a fresh torch tensor on the current stream."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _dali_reason(path: Path, name: str, message: str) -> str:
    """DALI's errors carry a pipeline traceback; keep the sentence that says what went wrong."""
    text = message.split("encountered:", 1)[-1].split("C++ context", 1)[0]
    text = " ".join(text.replace("Current pipeline object is no longer valid.", "").split())
    return f"video '{path}': decoder '{name}' failed: {text[:300]}"


def build_decoders(choice: str = "auto") -> list[Decoder]:
    """Decoders to try in order for ``choice`` ("auto" | "dali" | "dali_cpu" | "pyav")."""
    if choice not in DECODERS:
        raise ValueError(f"decoder: expected one of {', '.join(DECODERS)}, got {choice!r}")
    if choice == "pyav":
        return [PyAVDecoder()]
    # the GPU decoder takes its device at first use (the rank's, set after the dataset was made)
    if choice == "dali":  # NVDEC, then DALI's CPU path for the files NVDEC refuses (too small)
        return [DaliDecoder("gpu"), DaliDecoder("cpu")]
    if choice == "dali_cpu":
        return [DaliDecoder("cpu")]
    chain: list[Decoder] = []
    if dali_available() is None:
        gpu = torch.cuda.is_available()
        if gpu and (reason := nvdec_available()):
            log.warning("decoder 'auto': DALI on the CPU, not the GPU: %s", reason)
            gpu = False
        if gpu:
            chain.append(DaliDecoder("gpu"))
        chain.append(DaliDecoder("cpu"))
    chain.append(PyAVDecoder())
    return chain
