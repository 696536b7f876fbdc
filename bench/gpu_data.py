"""GPU benchmark of video decode: DALI on the GPU (NVDEC, "mixed") vs PyAV, in frames/s.

    python -m bench.gpu_data [--quick]

Test videos are written here with PyAV (H.264 in MP4, VP9 in WebM; no network, no files needed).
Every provider decodes every frame of every file and ends with uint8 (T, H, W, 3) frames on the GPU,
which is where training wants them: ``pyav`` (the baseline of every ratio) decodes on the CPU with
the dataset's RGB conversion and copies to the GPU; ``dali_gpu`` decodes the files as one batch
with NVDEC; ``dali_cpu`` (VP9 only) is DALI's CPU path plus the copy. Wall-clock median of a few
rounds after a warm-up, synchronised. Goal: dali_gpu >= 5x pyav on H.264. A provider that cannot run
(no DALI, no PyAV on the box, a decode error) becomes an "error" record with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import record

NAME = "data.decode"
BASELINE = "pyav"


def _time(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds per call after one warm-up call (also the correctness sample)."""
    fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write_videos(folder: Path, codec: str, n: int, frames: int, h: int, w: int) -> list[Path]:
    from engine.data.synthetic import CODEC_CONTAINERS, write_video

    suffix = CODEC_CONTAINERS[codec]
    return [
        write_video(
            folder / f"{codec}_{i}{suffix}",
            codec=codec,
            num_frames=frames,
            height=h,
            width=w,
            fps=24,
            ident=i,
        )
        for i in range(n)
    ]


def _dali_installed() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def _providers(codec: str) -> dict[str, Callable[[], object]]:
    """Provider name -> a factory of a decoder whose outputs end up on the GPU."""
    from engine.data.decode import DaliDecoder, PyAVDecoder

    out = {"pyav": PyAVDecoder}
    if not _dali_installed():
        return out
    out["dali_gpu"] = lambda: DaliDecoder("gpu", num_threads=4)
    if codec == "libvpx-vp9":
        out["dali_cpu"] = lambda: DaliDecoder("cpu", num_threads=4)
    return out


def _case(records: list, folder: Path, codec: str, n: int, frames: int, h: int, w: int, rounds: int) -> None:
    case = f"{codec}-{n}x{frames}f-{w}x{h}"
    try:
        files = _write_videos(folder, codec, n, frames, h, w)
    except Exception as e:  # no PyAV / no encoder: nothing to decode for any provider
        records.append(
            record(NAME, case, "-", "error", 0.0, message=f"writing test videos: {type(e).__name__}: {e}")
        )
        return
    items = [(f, list(range(frames))) for f in files]
    reference = None
    for provider, make in _providers(codec).items():
        try:
            decoder = make()

            def run(decoder=decoder):
                outs = decoder.decode_batch(items)
                bad = [o for o in outs if isinstance(o, Exception)]
                if bad:
                    raise RuntimeError(str(bad[0]))
                return [o.cuda(non_blocking=True) for o in outs]

            first = run()
            seconds = _time(run, rounds)
            extra = {"files": n, "frames": frames, "height": h, "width": w}
            if provider == BASELINE:
                reference = first[0].float()
            elif reference is not None:
                mse = ((first[0].float() - reference) ** 2).mean().item()
                extra["psnr_vs_pyav_db"] = (
                    99.0 if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
                )
            records.append(
                record(NAME, case, provider, "frames_per_s", n * frames / seconds, baseline=BASELINE, **extra)
            )
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"[:1500]
            records.append(
                record(NAME, case, provider, "error", 0.0, message=msg, trace=traceback.format_exc()[-1500:])
            )


def run(quick: bool = False) -> list[dict]:
    """Decode benchmarks as bench.common records; never raises."""
    if not torch.cuda.is_available():
        return [record(NAME, "-", "-", "error", 0.0, message="no CUDA device")]
    records: list[dict] = []
    if not _dali_installed():  # nothing to compare: the PyAV baseline, once
        msg = "skipped: nvidia.dali is not installed (pip install nvidia-dali-cuda130)"
        records.append(record(NAME, "-", "dali_gpu", "error", 0.0, message=msg))
        quick = True
    rounds = 2 if quick else 3
    cases = [("libx264", 4, 32, 360, 640)]
    if not quick:
        cases = [("libx264", 8, 48, 480, 848), ("libx264", 4, 32, 720, 1280), ("libvpx-vp9", 4, 32, 360, 640)]
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            print(f"data.decode {case}", file=sys.stderr, flush=True)  # a timed-out module's log says where
            _case(records, Path(tmp), *case, rounds)
    return records


if __name__ == "__main__":
    from bench.common import module_args

    args = module_args(__doc__)
    print(json.dumps(run(quick=args.quick), indent=1))
