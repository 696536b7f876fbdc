"""A tiny random Qwen2.5-VL (about 0.2M parameters) with a locally trained tokenizer: no downloads.

For tests and benchmarks of the VLM plumbing (batching, padding, parsing, serving). Its answers are
random words from a small vocabulary, so it exercises every parse status but judges nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_CORPUS = [
    "Score : 0 . 5 0 . 8 1 yes no Yes No the task is solved not",
    "These are frames of a video in time order the agent pushes the red blue green block left right",
    "{ score } answer Description [ Agent ] : put move the cube onto next to",
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", *SPECIAL_TOKENS]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return fast


def build_tiny_qwen25vl(
    path: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, init_std: float = 1.0
) -> Path:
    """Write a tiny random Qwen2.5-VL folder (model, tokenizer, image processor) to ``path``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tok = _tokenizer()
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS)))
    head_dim = hidden // 4
    text = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        # mrope splits the rotary half-dim over (t, h, w)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6],
        },
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the default 0.02 init answers every prompt with the same token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init_std / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # 28x28-pixel units: 4..16 merged tokens per image keeps CPU generation in milliseconds.
    Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=2
    ).save_pretrained(path)
    return path
