"""HunyuanVideo15Model against diffusers' HunyuanVideo15Transformer3DModel: outputs, gradients, RoPE
layout, state dicts, loading, FLOPs, sizes, the I2V input of the pipeline, the recipe config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15RotaryPosEmbed
from torch.utils.flop_counter import FlopCounterMode

from models import FAMILIES, build_model
from models.adapter import StateDictKeyError
from models.hunyuan15 import HunyuanVideo15Config, HunyuanVideo15Model
from tests import parity
from tests.parity import check_parity, check_state_dict_round_trip, rel_err

REPO = Path(__file__).resolve().parents[1]


def make_pair(**overrides) -> tuple[HunyuanVideo15Transformer3DModel, HunyuanVideo15Model]:
    return parity.make_pair(HunyuanVideo15Transformer3DModel, HunyuanVideo15Model, **overrides)


def inputs(B: int = 2, *, latent=(3, 4, 6), image: bool = True, glyph: bool = True) -> tuple[tuple, dict]:
    """Latents (B, 9, F, H, W), float timesteps, padded Qwen text, ByT5 glyph tokens (one sample with
    none, as a prompt without quoted text), SigLIP tokens (all zero for T2V). Masks are not prefixes
    everywhere (left padding in sample 0's glyph) to exercise the valid-first reordering."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 9, *latent, generator=g)
    t = torch.tensor([3.0, 870.5, 412.25][:B])
    text = torch.randn(B, 7, 24, generator=g)
    m1 = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5][:B])
    g2 = torch.randn(B, 5, 20, generator=g)
    m2 = (
        torch.tensor([[0, 1, 1, 0, 1], [0] * 5, [1] * 5][:B])
        if glyph
        else torch.zeros(B, 5, dtype=torch.long)
    )
    img = torch.randn(B, 3, 12, generator=g) if image else torch.zeros(B, 3, 12)
    kw = dict(
        encoder_attention_mask=m1, encoder_hidden_states_2=g2, encoder_attention_mask_2=m2, image_embeds=img
    )
    return (x, t, text), kw


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_i2v_matches_diffusers_with_padded_masks(backend):
    theirs, ours = make_pair(attention_backend=backend)
    args, kw = inputs(latent=(2, 2, 4) if backend == "triton" else (3, 4, 6))
    check_parity(theirs, ours, args, kw, allow_unused=True)


def test_t2v_zero_image_and_spatial_patch_match_diffusers():
    theirs, ours = make_pair(patch_size=2, out_channels=3)  # (c, pt, ph, pw) head order matters here
    args, kw = inputs(3, latent=(2, 4, 6), image=False)
    check_parity(theirs, ours, args, kw, allow_unused=True)


def test_meanflow_timestep_r_and_all_valid_batch_match_diffusers():
    theirs, ours = make_pair(use_meanflow=True)
    (x, t, text), kw = inputs(1)
    kw["timestep_r"] = torch.tensor([120.0])
    check_parity(theirs, ours, (x, t, text), kw, allow_unused=True)  # B = 1: no key mask at all on our side


def test_rope_tables_are_diffusers_interleaved_layout():
    cfg = HunyuanVideo15Config.flavour("debug")
    ours = HunyuanVideo15Model(cfg)
    grid = (3, 5, 7)
    cos, sin = ours.rope_tables(grid, 4, torch.device("cpu"))
    S = 3 * 5 * 7
    rope = HunyuanVideo15RotaryPosEmbed(
        cfg.patch_size, cfg.patch_size_t, list(cfg.rope_axes_dim), cfg.rope_theta
    )
    their_cos, their_sin = rope(torch.zeros(1, cfg.in_channels, *grid))  # (S, D), pairs repeated
    torch.testing.assert_close(cos[:S].repeat_interleave(2, dim=1), their_cos, rtol=0, atol=2e-6)
    torch.testing.assert_close(sin[:S].repeat_interleave(2, dim=1), their_sin, rtol=0, atol=2e-6)
    assert torch.equal(cos[S:], torch.ones(4, 8)) and torch.equal(sin[S:], torch.zeros(4, 8))


def test_state_dict_round_trip_is_bit_exact():
    theirs, ours = make_pair(use_meanflow=True, patch_size=2)
    check_state_dict_round_trip(theirs, ours)


