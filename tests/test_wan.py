"""WanModel against diffusers' WanTransformer3DModel: outputs, gradients, state dicts, loading, sizes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from models import FAMILIES, build_model
from models.adapter import StateDictKeyError
from models.wan import WanConfig, WanModel
from tests import parity
from tests.parity import check_parity, check_state_dict_round_trip, rel_err

BACKENDS = ["sdpa", "torch", "triton"]
DIFFUSERS_TEXT_LEN = 512  # diffusers' Wan I2V splits image tokens off assuming 512 text tokens


def make_pair(**overrides) -> tuple[WanTransformer3DModel, WanModel]:
    return parity.make_pair(WanTransformer3DModel, WanModel, **overrides)


def i2v_overrides() -> dict:
    return dict(in_channels=12, image_dim=20, added_kv_proj_dim=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_t2v_matches_diffusers(backend):
    theirs, ours = make_pair(attention_backend=backend)
    x, t, text = torch.randn(2, 4, 3, 6, 10), torch.tensor([3.0, 870.0]), torch.randn(2, 7, 24)
    check_parity(theirs, ours, (x, t, text), {})


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_i2v_matches_diffusers(backend):
    theirs, ours = make_pair(attention_backend=backend, **i2v_overrides())
    x, t = torch.randn(1, 12, 2, 4, 6), torch.tensor([500.0])
    text, image = torch.randn(1, DIFFUSERS_TEXT_LEN, 24), torch.randn(1, 5, 20)
    check_parity(theirs, ours, (x, t, text, image), {})


def test_flf2v_image_position_embedding_matches_diffusers():
    theirs, ours = make_pair(**i2v_overrides(), pos_embed_seq_len=10)
    x, t = torch.randn(1, 12, 2, 4, 4), torch.tensor([250.0])
    text, image = torch.randn(1, DIFFUSERS_TEXT_LEN, 24), torch.randn(2, 5, 20)  # first + last frame
    check_parity(theirs, ours, (x, t, text, image), {})


@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_ti2v_per_token_timesteps_match_diffusers(backend):
    theirs, ours = make_pair(attention_backend=backend, cross_attn_norm=False)
    x, text = torch.randn(2, 4, 3, 4, 6), torch.randn(2, 9, 24)
    t = torch.rand(2, 3 * 2 * 3) * 1000  # (B, F'*H'*W')
    check_parity(theirs, ours, (x, t, text), {})


def test_state_dict_round_trip_is_bit_exact():
    theirs, ours = make_pair(**i2v_overrides(), pos_embed_seq_len=10)
    check_state_dict_round_trip(theirs, ours)


def test_export_leaves_out_the_extra_state_of_fp8_linears():
    """Transformer Engine's linears (precision.fp8 = "te") keep their FP8 scaling state as a
    '<name>._extra_state' uint8 entry of the state dict (torch's extra-state API, stood in for here): the
    export holds the weights alone, in diffusers' keys (the extra state went through the key map, a fused
    qkv's split three ways, and diffusers' strict load refused the file)."""

    class ExtraStateLinear(torch.nn.Linear):  # the state-dict side of TE's Linear
        def get_extra_state(self):
            return torch.arange(10, dtype=torch.uint8)

        def set_extra_state(self, state):
            pass

    theirs, ours = make_pair()
    want = {k: v.clone() for k, v in theirs.state_dict().items()}
    block = ours.blocks[0]
    for parent, name in ((block.self_attn, "qkv"), (block.ffn, "fc1")):
        lin = getattr(parent, name)
        new = ExtraStateLinear(lin.in_features, lin.out_features)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            new.bias.copy_(lin.bias)
        setattr(parent, name, new)
    assert "blocks.0.self_attn.qkv._extra_state" in ours.state_dict()
    sd = ours.to_diffusers_state_dict()
    theirs.load_state_dict(sd)  # strict: diffusers' keys exactly
    assert all(torch.equal(sd[k], v) for k, v in want.items())


def test_missing_and_unexpected_keys_are_listed():
    theirs, ours = make_pair()
    sd = dict(theirs.state_dict())
    del sd["blocks.1.attn1.to_k.weight"]
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictKeyError) as err:
        ours.load_diffusers_state_dict(sd)
    msg = str(err.value)
    assert "blocks.1.attn1.to_k.weight" in msg and "blocks.0.extra.weight" in msg
    # the fused group's present parts (to_q, to_v) are neither missing nor unexpected
    assert err.value.missing == ["blocks.1.attn1.to_k.weight"]
    assert err.value.unexpected == ["blocks.0.extra.weight"]
    before = ours.blocks[1].self_attn.qkv.weight.clone()
    ours.load_diffusers_state_dict(sd, strict=False)  # lenient: the fused qkv stays as it was
    assert torch.equal(ours.blocks[1].self_attn.qkv.weight, before)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_from_pretrained_reads_diffusers_folders(tmp_path, shard):
    theirs, _ = make_pair(**i2v_overrides())
    kw = {} if shard is None else {"max_shard_size": shard}
    theirs.save_pretrained(tmp_path, safe_serialization=True, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard:
        index = json.loads(next(tmp_path.glob("*.index.json")).read_text())
        assert len(set(index["weight_map"].values())) > 1, files
    ours = WanModel.from_pretrained(tmp_path)
    x, t = torch.randn(1, 12, 2, 4, 4), torch.tensor([100.0])
    text, image = torch.randn(1, DIFFUSERS_TEXT_LEN, 24), torch.randn(1, 3, 20)
    with torch.no_grad():
        assert rel_err(ours(x, t, text, image), theirs(x, t, text, image, return_dict=False)[0]) <= 1e-5
    (tmp_path / "extra.bin").write_bytes(b"")  # a stray pickle file is ignored, never unpickled
    WanModel.from_pretrained(tmp_path)


def test_from_pretrained_names_a_damaged_shard(tmp_path):
    """A truncated shard (a partial download) is an error naming that file (safetensors' own error named
    none: 'incomplete metadata, file not fully covered')."""
    theirs, _ = make_pair()
    theirs.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*-0*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name):
        WanModel.from_pretrained(tmp_path)


def test_from_pretrained_names_a_damaged_config_or_index(tmp_path):
    """A truncated config.json or shard index is an error naming that file (json's own error named none)."""
    theirs, _ = make_pair()
    theirs.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json"):
        file = tmp_path / name
        text = file.read_text()
        file.write_text(text[: len(text) // 2])
        with pytest.raises(ValueError, match=name):
            WanModel.from_pretrained(tmp_path)
        file.write_text(text)
    WanModel.from_pretrained(tmp_path)


def test_from_pretrained_takes_the_default_weights_beside_a_variant(tmp_path):
    """A folder with diffusion_pytorch_model.safetensors and a variant file beside it (save_pretrained with
    variant="fp16" writes diffusion_pytorch_model.fp16.safetensors) loads the default one, as diffusers does
    (it was refused: 'expected one *.safetensors file')."""
    theirs, _ = make_pair()
    other, _ = make_pair()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = WanModel.from_pretrained(tmp_path)
    x, t, text = torch.randn(1, 4, 3, 6, 10), torch.tensor([300.0]), torch.randn(1, 7, 24)
    with torch.no_grad():
        assert rel_err(ours(x, t, text), theirs(x, t, text, return_dict=False)[0]) <= 1e-5


def test_from_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(WanConfig.flavour("debug").to_diffusers_config()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        WanModel.from_pretrained(tmp_path)


def test_without_text_len_predict_velocity_attends_to_valid_tokens_only():
    """text_len None (the toy world's models): the text past each prompt's length is masked out, not
    padded and attended to."""
    _, ours = make_pair()
    ours.cfg.text_len = None
    x, t, text, lengths = (
        torch.randn(2, 4, 1, 4, 4),
        torch.tensor([0.3, 0.7]),
        torch.randn(2, 6, 24),
        torch.tensor([2, 6]),
    )
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "text_lengths": lengths})
        ref = ours(x, 1000 * t, text, encoder_lengths=lengths)
    assert torch.equal(v, ref)


def test_encoder_lengths_equal_truncated_text():
    _, ours = make_pair()
    x, t, text = torch.randn(2, 4, 1, 4, 4), torch.tensor([10.0, 900.0]), torch.randn(2, 8, 24)
    with torch.no_grad():
        masked = ours(x, t, text, encoder_lengths=torch.tensor([3, 8]))
        short = ours(x[:1], t[:1], text[:1, :3])
        full = ours(x[1:], t[1:], text[1:])
    assert rel_err(masked[:1], short) <= 1e-5 and rel_err(masked[1:], full) <= 1e-5


def _pipeline_i2v_input(x, image):
    """Wan2.1 I2V input written out independently: [x, mask (4 ch, frame 0), image padded with zeros]."""
    B, C, Fr, h, w = x.shape
    mask = torch.zeros(B, 4, Fr, h, w)
    mask[:, :, 0] = 1
    padded = torch.zeros(B, C, Fr, h, w)
    padded[:, :, :1] = image
    return torch.cat([x, mask, padded], 1)


def _pipeline_text(text, lengths=None):
    """WanPipeline's prompt states, written out independently: rows past each length zero, then zero rows up
    to max_sequence_length = 512, no attention mask."""
    out = torch.zeros(text.shape[0], DIFFUSERS_TEXT_LEN, text.shape[2])
    for b in range(text.shape[0]):
        n = text.shape[1] if lengths is None else int(lengths[b])
        out[b, :n] = text[b, :n]
    return out


def test_predict_velocity_t2v_and_i2v():
    theirs, ours = make_pair()
    x, t, text = torch.randn(2, 4, 2, 4, 4), torch.tensor([0.25, 0.9]), torch.randn(2, 5, 24)
    lengths = torch.tensor([3, 5])
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "text_lengths": lengths})
        assert rel_err(v, theirs(x, 1000 * t, _pipeline_text(text, lengths), return_dict=False)[0]) <= 1e-5
    theirs, ours = make_pair(**i2v_overrides())
    image, tokens = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 5, 20)
    text = torch.randn(2, DIFFUSERS_TEXT_LEN, 24)
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "image_latent": image, "image_tokens": tokens})
        ref = theirs(_pipeline_i2v_input(x, image), 1000 * t, text, tokens, return_dict=False)[0]
    assert v.shape == x.shape and rel_err(v, ref) <= 1e-5
    # with the pipeline's condition (VAE of [image, zero frames]: not zero latents after frame 0)
    condition = torch.randn(2, 4, 2, 4, 4)
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "image_latent": condition[:, :, :1],
                                         "image_tokens": tokens, "image_condition": condition})  # fmt: skip
        x_in = torch.cat([x, _pipeline_i2v_input(x, image)[:, 4:8], condition], 1)
        ref = theirs(x_in, 1000 * t, text, tokens, return_dict=False)[0]
    assert rel_err(v, ref) <= 1e-5
    with pytest.raises(ValueError, match="image_latent"):
        ours.predict_velocity(x, t, {"text": text})


