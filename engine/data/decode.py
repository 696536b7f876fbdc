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

``auto`` takes the first backend in that table that is available and supports the codec, and falls
back to PyAV when DALI rejects a file. DALI errors leave its pipeline unusable, so a failed pipeline
is rebuilt (building one costs ~5 ms).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from engine.log import get_logger

log = get_logger("data")

DALI_GPU_CODECS = frozenset({"h264", "hevc", "av1", "mpeg4", "vp8", "vp9", "mjpeg"})
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
# 8-bit pixel formats every backend turns into RGB24 the same way; others (10-bit, alpha, palette)
# are rejected by the dataset as an unexpected pixel format rather than silently converted.
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
    num_frames: int  # counted from the demuxed video packets (container counts are often missing)


def probe(path: str | Path) -> VideoInfo:
    """Read a video's stream parameters with PyAV, without decoding pixels. Raises DecodeError."""
    import av

    p = Path(path)
    if not p.is_file():
        raise DecodeError(f"video '{p}': file does not exist")
    if p.stat().st_size == 0:
        raise DecodeError(f"video '{p}': zero-length file")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise DecodeError(f"video '{p}': no video stream (not a video file?)")
            s = container.streams.video[0]
            ctx = s.codec_context
            rate = s.average_rate or s.guessed_rate or s.base_rate
            n = sum(1 for pkt in container.demux(s) if pkt.size > 0)
            return VideoInfo(
                codec=ctx.name,
                width=int(ctx.width),
                height=int(ctx.height),
                pix_fmt=str(ctx.pix_fmt or ""),
                fps=float(rate) if rate else 0.0,
                num_frames=n,
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


def yuv420_to_rgb(
    y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *, full_range: bool = False
) -> torch.Tensor:
    """8-bit planar 4:2:0 -> uint8 RGB ``(H, W, 3)``, the conversion DALI's decoder applies.

    Chroma is upsampled bilinearly with centred siting; then BT.601 (Kr = 0.299, Kb = 0.114):
    Y' = (Y - 16) * 255/219, U' = (U - 128) * 255/224 (limited range; full range uses Y, U - 128);
    R = Y' + 2(1 - Kr) V', B = Y' + 2(1 - Kb) U', G = (Y' - Kr R - Kb B) / (1 - Kr - Kb).
    PyAV's own rgb24 path (swscale, nearest chroma) differs from DALI by ~36 dB PSNR at colour edges;
    this one matches it exactly, so both backends give the same frames.
    """
    h, w = y.shape
    uv = torch.stack([u, v]).float()[None]  # (2, H/2, W/2) -> (1, 2, H/2, W/2)
    uv = F.interpolate(uv, size=(h, w), mode="bilinear", align_corners=False)[0]  # (2, H, W)
    if full_range:
        yy, uu, vv = y.float(), uv[0] - 128.0, uv[1] - 128.0
    else:
        yy, uu, vv = (
            (y.float() - 16.0) * (255 / 219),
            (uv[0] - 128.0) * (255 / 224),
            (uv[1] - 128.0) * (255 / 224),
        )
    kr, kb = 0.299, 0.114
    r = yy + 2 * (1 - kr) * vv
    b = yy + 2 * (1 - kb) * uu
    g = (yy - kr * r - kb * b) / (1 - kr - kb)
    return torch.stack([r, g, b], dim=-1).round_().clamp_(0, 255).to(torch.uint8)


def frame_to_rgb(frame) -> torch.Tensor:
    """A PyAV VideoFrame -> uint8 ``(H, W, 3)``: 4:2:0 through :func:`yuv420_to_rgb`, else swscale."""
    fmt = frame.format.name
    if fmt in ("yuv420p", "yuvj420p"):
        h, w = frame.height, frame.width
        planes = [np.frombuffer(p, np.uint8).reshape(-1, p.line_size) for p in frame.planes]
        y = torch.from_numpy(planes[0][:h, :w].copy())
        u = torch.from_numpy(planes[1][: (h + 1) // 2, : (w + 1) // 2].copy())
        v = torch.from_numpy(planes[2][: (h + 1) // 2, : (w + 1) // 2].copy())
        return yuv420_to_rgb(y, u, v, full_range=fmt == "yuvj420p")
    return torch.from_numpy(frame.to_ndarray(format="rgb24"))


class PyAVDecoder:
    """Sequential CPU decode with PyAV; keeps the requested frames (seeking is not worth it for clips)."""

    name = "pyav"
    device = torch.device("cpu")

    def supports(self, codec: str) -> bool:
        return True

    def decode(self, path: Path, indices: Sequence[int]) -> torch.Tensor:
        import av

        idx = _check_indices(path, indices)
        wanted, last = set(idx), max(idx)
        frames: dict[int, torch.Tensor] = {}
        n = 0
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    if n in wanted:
                        frames[n] = frame_to_rgb(frame)
                    n += 1
                    if n > last:
                        break
        except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
            raise DecodeError(
                f"video '{path}': decode failed after {n} frames ({type(e).__name__}: {e})"
            ) from None
        if n <= last:
            raise DecodeError(f"video '{path}': only {n} decodable frames (expected >= {last + 1})")
        return torch.stack([frames[i] for i in idx])  # T x (H, W, 3) -> (T, H, W, 3)

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


class DaliDecoder:
    """DALI ``fn.decoders.video`` on in-memory files; ``device="gpu"`` uses the mixed (NVDEC) backend.

    A batch runs as one DALI iteration with per-sample frame lists. When the batch fails, DALI does
    not say which sample broke, so each sample is retried alone to isolate it.
    """

    def __init__(self, device: str = "cpu", *, num_threads: int = 2, device_id: int = 0):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DaliDecoder device: expected 'cpu' or 'gpu', got {device!r}")
        reason = dali_available()
        if reason:
            raise RuntimeError(f"decoder 'dali{'' if device == 'gpu' else '_cpu'}': {reason}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("decoder 'dali': needs a CUDA device (use 'dali_cpu' or 'pyav')")
        self.name = "dali" if device == "gpu" else "dali_cpu"
        self.codecs = DALI_GPU_CODECS if device == "gpu" else DALI_CPU_CODECS
        self.device = torch.device(f"cuda:{device_id}") if device == "gpu" else torch.device("cpu")
        self._gpu = device == "gpu"
        self._num_threads = num_threads
        self._device_id = device_id
        self._pipes: dict[int, object] = {}

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
            device_id=self._device_id if self._gpu else None,
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
        pipe = self._pipeline(len(items))
        pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p, _ in items])
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
        try:
            return list(self._run(items))
        except RuntimeError:
            if len(items) == 1:
                return [DecodeError(_dali_reason(items[0][0], self.name))]
        return [self.decode_batch([item])[0] for item in items]


def _dali_gpu_to_torch(tensor, device: torch.device) -> torch.Tensor:
    """Copy one DALI GPU tensor into a fresh torch tensor on the current stream."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _dali_reason(path: Path, name: str) -> str:
    return f"video '{path}': decoder '{name}' could not decode it (corrupt, truncated or too few frames)"


def build_decoders(choice: str = "auto") -> list[Decoder]:
    """Decoders to try in order for ``choice`` ("auto" | "dali" | "dali_cpu" | "pyav")."""
    if choice not in DECODERS:
        raise ValueError(f"decoder: expected one of {', '.join(DECODERS)}, got {choice!r}")
    if choice == "pyav":
        return [PyAVDecoder()]
    if choice == "dali":
        return [DaliDecoder("gpu")]
    if choice == "dali_cpu":
        return [DaliDecoder("cpu")]
    chain: list[Decoder] = []
    if dali_available() is None:
        chain.append(DaliDecoder("gpu" if torch.cuda.is_available() else "cpu"))
    chain.append(PyAVDecoder())
    return chain