def test_missing_and_unexpected_keys_are_listed():
    theirs, ours = make_pair()
    sd = dict(theirs.state_dict())
    del sd["transformer_blocks.1.attn.add_k_proj.weight"]
    sd["context_embedder.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictKeyError) as err:
        ours.load_diffusers_state_dict(sd)
    msg = str(err.value)
    assert "transformer_blocks.1.attn.add_k_proj.weight" in msg and "context_embedder.extra.weight" in msg


@pytest.mark.parametrize("shard", [None, "3MB"])
def test_from_pretrained_reads_diffusers_folders(tmp_path, shard):
    theirs, _ = make_pair()
    kw = {} if shard is None else {"max_shard_size": shard}
    theirs.save_pretrained(tmp_path / "transformer", safe_serialization=True, **kw)
    if shard:
        index = json.loads(next((tmp_path / "transformer").glob("*.index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1
    ours = HunyuanVideo15Model.from_pretrained(tmp_path)  # a pipeline folder: transformer/ is used
    args, kw = inputs(1, latent=(1, 2, 2))
    with torch.no_grad():
        assert rel_err(ours(*args, **kw), theirs(*args, **kw, return_dict=False)[0]) <= 1e-5


def test_predict_velocity_builds_the_pipeline_i2v_input():
    theirs, ours = make_pair()
    (_, _, text), kw = inputs(2, latent=(3, 4, 4))
    x, image, t = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 1, 4, 4), torch.tensor([0.25, 0.9])
    cond_latents = image.repeat(
        1, 1, 3, 1, 1
    )  # as HunyuanVideo15ImageToVideoPipeline: repeat, zero frames 1:
    cond_latents[:, :, 1:] = 0
    mask = torch.zeros(2, 1, 3, 4, 4)
    mask[:, :, 0] = 1
    lengths, lengths_2 = kw["encoder_attention_mask"].sum(1), torch.tensor([0, 0])
    cond = {"text": text, "text_lengths": lengths, "image_latent": image, "image_tokens": kw["image_embeds"],
            "text_2": kw["encoder_hidden_states_2"], "text_2_lengths": lengths_2}  # fmt: skip
    with torch.no_grad():
        v = ours.predict_velocity(x, t, cond)
        ref = theirs(torch.cat([x, cond_latents, mask], 1), 1000 * t, text, return_dict=False,
                     **{**kw, "encoder_attention_mask_2": torch.zeros(2, 5)})[0]  # fmt: skip
        assert v.shape == x.shape and rel_err(v, ref) <= 1e-5
        no_glyph = ours.predict_velocity(x, t, {k: v for k, v in cond.items() if not k.startswith("text_2")})
        assert rel_err(no_glyph, ref) <= 1e-5  # zero glyph tokens == absent
    with pytest.raises(ValueError, match="image_latent"):
        ours.predict_velocity(x, t, {**cond, "image_latent": image[:, :, :, :2]})
    with pytest.raises(ValueError, match="t: expected"):
        ours.predict_velocity(x, torch.rand(2, 48), cond)
    _, meanflow = make_pair(use_meanflow=True)  # its pipeline passes timestep_r, which the samplers cannot
    with pytest.raises(ValueError, match="use_meanflow = true needs timestep_r"):
        meanflow.predict_velocity(x, t, cond)


def test_flops_per_token_matches_flop_counter():
    _, ours = make_pair(attention_backend="torch", use_meanflow=True)
    (x, t, text), kw = inputs(1, latent=(2, 4, 6))
    kw = {**kw, "encoder_attention_mask_2": torch.ones(1, 5), "timestep_r": torch.tensor([1.0])}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours(x, t, text, **kw)
    S = 2 * 4 * 6
    count = ours.flops_per_token(S, 7, glyph_len=5, image_len=3) * S
    assert abs(count / counter.get_total_flops() - 1) < 1e-9


@pytest.mark.parametrize("case", ["i2v", "t2v_zero_image", "no_quoted_text", "mixed_lengths"])
def test_recipes_work_logs_count_the_whole_context(case):
    """recipes.common.work_logs (the trainer's tokens/s and MFU input) on a full cond -- text, SigLIP image
    tokens, glyph tokens -- equals torch's FLOP counter on that predict_velocity. The blocks' context is
    trimmed to the longest per-sample valid count: T2V's all-zero image tokens are masked out (not counted),
    while the glyph and image projections still run on every token (prompts without quoted text)."""
    from recipes.common import work_logs

    _, ours = make_pair(attention_backend="torch")
    (_, _, text), kw = inputs(2, latent=(2, 4, 6))
    x = torch.randn(2, 4, 2, 4, 6)
    L, L2 = text.shape[1], kw["encoder_hidden_states_2"].shape[1]
    # valid text shorter than its padding: the model trims the context, and the count must too
    cond = {"text": text, "text_lengths": torch.tensor([2, L - 1]), "image_latent": x[:, :, :1],
            "image_tokens": kw["image_embeds"], "text_2": kw["encoder_hidden_states_2"],
            "text_2_lengths": torch.full((2,), L2)}  # fmt: skip
    if case == "t2v_zero_image":
        cond["image_tokens"] = torch.zeros_like(kw["image_embeds"])
        del cond["image_latent"]
    elif case == "no_quoted_text":
        cond["text_2_lengths"] = torch.zeros(2, dtype=torch.long)
    elif case == "mixed_lengths":  # longest text and longest glyph in different samples
        cond["text_lengths"], cond["text_2_lengths"] = torch.tensor([L, 2]), torch.tensor([0, L2])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours.predict_velocity(x, torch.tensor([0.3, 0.7]), cond)
    logs = work_logs(ours, x, cond)
    assert logs["num_tokens"] == 2 * 2 * 4 * 6
    assert abs(logs["num_flops"] / counter.get_total_flops() - 1) < 1e-6


def test_refiner_ffn_width_is_fixed_as_in_diffusers():
    """diffusers' token refiner uses an FFN of 4 x dim whatever the config's mlp_ratio (the blocks' width)."""
    theirs, ours = make_pair(mlp_ratio=2.5, attention_backend="torch")
    assert ours.text_refiner.blocks[0].ffn.fc1.out_features == 4 * ours.cfg.dim
    assert ours.blocks[0].x_ffn.fc1.out_features == int(2.5 * ours.cfg.dim)
    args, kw = inputs(2)
    check_parity(theirs, ours, args, kw, allow_unused=True)
    check_state_dict_round_trip(theirs, ours)
    (x, t, text), kw = inputs(1, latent=(2, 4, 6))
    kw["encoder_attention_mask_2"] = torch.ones(1, 5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours(x, t, text, **kw)
    S = 2 * 4 * 6
    assert (
        abs(ours.flops_per_token(S, 7, glyph_len=5, image_len=3) * S / counter.get_total_flops() - 1) < 1e-9
    )


def test_real_size_on_meta_matches_diffusers_and_paper():
    ours = build_model("hunyuan15", "i2v-480p", device="meta")
    cfg = ours.cfg
    with torch.device("meta"):
        theirs = HunyuanVideo15Transformer3DModel(**cfg.to_diffusers_config())
    n = ours.num_params()
    assert n == sum(p.numel() for p in theirs.parameters())
    assert 8.2e9 < n < 8.4e9 and len(ours.blocks) == 54 and cfg.dim == 2048  # "8.3B, 54 blocks, dim 2048"
    S = 31 * 30 * 53  # 848 x 480 x 121 frames -> latent 31 x 30 x 53
    assert S == 49_290 and ours.flops_per_token(S, 256) > 0


def test_registry_and_recipe_config_builds_on_meta():
    from engine.config import load_config
    from recipes.common import build_denoiser

    assert "hunyuan15" in FAMILIES
    cfg = load_config(argv=["--config", str(REPO / "recipes/configs/hunyuan15_i2v_480p.toml"),
                            "--model.meta_init", "true"])  # fmt: skip
    model = build_denoiser(cfg)
    assert isinstance(model, HunyuanVideo15Model) and all(p.is_meta for p in model.parameters())
    d = cfg.data
    assert (d.width, d.height, d.num_frames) == (848, 480, 121)
    with pytest.raises(ValueError, match="unknown fields"):
        build_model("hunyuan15", "debug", hidden=3)


def test_bad_inputs_are_named():
    _, ours = make_pair()
    (x, t, text), kw = inputs(1, latent=(1, 2, 2))
    with pytest.raises(ValueError, match="hidden_states"):
        ours(x[:, :5], t, text)
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.tensor([1.0, 2.0]), text)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, t, text[..., :5])
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours(x, t, text, encoder_attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="rope_axes_dim"):
        HunyuanVideo15Config.flavour("debug", rope_axes_dim=(4, 4, 4))


def test_cast_keeps_fp32_modules_and_bf16_is_close_to_fp32():
    _, ours = make_pair()
    args, kw = inputs(1, latent=(2, 2, 4))
    with torch.no_grad():
        ref = ours(*args, **kw)
        ours.cast(torch.bfloat16)
        out = ours(*[a.bfloat16() if a.dim() > 1 else a for a in args],
                   **{k: v.bfloat16() if v.is_floating_point() else v for k, v in kw.items()})  # fmt: skip
    assert ours.time_embed.linear_1.weight.dtype == torch.float32
    assert ours.text_refiner.blocks[0].norm1.weight.dtype == torch.float32
    assert ours.blocks[0].attn.x.qkv.weight.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gpu_bf16_error_within_twice_diffusers_bf16(backend):
    """bf16 on CUDA: our error vs an fp32 reference is at most ~2x diffusers' bf16 error (outputs, input
    grads). Padded masks included (B = 2 with different text lengths: our key lengths vs their dense mask)."""
    theirs, ours = make_pair(num_attention_heads=2, attention_head_dim=64, rope_axes_dim=(16, 24, 24),
                             attention_backend=backend)  # fmt: skip
    theirs, ours = theirs.cuda(), ours.cuda()
    (x, t, text), kw = inputs(2, latent=(5, 16, 24))
    x, text = x.cuda(), text.cuda()
    t = torch.tensor([3.0, 868.0], device="cuda")  # exact in bf16, so diffusers' bf16 timestep loses nothing
    kw = {k: v.cuda() for k, v in kw.items()}
    w = torch.randn(2, 4, 5, 16, 24, device="cuda")

    def run(model, dtype, diffusers):
        xi = x.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf per run
        kwd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
        if diffusers:  # diffusers casts the sinusoid to the timestep's dtype: it must match the weights
            out = model(xi, t.to(dtype), text.to(dtype), **kwd, return_dict=False)[0]
        else:
            out = model(xi, t, text.to(dtype), **kwd)
        (out.float() * w).sum().backward()
        return out.float(), xi.grad.float()

    ref_out, ref_grad = run(theirs, torch.float32, True)
    their_out, their_grad = run(theirs.to(torch.bfloat16), torch.bfloat16, True)
    our_out, our_grad = run(ours.to(torch.bfloat16), torch.bfloat16, False)
    assert rel_err(our_out, ref_out) <= 2 * rel_err(their_out, ref_out) + 1e-3
    assert rel_err(our_grad, ref_grad) <= 2 * rel_err(their_grad, ref_grad) + 1e-3


# ---- encoders (tiny random models built locally), against the diffusers pipeline's own helpers ----


def _tiny_qwen():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    cfg = Qwen2_5_VLTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                               rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})  # fmt: skip
    words = "you are a helpful assistant put the red block left of blue".split()
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user"]
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tokenizer, Qwen2_5_VLTextModel(cfg).eval()