def test_predict_velocity_i2v_with_fewer_than_four_latent_channels():
    """Wan2.1 I2V on C < 4 latent channels (in_channels = 2C + 4): the frame mask has 4 channels whatever C
    (it was zeros_like(x_t[:, :4]), C channels: the input had 3C channels and the forward raised)."""
    theirs, ours = make_pair(in_channels=8, out_channels=2, image_dim=20, added_kv_proj_dim=32)
    x, t, image = torch.randn(2, 2, 2, 4, 4), torch.tensor([0.25, 0.9]), torch.randn(2, 2, 1, 4, 4)
    text, tokens = torch.randn(2, DIFFUSERS_TEXT_LEN, 24), torch.randn(2, 5, 20)
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "image_latent": image, "image_tokens": tokens})
        ref = theirs(_pipeline_i2v_input(x, image), 1000 * t, text, tokens, return_dict=False)[0]
    assert v.shape == x.shape and rel_err(v, ref) <= 1e-5


def test_predict_velocity_per_token_t_without_image():
    theirs, ours = make_pair()
    x, text = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 24)
    t = torch.rand(1, 2 * 2 * 2)
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text})
        assert rel_err(v, theirs(x, 1000 * t, _pipeline_text(text), return_dict=False)[0]) <= 1e-5


