"""HunyuanVideo-1.5 training-step throughput: a few HY1.5-sized blocks at 480p x 121 frames.

Forward + backward + fused AdamW, bf16, B = 1, latent 65 x 31 x 30 x 53 (49,290 video tokens), context
of 256 Qwen text + 8 ByT5 glyph + 729 SigLIP image tokens, all valid. Ours per attention backend vs
diffusers' HunyuanVideo15Transformer3DModel with the same config and weights, in the same run
(bench.gpu_models' machinery: tokens/s, MFU against a measured bf16 matmul peak, peak memory).

    python -m bench.gpu_models_hunyuan [--quick]      # or: python -m bench.gpu_check --only models_hunyuan
"""

from __future__ import annotations

import json

import torch

from bench.gpu_models import DTYPE, Case, model_builders, run_cases

TEXT_LEN, GLYPH_LEN, IMAGE_LEN = 256, 8, 729


def _hy_case(num_layers: int, latent: tuple[int, int, int], *, device: str = "cuda") -> Case:
    """HY1.5 I2V dims (dim 2048, 16 heads) with ``num_layers`` dual-stream blocks, latent (F, H, W)."""
    from models.hunyuan15 import HunyuanVideo15Config, HunyuanVideo15Model

    cfg = HunyuanVideo15Config.flavour("i2v-480p", num_layers=num_layers)
    Fr, H, W = latent
    tokens = Fr * H * W
    with torch.device("meta"):
        fwd_flops = HunyuanVideo15Model(cfg).flops_per_token(
            tokens, TEXT_LEN, glyph_len=GLYPH_LEN, image_len=IMAGE_LEN
        )

    build_ours, build_diffusers = model_builders(
        HunyuanVideo15Model, "HunyuanVideo15Transformer3DModel", cfg, device
    )

    def inputs() -> dict:
        g = torch.Generator(device).manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=DTYPE, generator=g)

        ones = lambda n: torch.ones(1, n, device=device, dtype=torch.long)  # noqa: E731
        return dict(
            hidden_states=randn(1, cfg.in_channels, Fr, H, W),
            timestep=torch.tensor([500.0], device=device, dtype=DTYPE),  # diffusers wants the weights' dtype
            encoder_hidden_states=randn(1, TEXT_LEN, cfg.text_embed_dim),
            encoder_attention_mask=ones(TEXT_LEN),
            encoder_hidden_states_2=randn(1, GLYPH_LEN, cfg.text_embed_2_dim),
            encoder_attention_mask_2=ones(GLYPH_LEN),
            image_embeds=randn(1, IMAGE_LEN, cfg.image_embed_dim),
        )

    name = f"hy15-{num_layers}blk-{Fr}x{H}x{W}"
    extra = dict(flavour="i2v-480p", num_layers=num_layers, text_len=TEXT_LEN + GLYPH_LEN + IMAGE_LEN)
    return Case(name, build_ours, build_diffusers, inputs, fwd_flops, tokens, extra=extra)


def cases() -> list[Case]:
    """HY1.5 I2V, 3 of 54 blocks, B=1, 848x480 x 121 frames (latent 31 x 30 x 53 = 49,290 tokens)."""
    return [_hy_case(3, (31, 30, 53))]


def run(quick: bool = False) -> list[dict]:
    """Records per (case, provider): tokens/s and MFU (ratios vs diffusers), peak memory; quick: one backend."""
    return run_cases("models_hunyuan", cases, quick)


if __name__ == "__main__":
    from bench.common import add_ratios, module_args

    args = module_args(__doc__)

    print(json.dumps(add_ratios(run(quick=args.quick)), indent=1))