def test_text_encoders_match_the_pipeline():
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as Pipe,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from models.encoders import HunyuanVideo15TextEncoder

    tokenizer, qwen = _tiny_qwen()
    t5 = T5EncoderModel(
        T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    system = "you are a helpful assistant"
    enc = HunyuanVideo15TextEncoder(tokenizer, qwen, max_length=40, crop_start=5, system_message=system,
                                    glyph_tokenizer=ByT5Tokenizer(), glyph_model=t5, glyph_max_length=32)  # fmt: skip
    prompts = ['put the red block left of "blue"', "red block"]
    emb, lengths = enc.encode(prompts)
    ref, mask = Pipe._get_mllm_prompt_embeds(qwen, tokenizer, prompts, "cpu", tokenizer_max_length=40,
                                             system_message=system, crop_start=5)  # fmt: skip
    assert torch.equal(lengths, mask.sum(1)) and 0 < lengths.min() < lengths.max() < 40
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb[b, :n], ref[b][mask[b].bool()].float())
        assert not emb[b, n:].any()
    g, glen = enc.encode_glyph(prompts)
    gref, gmask = Pipe._get_byt5_prompt_embeds(ByT5Tokenizer(), t5, prompts, "cpu", tokenizer_max_length=32)
    assert torch.equal(glen, gmask.sum(1)) and glen[1] == 0
    torch.testing.assert_close(g[0, : glen[0]], gref[0, : glen[0]].float())