def test_predict_velocity_takes_a_bf16_t_at_full_precision():
    """t in bf16 reaches diffusers' timestep as 1000 * t in fp32 (1000 * t in bf16 rounded 0.3008 * 1000 to
    300, a step of 2 there), as HunyuanVideo15Model.predict_velocity does."""
    theirs, ours = make_pair()
    x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 5, 24)
    t = torch.tensor([0.3, 0.7]).bfloat16()
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text})
        ref = theirs(x, 1000 * t.float(), _pipeline_text(text), return_dict=False)[0]
        assert rel_err(v, ref) <= 1e-5


def test_predict_velocity_ti2v_first_frame():
    theirs, ours = make_pair()
    x, t, text = torch.randn(2, 4, 3, 4, 6), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 24)
    image = torch.randn(2, 4, 1, 4, 6)
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {"text": text, "image_latent": image})
        x_in = torch.cat([image, x[:, :, 1:]], 2)
        ts = (1000 * t)[:, None].repeat(1, 3 * 2 * 3)
        ts[:, : 2 * 3] = 0  # frame-0 tokens are clean
        ref = theirs(x_in, ts, _pipeline_text(text), return_dict=False)[0]
    assert rel_err(v[:, :, 1:], ref[:, :, 1:]) <= 1e-5
    # An Euler step along v lands frame 0 on the line from the image to x_t: exactly the image at t = 0.
    x0 = x[:, :, 0] - t.view(2, 1, 1, 1) * v[:, :, 0]
    torch.testing.assert_close(x0, image[:, :, 0])


