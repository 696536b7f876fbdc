"""gpu_check module ``fp8_training``: a short training run of a small Wan DiT with our FP8 attention kernel
against the same run with our bf16 kernel (bench/fp8_attention_training.py, its GPU setting)."""

from bench.fp8_attention_training import run

__all__ = ["run"]