def test_vae_and_image_encoder_match_the_pipeline():
    import numpy as np
    from diffusers import AutoencoderKLHunyuanVideo15
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as Pipe,
    )
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from models.encoders import HunyuanVideo15VAE, SiglipImageEncoder

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2).eval()  # fmt: skip
    pixels = (torch.rand(2, 16, 16, 3) * 255).to(torch.uint8)
    images = [Image.fromarray(p.numpy()) for p in pixels]
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, H, W) in [-1, 1]
    enc = HunyuanVideo15VAE(vae)
    z = enc.encode(x.unsqueeze(2))  # a batch of 2 (diffusers' VAE itself takes one sample at a time)
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=4, do_resize=False)
    ref = torch.cat([Pipe._get_image_latents(vae, processor, im, 16, 16, "cpu") for im in images])
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    latents = torch.randn(2, 4, 3, 4, 4)
    video = enc.decode(latents)
    with torch.no_grad():
        ref_video = torch.cat([vae.decode(v / vae.config.scaling_factor).sample for v in latents.split(1)])
    assert video.shape == (2, 3, 5, 16, 16)
    torch.testing.assert_close(video, ref_video.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    x, image = x[:1], images[0]
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4)).eval()  # fmt: skip
    tokens = SiglipImageEncoder(siglip, mean=(0.5,) * 3, std=(0.5,) * 3, size=16).encode(x)
    fe = SiglipImageProcessor(size={"height": 16, "width": 16})
    ref_tokens = Pipe._get_image_embeds(siglip, fe, np.asarray(image), "cpu")
    assert tokens.shape == (1, 16, 16)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-4)