@pytest.mark.parametrize("mode", ["t2v", "ti2v", "flf2v"])
def test_recipes_work_logs_count_what_predict_velocity_runs(mode):
    """recipes.common.work_logs (the trainer's MFU input) equals torch's FLOP counter on predict_velocity: the
    text padded to text_len, TI2V's per-token timesteps, FLF2V's two frames of image tokens per sample."""
    from recipes.common import work_logs

    if mode == "flf2v":
        _, ours = make_pair(**i2v_overrides(), pos_embed_seq_len=10, attention_backend="torch")
        x = torch.randn(2, 4, 2, 4, 4)
        cond = {
            "text": torch.randn(2, 5, 24),
            "image_latent": x[:, :, :1],
            "image_tokens": torch.randn(4, 5, 20),
        }
    else:
        _, ours = make_pair(attention_backend="torch")
        x = torch.randn(2, 4, 3, 4, 4)
        cond = {"text": torch.randn(2, 5, 24), "text_lengths": torch.tensor([3, 5])}
        if mode == "ti2v":
            cond["image_latent"] = x[:, :, :1]
    ours.cfg.text_len = 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours.predict_velocity(x, torch.tensor([0.3, 0.7]), cond)
    logs = work_logs(ours, x, cond)
    assert abs(logs["num_flops"] / counter.get_total_flops() - 1) < 1e-6, (logs, counter.get_total_flops())


def test_flops_per_token_matches_flop_counter():
    for overrides, tokens in [({}, None), (i2v_overrides(), torch.randn(1, 5, 20))]:
        _, ours = make_pair(attention_backend="torch", **overrides)
        cin = ours.cfg.in_channels
        x, t, text = torch.randn(1, cin, 2, 4, 6), torch.tensor([1.0]), torch.randn(1, 7, 24)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ours(x, t, text, tokens)
        S = 2 * 2 * 3
        ours_count = ours.flops_per_token(S, 7, image_len=5) * S
        assert abs(ours_count - counter.get_total_flops()) / counter.get_total_flops() < 1e-9
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # per-token timesteps (TI2V)
        ours(x, torch.rand(1, S) * 1000, text, tokens)
    assert (
        abs(
            ours.flops_per_token(S, 7, image_len=5, per_token_timestep=True) * S / counter.get_total_flops()
            - 1
        )
        < 1e-9
    )


