"""Small synthetic videos written with PyAV, for tests, benchmarks and smoke runs (no downloads).

Frame k of video ``ident`` is a smooth moving gradient (so codecs compress it well and decoded frames
can be compared by PSNR) with its top-left quarter filled by a colour that encodes ``ident``, so a
decoded clip can be matched back to the row it came from (:func:`ident_color`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CODEC_CONTAINERS = {
    "libvpx-vp9": ".webm",
    "libvpx": ".webm",
    "libx264": ".mp4",
    "libx265": ".mp4",
    "mjpeg": ".mkv",
}


def ident_color(ident: int) -> np.ndarray:
    """RGB uint8 colour of the top-left quarter of every frame of video ``ident`` (0..26)."""
    levels = (40, 128, 215)
    return np.array([levels[ident % 3], levels[(ident // 3) % 3], levels[(ident // 9) % 3]], dtype=np.uint8)


def make_frames(num_frames: int, height: int, width: int, ident: int = 0) -> np.ndarray:
    """uint8 (T, H, W, 3): a moving gradient with an identity-coloured top-left quarter."""
    t = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (96 + 64 * np.sin(2 * np.pi * (x / width + t / 16))).astype(np.uint8)
    frames[..., 1] = (96 + 64 * np.cos(2 * np.pi * (y / height - t / 24))).astype(np.uint8)
    frames[..., 2] = (64 + (x + y + 2 * t) % 128).astype(np.uint8)
    frames[:, : height // 2, : width // 2] = ident_color(ident)
    return frames


def write_video(
    path: str | Path,
    *,
    codec: str = "libvpx-vp9",
    num_frames: int = 16,
    height: int = 64,
    width: int = 64,
    fps: int = 8,
    ident: int = 0,
    pix_fmt: str = "yuv420p",
    quality: int = 18,
) -> Path:
    """Encode :func:`make_frames` to ``path`` (container from the suffix) and return the path."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = make_frames(num_frames, height, width, ident)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec in ("libvpx-vp9", "libvpx"):
            stream.options = {"crf": str(quality), "b": "0", "deadline": "good", "cpu-used": "8"}
        elif codec in ("libx264", "libx265"):
            stream.options = {"crf": str(quality), "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: str | Path, *, height: int = 64, width: int = 64, ident: int = 0) -> Path:
    """A PNG of the first frame of :func:`make_frames`."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_frames(1, height, width, ident)[0]).save(path)
    return path
