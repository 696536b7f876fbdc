"""The toy world's tokenizer and text encoder, built locally (no downloads).

Tokenizer: lower-cased words and the punctuation ``[agent] : , .`` over a closed vocabulary made from
the world's grammar (:data:`VOCAB`); anything else maps to ``<unk>``; id 0 is ``<pad>``. Sequences are
padded or cut to ``max_len``.

:class:`ToyTextEncoder`: learned token + position embeddings, ``layers`` pre-norm transformer
encoder layers (0 = embeddings only), a final LayerNorm; outputs at pad positions are exactly zero,
so the empty text (all pad) is the unconditional embedding (all zeros), as with Wan's padded UMT5
states. Output (B, L, dim) plus lengths (B,) = L for every row: the zero pad embeddings are part of
the sequence the DiT attends to (as diffusers' Wan does), so an empty text never masks out all keys. It is trained jointly with the Demonstrator: random
frozen embeddings were measured not to be learnable in minutes (docs/TOYWORLD.md).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.world.scene import COLOUR_NAMES, NUMBER_WORDS

_WORDS = (
    "the agent grabs block and slides it cell cells to right left then lets go put under above of "
    "a in same column as row next move moves description"
).split()
VOCAB: tuple[str, ...] = (
    ("<pad>", "<unk>", "[agent]", ":", ",", ".") + COLOUR_NAMES + tuple(NUMBER_WORDS.values()) + tuple(_WORDS)
)
_IDS = {w: i for i, w in enumerate(VOCAB)}
# a run of any other non-space characters (digits, "!", "-") is one unknown word, never dropped
_TOKEN = re.compile(r"\[agent\]|[a-z]+|[:,.]|[^\sa-z:,.]+")
PAD, UNK = 0, 1


def tokenize(texts: list[str], max_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, max_len) int64 (pad 0) and lengths (B,). Unknown words become ``<unk>``."""
    if isinstance(texts, str):
        raise TypeError("tokenize: expected a list of strings, got one string")
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    lengths = torch.zeros(len(texts), dtype=torch.long)
    for i, text in enumerate(texts):
        toks = [_IDS.get(w, UNK) for w in _TOKEN.findall(text.lower())][:max_len]
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        lengths[i] = len(toks)
    return ids, lengths


class ToyTextEncoder(nn.Module):
    """Token ids (B, L) -> embeddings (B, L, dim), zero at pad positions."""

    def __init__(self, dim: int = 64, layers: int = 1, heads: int = 4, max_len: int = 24):
        super().__init__()
        self.config = {"dim": dim, "layers": layers, "heads": heads, "max_len": max_len}
        self.max_len = max_len
        self.tok = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.tok.weight, std=0.5)
        nn.init.normal_(self.pos, std=0.1)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, dim), exactly zero at pad positions."""
        if ids.dim() != 2 or ids.shape[1] > self.max_len:
            raise ValueError(f"ids: expected (B, L <= {self.max_len}), got {tuple(ids.shape)}")
        keep = (ids != PAD).unsqueeze(-1)  # (B, L, 1)
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        pad_mask = ids == PAD
        for layer in self.layers:
            # An all-pad row would make attention NaN; unmask it (its output is zeroed below anyway).
            mask = pad_mask & ~pad_mask.all(dim=1, keepdim=True)
            h = layer(h, src_key_padding_mask=mask)
        return self.norm(h) * keep

    def cond(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> the cond entries {"text": (B, L, dim), "text_lengths": (B,)} on this module's device."""
        ids, _ = tokenize(texts, self.max_len)
        dev = self.pos.device
        full = torch.full((len(texts),), self.max_len, dtype=torch.long, device=dev)
        return {"text": self(ids.to(dev)), "text_lengths": full}