@pytest.mark.parametrize("flavour,nominal", [("1.3B", 1.3e9), ("14B", 14e9), ("i2v-14B-480p", 14e9),
                                             ("ti2v-5B", 5e9)])  # fmt: skip
def test_real_sizes_on_meta_match_diffusers(flavour, nominal):
    cfg = WanConfig.flavour(flavour)
    ours = build_model("wan", flavour, device="meta")
    with torch.device("meta"):
        theirs = WanTransformer3DModel(**cfg.to_diffusers_config())
    n = ours.num_params()
    assert n == sum(p.numel() for p in theirs.parameters())
    assert 0.9 * nominal < n < 1.25 * nominal


def test_toy_flavour_and_registry():
    assert "wan" in FAMILIES
    model = build_model("wan", "toy")
    x, image = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 1, 8, 8)
    v = model.predict_velocity(
        x,
        torch.rand(2),
        {"text": torch.randn(2, 6, 64), "image_latent": image, "text_lengths": torch.tensor([6, 2])},
    )
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="unknown fields"):
        build_model("wan", "toy", hidden=3)
    with pytest.raises(ValueError, match="flavour"):
        build_model("wan", "huge")


def test_bad_inputs_are_named():
    _, ours = make_pair()
    with pytest.raises(ValueError, match="hidden_states"):
        ours(torch.randn(1, 5, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="timestep"):
        ours(torch.randn(1, 4, 1, 4, 4), torch.tensor([1.0, 2.0]), torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="patch"):
        ours(torch.randn(1, 4, 1, 5, 4), torch.tensor([1.0]), torch.randn(1, 3, 24))
    x, t = torch.randn(2, 4, 1, 4, 4), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"encoder_hidden_states: expected \(2, L, 24\), got \(2, 3, 25\)"):
        ours(x, t, torch.randn(2, 3, 25))
    with pytest.raises(ValueError, match=r"encoder_hidden_states: expected \(2, L, 24\), got \(1, 3, 24\)"):
        ours(x, t, torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="encoder_hidden_states_image: this model has no image projection"):
        ours(x, t, torch.randn(2, 3, 24), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"encoder_lengths: expected an int tensor of shape \(2,\)"):
        ours(x, t, torch.randn(2, 3, 24), encoder_lengths=torch.tensor([3, 3, 3]))
    _, flf2v = make_pair(**i2v_overrides(), pos_embed_seq_len=10)
    x, text = torch.randn(2, 12, 1, 4, 4), torch.randn(2, 3, 24)
    for n in (1, 2):  # FLF2V needs two images per sample: one each was paired across samples, or crashed
        with pytest.raises(ValueError, match=rf"encoder_hidden_states_image: expected \({2 * n}, N, 20\)"):
            flf2v(x[:n], t[:n], text[:n], torch.randn(n, 5, 20))


def test_training_after_an_inference_mode_forward():
    """The RoPE tables cached by a first forward under torch.inference_mode are ordinary tensors: a later
    training forward on the same grid can save them for backward (it raised)."""
    _, ours = make_pair()
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 24)
    with torch.inference_mode():
        ours(x, t, text)
    ours(x, t, text).square().mean().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_from_pretrained_reads_out_channels_null(tmp_path):
    """diffusers writes "out_channels": null for out = in; the loader reads it as in_channels."""
    theirs, _ = make_pair()
    config = {**theirs.config, "out_channels": None}
    folder = tmp_path / "m"
    WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(
        folder
    )
    assert json.loads((folder / "config.json").read_text())["out_channels"] is None
    assert WanModel.from_pretrained(folder).cfg.out_channels == config["in_channels"]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_of_a_bf16_folder_gives_diffusers_dtypes(tmp_path, dtype):
    """A folder saved in bf16 loads with diffusers' dtypes: dtype=None gives fp32 throughout (diffusers'
    torch_dtype=None; it kept the folder's bf16, keep_fp32 modules included), bf16 keeps diffusers'
    _keep_in_fp32_modules in fp32."""
    theirs, _ = make_pair()
    theirs.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    got = WanModel.from_pretrained(tmp_path, dtype=dtype).to_diffusers_state_dict()
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, value in theirs.state_dict().items():
        fp32 = dtype is None or any(m in name.split(".") for m in keep)
        assert got[name].dtype == (torch.float32 if fp32 else dtype), name
        assert torch.equal(got[name].float(), value.float()), name
    if importlib.util.find_spec("accelerate"):  # diffusers' own loader (it needs accelerate for keep_fp32)
        ref = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=dtype).state_dict()
        assert {k: v.dtype for k, v in got.items()} == {k: ref[k].dtype for k in got}


