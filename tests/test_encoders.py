"""Encoders on tiny random diffusers/transformers models built locally (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from models.encoders import CLIP_MEAN, CLIP_STD, ImageEncoder, TextEncoder, WanVAE, load_encoders

WORDS = ["put", "the", "red", "block", "left", "of", "blue", "one", "agent", "moves"]
Z = 4


def tiny_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=Z,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[0.5, -0.2, 0.1, 0.3],
        latents_std=[2.0, 0.5, 1.5, 1.0],
    ).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5() -> UMT5EncoderModel:
    cfg = UMT5Config(
        vocab_size=16,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return UMT5EncoderModel(cfg).eval()


def tiny_clip() -> CLIPVisionModel:
    cfg = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionModel(cfg).eval()


def test_vae_latents_are_normalised_and_decode_inverts_it():
    vae = tiny_vae()
    enc = WanVAE(vae)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (2, Z, 1 + 4 // enc.temporal_compression, 16 // enc.spatial_compression, 16 // 2)
    mode = vae.encode(video).latent_dist.mode()
    mean, std = torch.tensor([0.5, -0.2, 0.1, 0.3]), torch.tensor([2.0, 0.5, 1.5, 1.0])
    torch.testing.assert_close(z, (mode - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
    assert torch.equal(enc.encode(video), z)  # deterministic
    out = enc.decode(z)
    ref = vae.decode(mode).sample.clamp(-1, 1)
    assert out.shape == video.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        enc.encode(video, sample=True, generator=g1), enc.encode(video, sample=True, generator=g2)
    )
    with pytest.raises(ValueError, match="1 \\+ 2 k"):
        enc.encode(torch.zeros(1, 3, 4, 16, 16))


def test_text_encoder_pads_to_fixed_length_with_zeros():
    tok, model = tiny_tokenizer(), tiny_umt5()
    enc = TextEncoder(tok, model, max_length=12)
    texts = ["put the red block left of the blue one", "agent   moves"]
    emb, lengths = enc.encode(texts)
    assert emb.shape == (2, 12, 16) and lengths.tolist() == [10, 3]  # words + </s>
    ids = tok(["agent moves"], return_tensors="pt").input_ids  # unpadded: the reference has no padding
    ref = model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb[1, :3], ref, rtol=1e-5, atol=1e-6)
    assert emb[1, 3:].abs().max() == 0 and emb[0, 10:].abs().max() == 0
    long_emb, long_len = enc.encode([" ".join(WORDS * 3)])
    assert long_emb.shape == (1, 12, 16) and long_len.item() == 12
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("one string")


def test_text_encoder_cleans_prompts_as_the_wan_pipeline():
    """HTML entities and whitespace runs are cleaned as WanPipeline's prompt_clean does ("&amp;" reached the
    tokenizer as "&", "amp", ";": other tokens, other lengths)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tok, model = tiny_tokenizer(), tiny_umt5()
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=model,
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=None,
    )
    texts = ["put the red block &amp; the  blue one", " agent &amp;lt;moves&gt;\n"]
    ref, _ = pipe.encode_prompt(
        texts, do_classifier_free_guidance=False, max_sequence_length=12, device="cpu"
    )
    emb, lengths = TextEncoder(tok, model, max_length=12).encode(texts)
    assert lengths.tolist() == ref.abs().sum(-1).gt(0).sum(1).tolist()
    torch.testing.assert_close(emb, ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("int_sizes", [False, True])
def test_image_encoder_matches_the_pipelines_image_processor(tmp_path, int_sizes):
    """Tokens = the penultimate hidden states of the pipeline's own preprocessing (WanImageToVideoPipeline:
    CLIPImageProcessor, shortest edge then centre crop, PIL bicubic) on a non-square uint8 frame: within
    the processor's uint8 rounding (squashing the whole frame instead was 99% off). int_sizes: an older
    preprocessor_config.json's "size": 32, which the processor reads as the shortest edge (it was read as
    a square resize)."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    model = tiny_clip()
    model.save_pretrained(tmp_path / "image_encoder")
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              do_center_crop=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
    proc.save_pretrained(tmp_path / "image_processor")
    if int_sizes:
        cfg_file = tmp_path / "image_processor" / "preprocessor_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "size": 32, "crop_size": 32}))
        proc = CLIPImageProcessor.from_pretrained(tmp_path / "image_processor")
        assert proc.size["shortest_edge"] == 32 and proc.crop_size["height"] == 32
    enc = ImageEncoder.from_pretrained(tmp_path / "image_encoder", tmp_path / "image_processor")
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(
        torch.rand(2, 3, 5, 9, generator=g), size=(48, 84), mode="bilinear", align_corners=False
    )
    px = (smooth * 255).round().to(torch.uint8)  # (2, 3, 48, 84)
    tokens = enc.encode(px.float() / 127.5 - 1)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 16)
    frames = [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).numpy())) for p in px]
    with torch.no_grad():
        hidden = model(**proc(images=frames, return_tensors="pt"), output_hidden_states=True).hidden_states
    assert ((tokens - hidden[-2]).norm() / hidden[-2].norm()).item() < 0.03
    assert (
        (tokens - hidden[-1]).norm() / hidden[-1].norm()
    ).item() > 0.1  # the penultimate layer, not the last


def test_wan_i2v_condition_matches_the_pipeline():
    """WanVAE.encode_i2v_condition = the condition WanImageToVideoPipeline.prepare_latents builds (its last C
    channels: VAE([image, zero frames]), normalised); its frames after the first are not zero latents (zero
    latents, what the model got before, differ by as much as the latents themselves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    vae = tiny_vae()
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    pipe.vae_scale_factor_temporal = pipe.vae_scale_factor_spatial = (
        2  # the tiny VAE's (its config says 4, 8)
    )
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, condition = pipe.prepare_latents(image, 1, Z, 16, 16, 5, torch.float32, "cpu", generator=None)
    ours = WanVAE(vae).encode_i2v_condition(image, 5)
    torch.testing.assert_close(ours, condition[:, -Z:])
    assert ours[:, :, 1:].abs().max() > 0.1


def test_load_encoders_from_a_pipeline_folder(tmp_path):
    vae, tok, umt5, clip = tiny_vae(), tiny_tokenizer(), tiny_umt5(), tiny_clip()
    vae.save_pretrained(tmp_path / "vae")
    tok.save_pretrained(tmp_path / "tokenizer")
    umt5.save_pretrained(tmp_path / "text_encoder")
    clip.save_pretrained(tmp_path / "image_encoder")
    enc = load_encoders("wan", tmp_path)
    video = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(enc.vae.encode(video), WanVAE(vae).encode(video))
    emb, lengths = enc.text.encode(["the blue block"])
    ref_emb, ref_len = TextEncoder(tok, umt5).encode(["the blue block"])
    assert emb.shape == (1, 512, 16) and torch.equal(lengths, ref_len)
    torch.testing.assert_close(emb, ref_emb)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(enc.image.encode(images), ImageEncoder(clip).encode(images))
    with pytest.raises(FileNotFoundError, match="vae"):
        load_encoders("wan", tmp_path / "text_encoder")
    with pytest.raises(ValueError, match="encoder family"):
        load_encoders("nope", tmp_path)


@pytest.mark.parametrize("hw", [(49, 49), (49, 98), (48, 84)])
def test_image_encoder_resizes_the_short_side_as_the_processor_rounds_it(hw):
    """The long side is int(shortest_edge * long / short), as CLIPImageProcessor computes it: a square 49 x 49
    frame (722 x 722 at 224) gave a one-pixel-short resize and a 32 x 1 crop. Pixels within uint8 rounding."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              do_center_crop=True, resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
    enc = ImageEncoder(tiny_clip(), size=32, shortest_edge=32)
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 5, 9, generator=g), size=hw, mode="bilinear", align_corners=False)
    px = (smooth * 255).round().to(torch.uint8)
    ours = enc.pixel_values(px.float() / 127.5 - 1)
    frame = Image.fromarray(np.ascontiguousarray(px[0].permute(1, 2, 0).numpy()))
    theirs = proc(images=[frame], return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().mean().item() < 0.02


def _processor_without(cls, folder, key: str):
    """``cls()`` saved to ``folder`` without ``key`` in its preprocessor_config.json, and read back."""
    cls().save_pretrained(folder)
    cfg_file = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg[key]
    cfg_file.write_text(json.dumps(cfg))
    return cls.from_pretrained(folder)


def _assert_matches_processor(enc, proc) -> None:
    """Our pixel values and the processor's for one smooth 240 x 420 uint8 frame: 224 x 224, within rounding."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 5, 9, generator=g), size=(240, 420), mode="bilinear")
    px = (smooth * 255).round().to(torch.uint8)
    ours = enc.pixel_values(px.float() / 127.5 - 1)
    frame = Image.fromarray(np.ascontiguousarray(px[0].permute(1, 2, 0).numpy()))
    theirs = proc(images=[frame], return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert (ours - theirs).abs().mean().item() < 0.02


@pytest.mark.parametrize("absent", ["do_center_crop", "size", "crop_size", "image_mean", "image_std"])
def test_image_encoder_takes_the_processors_defaults_for_absent_keys(tmp_path, absent):
    """A preprocessor_config.json without one of the keys the encoder reads is preprocessed as
    CLIPImageProcessor.from_pretrained reads it, with the class's default for that key (do_center_crop was
    taken as False: a non-square frame squashed instead of cropped; a missing size likewise)."""
    from transformers import CLIPImageProcessor

    folder = tmp_path / "image_processor"
    proc = _processor_without(CLIPImageProcessor, folder, absent)
    tiny_clip().save_pretrained(tmp_path / "image_encoder")
    enc = ImageEncoder.from_pretrained(tmp_path / "image_encoder", folder)
    _assert_matches_processor(enc, proc)


@pytest.mark.parametrize("absent", ["size", "image_mean", "image_std"])
def test_siglip_image_encoder_takes_the_processors_defaults_for_absent_keys(tmp_path, absent):
    """As above for SiglipImageProcessor: without "size" it resizes to 224 x 224 (the tower's own
    image_size was taken instead)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from models.encoders import SiglipImageEncoder

    folder = tmp_path / "feature_extractor"
    proc = _processor_without(SiglipImageProcessor, folder, absent)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4))  # fmt: skip
    siglip.save_pretrained(tmp_path / "image_encoder")
    enc = SiglipImageEncoder.from_pretrained(tmp_path / "image_encoder", folder)
    _assert_matches_processor(enc, proc)