# ---- the recipes' kit on a tiny pipeline folder, against HunyuanVideo15ImageToVideoPipeline ----


def _tiny_pipeline(path: Path):
    """Every component of a HunyuanVideo-1.5 I2V pipeline folder, tiny and random, written as diffusers and
    transformers write them; -> (diffusers' pipeline built from the same in-memory components, our kit)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5_image2video import (
        HunyuanVideo15ImageToVideoPipeline as Pipe,
    )
    from transformers import (
        ByT5Tokenizer,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    from recipes.common import build_kit

    torch.manual_seed(0)
    tokenizer, qwen = _tiny_qwen()
    t5 = T5EncoderModel(
        T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2).eval()  # fmt: skip
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4)).eval()  # fmt: skip
    fe = SiglipImageProcessor(size={"height": 16, "width": 16})
    transformer, _ = make_pair(text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=16)
    parts = dict(text_encoder=qwen, tokenizer=tokenizer, transformer=transformer, vae=vae, text_encoder_2=t5,
                 tokenizer_2=ByT5Tokenizer(), image_encoder=siglip, feature_extractor=fe)  # fmt: skip
    for name, part in parts.items():
        part.save_pretrained(path / name)
    pipe = Pipe(**parts, scheduler=FlowMatchEulerDiscreteScheduler(), guider=ClassifierFreeGuidance())
    return pipe, build_kit(_tiny_cfg(path))


def _tiny_cfg(path: Path):
    """The real HunyuanVideo-1.5 recipe config pointed at a tiny pipeline folder, fp32 on the CPU."""
    from engine.config import load_config

    return load_config(argv=["--config", str(REPO / "recipes/configs/hunyuan15_i2v_480p.toml"),
                             "--model.pretrained", str(path), "--model.meta_init", "false",
                             "--model.attention", "sdpa", "--run.device", "cpu", "--precision.param_dtype",
                             "float32", "--data.num_frames", "5", "--data.height", "16", "--data.width", "16"])  # fmt: skip


def test_kit_cond_matches_the_pipeline_with_and_without_quoted_text(tmp_path):
    """End to end on a tiny pipeline folder: the kit's PromptTable cond (Qwen text, ByT5 glyph states of
    quoted text, image latent and SigLIP tokens) + our transformer == diffusers' encode_prompt, image
    helpers and transformer; for the task, solution and empty (CFG negative) prompts."""
    import numpy as np
    from PIL import Image

    from engine import flow
    from recipes.common import Item

    pipe, kit = _tiny_pipeline(tmp_path / "pipe")
    tasks = ['[Agent]: write "OPEN" on the sign', "put the red block left of blue",
             'put the red block left of “blue” and the "red" block left of "blue"']  # fmt: skip
    solutions = ["the red block", 'write "a" then “b” then "a"', ""]
    rng = np.random.default_rng(0)
    images, items = [], []
    for i, (task, solution) in enumerate(zip(tasks, solutions, strict=True)):
        images.append(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
        images[-1].save(tmp_path / f"{i}.png")
        items.append(Item(str(i), str(tmp_path / f"{i}.png"), task, solution))
    table = kit.encode_items(items)
    model = kit.load_denoiser("")
    B, idx = len(items), torch.arange(len(items))

    # Their side: the pipeline's own helpers on the same images and prompts.
    image_latents = torch.cat([pipe._get_image_latents(pipe.vae, pipe.video_processor, im, 16, 16, "cpu")
                               for im in images])  # fmt: skip
    image_embeds = torch.cat([pipe.encode_image(im, 1, "cpu", torch.float32) for im in images])
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(B, *kit.latent_shape, generator=g), torch.tensor([0.25, 0.9, 0.6])
    cond_latents = torch.cat([image_latents, torch.zeros_like(x[:, :, 1:])], dim=2)
    mask = torch.zeros_like(x[:, :1])
    mask[:, :, 0] = 1
    x_in = torch.cat([x, cond_latents, mask], dim=1)

    def theirs(prompt):  # prompt None: the pipeline's default negative prompt ([""] * batch)
        e, m, e2, m2 = pipe.encode_prompt(prompt, device="cpu", dtype=torch.float32, batch_size=B)
        v = pipe.transformer(x_in, 1000 * t, e, m, encoder_hidden_states_2=e2, encoder_attention_mask_2=m2,
                             image_embeds=image_embeds, return_dict=False)[0]  # fmt: skip
        return v, e2, m2

    with torch.no_grad():
        ref_u, ref_e2_u, ref_m2_u = theirs(None)
        for which, prompts in (("task", tasks), ("solution", solutions)):
            cond, uncond = table.cond(idx, which), table.cond(idx, "empty")
            assert (
                sorted(cond)
                == sorted(uncond)
                == ["image_latent", "image_tokens", "text", "text_2", "text_2_lengths", "text_lengths"]
            )
            ref_c, ref_e2, ref_m2 = theirs(prompts)
            # the glyph states themselves: same valid tokens and counts (zero for prompts without quotes)
            assert torch.equal(cond["text_2_lengths"], ref_m2.sum(1).long())
            for b, n in enumerate(cond["text_2_lengths"].tolist()):
                torch.testing.assert_close(cond["text_2"][b, :n], ref_e2[b][ref_m2[b].bool()], rtol=0, atol=0)
                assert not cond["text_2"][b, n:].any()
            v_c, v_u = flow.guided_velocity(
                model.predict_velocity, x, t, cond, uncond
            )  # CFG: one batch of 2B
            assert rel_err(v_c, ref_c) <= 1e-5 and rel_err(v_u, ref_u) <= 1e-5
            assert rel_err(model.predict_velocity(x, t, cond), ref_c) <= 1e-5
        assert table.cond(idx, "task")["text_2_lengths"].tolist()[1] == 0 and ref_m2_u.sum() == 0
        assert not ref_e2_u.any() and torch.equal(uncond["text_2_lengths"], torch.zeros(B, dtype=torch.long))
        # the glyph tokens matter: without them the prompts with quoted text would get another velocity
        no_glyph = {k: v for k, v in table.cond(idx, "task").items() if not k.startswith("text_2")}
        v = model.predict_velocity(x, t, no_glyph)
        ref_c, _, ref_m2 = theirs(tasks)
        quoted = ref_m2.sum(1) > 0
        assert quoted.tolist() == [True, False, True]
        assert rel_err(v[~quoted], ref_c[~quoted]) <= 1e-5 and rel_err(v[quoted], ref_c[quoted]) > 1e-2


def test_evaluation_pipeline_conditions_like_training_and_samples_bf16_weights(tmp_path):
    """recipes.evaluate's pipeline (engine.evaluation.generate) gives the videos that sampling with the
    training cond (the kit's PromptTable: image latent + SigLIP image tokens + Qwen and glyph text, checked
    against diffusers above) gives; with precision.param_dtype = bfloat16 the model is held in bf16 and
    sampled under autocast, close to fp32."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from engine import flow
    from engine.evaluation import SamplingConfig, generate, item_noise
    from recipes.common import Item, load_for_sampling
    from recipes.evaluate import pipeline_for

    _, kit = _tiny_pipeline(tmp_path / "pipe")
    cfg = _tiny_cfg(tmp_path / "pipe")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    items = []
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
        items.append(Item(str(i), str(tmp_path / f"{i}.png"), f'[Agent]: write "HI{i}" on the wall', ""))
    texts = [it.task for it in items]
    sampling = SamplingConfig(num_steps=2, shift=5.0, guidance=3.0, batch_size=2)
    model = load_for_sampling(kit, cfg, "")
    videos = generate(pipeline_for(kit, model, cfg), images, texts, seed=0, sampling=sampling)

    table = kit.encode_items(items)
    idx = torch.arange(2)
    noise = torch.stack([item_noise(kit.latent_shape, 0, i) for i in range(2)])
    with torch.no_grad():
        x0 = flow.sample(model.predict_velocity, noise, table.cond(idx, "task"), num_steps=2, shift=5.0,
                         guidance=3.0, uncond=table.cond(idx, "empty")).x0  # fmt: skip
    assert np.array_equal(videos, kit.decode(x0).numpy())
    # without the SigLIP tokens the videos differ: the check above would catch them being dropped
    no_tokens = {k: v for k, v in table.cond(idx, "task").items() if k != "image_tokens"}
    with torch.no_grad():
        v_all = model.predict_velocity(noise, torch.ones(2), table.cond(idx, "task"))
        v_none = model.predict_velocity(noise, torch.ones(2), no_tokens)
    assert rel_err(v_none, v_all) > 1e-3

    bf16 = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, param_dtype="bfloat16"))
    model16 = load_for_sampling(kit, bf16, "")
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    pipe16 = pipeline_for(kit, model16, bf16)
    cond = {**kit.encode_text(texts), **kit.encode_image_cond(images)}
    v16 = pipe16.v_fn(noise, torch.full((2,), 0.5), cond)
    assert v16.dtype == torch.float32
    assert rel_err(v16, model.predict_velocity(noise, torch.full((2,), 0.5), cond)) <= 3e-2
    assert generate(pipe16, images, texts, seed=0, sampling=sampling).shape == videos.shape