def test_cast_keeps_fp32_modules_and_bf16_is_close_to_fp32():
    _, ours = make_pair()
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([5.0]), torch.randn(1, 3, 24)
    with torch.no_grad():
        ref = ours(x, t, text)
        ours.cast(torch.bfloat16)
        out = ours(x.bfloat16(), t, text.bfloat16())
    assert ours.blocks[0].modulation.dtype == torch.float32
    assert ours.time_embed.linear_1.weight.dtype == torch.float32
    assert ours.blocks[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gpu_bf16_error_within_twice_diffusers_bf16(backend):
    """bf16 on CUDA: our error vs an fp32 reference is at most ~2x diffusers' bf16 error (outputs, input grads)."""
    cfg = dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, attention_backend=backend)
    theirs, ours = make_pair(**cfg)
    theirs, ours = theirs.cuda(), ours.cuda()
    x = torch.randn(2, 4, 5, 16, 24, device="cuda")
    t, text = torch.tensor([30.0, 700.0], device="cuda"), torch.randn(2, 40, 24, device="cuda")
    w = torch.randn(2, 4, 5, 16, 24, device="cuda")

    def run(model, dtype, diffusers):
        xi = x.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf per run
        out = (
            model(xi, t, text.to(dtype), return_dict=False)[0] if diffusers else model(xi, t, text.to(dtype))
        )
        (out.float() * w).sum().backward()
        return out.float(), xi.grad.float()

    ref_out, ref_grad = run(theirs, torch.float32, True)
    their_out, their_grad = run(theirs.to(torch.bfloat16), torch.bfloat16, True)
    our_out, our_grad = run(ours.to(torch.bfloat16), torch.bfloat16, False)
    assert rel_err(our_out, ref_out) <= 2 * rel_err(their_out, ref_out) + 1e-3
    assert rel_err(our_grad, ref_grad) <= 2 * rel_err(their_grad, ref_grad) + 1e-3


def _tiny_vae_4x():
    """A tiny random Wan VAE with the real models' 4x temporal compression (4x spatial)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[True, True], latents_mean=[0.5, -0.2, 0.1, 0.3],
                            latents_std=[2.0, 0.5, 1.5, 1.0]).eval()  # fmt: skip


def _pipeline_flf2v(vae, image, last, num_frames):
    """WanImageToVideoPipeline.prepare_latents' condition with last_image, one sample at a time:
    (B, 4 + C, F, h, w), the 4 mask channels then VAE([image, zeros, last_image])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    pipe.vae_scale_factor_temporal = pipe.vae_scale_factor_spatial = 4
    H, W = image.shape[2:]
    parts = [
        pipe.prepare_latents(
            image[b : b + 1], 1, 4, H, W, num_frames, torch.float32, "cpu", last_image=last[b : b + 1]
        )[1]  # fmt: skip
        for b in range(image.shape[0])
    ]
    return torch.cat(parts)