def test_latent_cache_keeps_the_glyph_states(tmp_path):
    """The latent/text cache (engine.data.cache, recipes/precompute.py's writer) stores every sequence the
    HunyuanVideo-1.5 text encoder's cond gives, the ByT5 glyph states included; read back and collated they
    equal diffusers' encode_prompt (prompt_embeds_2 at its mask), zero-length for prompts without quotes."""
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter, collate_latents
    from models.encoders import load_encoders

    pipe, _ = _tiny_pipeline(tmp_path / "pipe")
    enc = load_encoders("hunyuan15", tmp_path / "pipe")
    tasks = ['[Agent]: write "OPEN" on the sign', "put the red block left of blue", 'say “hi” and "bye"']
    g = torch.Generator().manual_seed(0)
    rows = [{"video": torch.rand(3, 5, 16, 16, generator=g) * 2 - 1, "task": t, "index": i, "path": f"v{i}"}
            for i, t in enumerate(tasks)]  # fmt: skip

    class Rows:
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    LatentCacheWriter(tmp_path / "cache", vae=enc.vae, text_encoder=enc.text, text_fields=["task"],
                      shard_size=2, batch_size=2).write(Rows())  # fmt: skip
    items = list(LatentCacheDataset(tmp_path / "cache"))
    with torch.no_grad():
        e, m, e2, m2 = pipe.encode_prompt(tasks, device="cpu", dtype=torch.float32, batch_size=len(tasks))
    for b, it in enumerate(items):
        torch.testing.assert_close(it["task_emb"], e[b][m[b].bool()], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(it["task_text_2_emb"], e2[b][m2[b].bool()], rtol=0, atol=0)
    assert [it["task_text_2_emb"].shape[0] for it in items] == m2.sum(1).tolist()
    assert items[1]["task_text_2_emb"].shape[0] == 0  # no quoted text
    batch = collate_latents(items[1:2], ["task"])  # a batch without any quoted text keeps one padded row
    assert batch["task_text_2_emb"].shape == (1, 1, e2.shape[-1]) and batch[
        "task_text_2_lengths"
    ].tolist() == [0]
    batch = collate_latents(items, ["task"])
    assert batch["task_text_2_lengths"].tolist() == m2.sum(1).tolist()
    assert batch["task_text_2_emb"].shape == (3, int(m2.sum(1).max()), e2.shape[-1])