def test_predict_velocity_flf2v_matches_the_pipelines_condition():
    """FLF2V (cond["last_image_latent"]): predict_velocity's input is the pipeline's [x, mask, condition] with
    last_image: the mask also marks the last pixel frame (channel 3 of latent frame F-1); the condition is
    the given image_condition (the pipeline's VAE encoding), or the toy world's first and last latents with
    zeros between. It was built for the first frame only."""
    from models.encoders import WanVAE

    theirs, ours = make_pair(**i2v_overrides(), pos_embed_seq_len=10)
    g = torch.Generator().manual_seed(0)
    image, last = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    vae = _tiny_vae_4x()
    with torch.no_grad():
        pipe_cond = _pipeline_flf2v(vae, image, last, 9)  # (2, 4 + 4, 3, 4, 4)
    x, t = torch.randn(2, 4, 3, 4, 4), torch.tensor([0.4, 0.85])
    text, tokens = torch.randn(2, DIFFUSERS_TEXT_LEN, 24), torch.randn(4, 5, 20)  # first, last per sample
    condition = WanVAE(vae).encode_i2v_condition(image, 9, last_image=last)
    torch.testing.assert_close(condition, pipe_cond[:, 4:])
    first, final = WanVAE(vae).encode(image.unsqueeze(2)), WanVAE(vae).encode(last.unsqueeze(2))
    cond = {"text": text, "image_latent": first, "last_image_latent": final, "image_tokens": tokens}
    with torch.no_grad():
        v = ours.predict_velocity(x, t, {**cond, "image_condition": condition})
        ref = theirs(torch.cat([x, pipe_cond], 1), 1000 * t, text, tokens, return_dict=False)[0]
        assert rel_err(v, ref) <= 1e-5
        toy = torch.zeros_like(x)
        toy[:, :, 0], toy[:, :, -1] = first[:, :, 0], final[:, :, 0]
        v = ours.predict_velocity(x, t, cond)
        ref = theirs(torch.cat([x, pipe_cond[:, :4], toy], 1), 1000 * t, text, tokens, return_dict=False)[0]
        assert rel_err(v, ref) <= 1e-5
    with pytest.raises(ValueError, match="last_image_latent"):
        ours.predict_velocity(x[:, :, :1], t, cond)  # one frame: no room for a last frame


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_flops_context_counts_a_per_token_t(mode):
    """A per-token t (B, S) without TI2V's image latent runs the time embedding per token: flops_context(cond,
    t) counts what torch's FLOP counter sees on predict_velocity (cond alone said per sample, ~1.3% under at
    the real sizes)."""
    overrides = i2v_overrides() if mode == "i2v" else {}
    _, ours = make_pair(attention_backend="torch", **overrides)
    x, S = torch.randn(2, 4, 3, 4, 4), 3 * 2 * 2
    cond = {"text": torch.randn(2, 5, 24), "text_lengths": torch.tensor([3, 5])}
    if mode == "i2v":
        cond.update(image_latent=x[:, :, :1], image_tokens=torch.randn(2, 5, 20))
    for t in (torch.rand(2), torch.rand(2, S)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ours.predict_velocity(x, t, cond)
        count = 2 * S * ours.flops_per_token(S, **ours.flops_context(cond, t))
        assert abs(count / counter.get_total_flops() - 1) < 1e-9, (t.shape, count, counter.get_total_flops())


def test_training_under_bf16_autocast_takes_the_fused_qk_rms_norm():
    """The single-process trainer's precision (fp32 weights, bf16 autocast): q and k's RMSNorm had an fp32
    weight beside a bf16 input, and torch.rms_norm fell back to its composite path (about ten kernels over q or k
    each way; torch warns "Cannot dispatch to fused implementation"). Now the weight is cast to the input's
    dtype: no such warning in a training step, the same velocity as with the weights rounded to bf16 first
    (what FSDP2's bf16 parameters give) and a gradient on the fp32 norm weights."""
    import warnings

    torch.manual_seed(0)
    model = build_model("wan", "toy")
    x = torch.randn(1, model.cfg.in_channels, 2, 8, 8)
    t, text = torch.tensor([500.0]), torch.randn(1, 8, model.cfg.text_dim)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        out = model(x, t, text)
        out.float().square().mean().backward()
    fallback = [str(w.message) for w in caught if "fused implementation" in str(w.message)]
    assert not fallback, fallback[0]
    norm = model.blocks[0].self_attn.norm_q
    assert norm.weight.dtype == torch.float32 and norm.weight.grad is not None
    assert norm.weight.grad.abs().sum() > 0
    rounded = build_model("wan", "toy")
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x, t, text).float(), rounded(x, t, text).float()
    assert rel_err(a, b) < 2e-2, rel_err(a, b)
