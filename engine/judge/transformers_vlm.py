"""A local transformers VLM (Qwen2.5-VL class) as a chat backend and as a judge.

Inputs are built from the tokenizer and the image processor directly (not the multimodal
``AutoProcessor``, which needs torchvision for its video half): the prompt comes from the
tokenizer's chat template when it has one, else Qwen's ``<|im_start|>`` format; each image
placeholder is expanded to ``grid_t * grid_h * grid_w / merge_size**2`` image tokens, as the
Qwen2-VL processor does. Batches are left-padded and decoded greedily, so an item's answer does not
depend on what it was batched with (up to floating-point reduction order) and runs are repeatable.
Generation runs in a worker thread, one batch at a time per model, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import torch

from engine.judge.chat import ChatItem, ChatResult
from engine.judge.vlm import VLMJudge
from engine.log import get_logger

log = get_logger("judge.transformers")


def _load(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


class TransformersVLM:
    """:class:`engine.judge.chat.ChatBackend` over a local Qwen2.5-VL-class model.

    ``model_or_path``: a local model folder (weights, tokenizer, preprocessor config), or a loaded
    model together with ``tokenizer`` and ``image_processor``. bf16 on CUDA, fp32 on CPU.
    """

    def __init__(
        self,
        model_or_path,
        *,
        device: str | None = None,
        max_batch: int = 8,
        tokenizer=None,
        image_processor=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"TransformersVLM: max_batch must be >= 1, got {max_batch}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        if isinstance(model_or_path, str | os.PathLike):  # a local folder
            self.model, self.tokenizer, self.image_processor = _load(str(model_or_path), self.device, dtype)
        else:
            if tokenizer is None or image_processor is None:
                raise ValueError("TransformersVLM: a loaded model needs tokenizer= and image_processor=")
            self.model, self.tokenizer, self.image_processor = (
                model_or_path.eval(),
                tokenizer,
                image_processor,
            )
        self.max_batch = max_batch
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = self.model.config
        self._image_pad = self.tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        self._vision_start = self.tokenizer.convert_ids_to_tokens(cfg.vision_start_token_id)
        self._vision_end = self.tokenizer.convert_ids_to_tokens(cfg.vision_end_token_id)
        self._merge = int(getattr(self.image_processor, "merge_size", 2))
        self._lock = threading.Lock()

    def _template(self, n_images: int, prompt: str) -> str:
        """The prompt with one image placeholder per image (expanded later)."""
        if getattr(self.tokenizer, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        vision = f"{self._vision_start}{self._image_pad}{self._vision_end}" * n_images
        return f"<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def _inputs(self, items: list[ChatItem]) -> dict:
        images = [im for it in items for im in it.images]
        texts = [self._template(len(it.images), it.prompt) for it in items]
        inputs: dict = {}
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            counts = iter((vis["image_grid_thw"].prod(-1) // self._merge**2).tolist())
            # Replace placeholders one at a time, image by image, across the batch in order.
            texts = ["".join(self._expand(t, counts)) for t in texts]
            inputs.update(vis)
        inputs.update(self.tokenizer(texts, padding=True, return_tensors="pt"))
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _expand(self, text: str, counts):
        parts = text.split(self._image_pad)
        for i, p in enumerate(parts):
            yield p
            if i + 1 < len(parts):
                yield self._image_pad * next(counts)

    def generate(self, items: list[ChatItem]) -> list[str]:
        """Greedy answers for one batch (blocking); raises on model errors."""
        return [text for text, _ in self._generate(items)]

    @torch.inference_mode()
    def _generate(self, items: list[ChatItem]) -> list[tuple[str, bool]]:
        """(answer, stopped at the item's max_new_tokens before its end-of-answer token) per item."""
        inputs = self._inputs(items)
        max_new = max(it.max_new_tokens for it in items)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, prompt + new) -> (B, new)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        answers = []
        for row, it in zip(new, items):
            row = row[: it.max_new_tokens]
            cut = len(row) == it.max_new_tokens and not eos.intersection(row.tolist())
            answers.append((self.tokenizer.decode(row, skip_special_tokens=True).strip(), cut))
        return answers

    def _generate_locked(self, items: list[ChatItem], abandoned: threading.Event) -> list[tuple[str, bool]]:
        with self._lock:
            # its caller gave up (a batch timeout) while it waited for the model: generating it anyway
            # kept the model busy with answers nobody reads and timed out the requests queued behind it
            if abandoned.is_set():
                return []
            return self._generate(items)

    async def chat(self, items: list[ChatItem]) -> list[ChatResult]:
        """Answer ``items`` in chunks of ``max_batch``; an item that fails alone gets status "rejected" when
        the processor refused it (a ValueError: the same on every attempt), else "error"."""
        results: list[ChatResult] = []
        for s in range(0, len(items), self.max_batch):
            results += await self._chunk(items[s : s + self.max_batch])
        return results

    async def _chunk(self, chunk: list[ChatItem]) -> list[ChatResult]:
        t0 = time.perf_counter()
        abandoned = threading.Event()
        try:
            answers = await asyncio.to_thread(self._generate_locked, chunk, abandoned)
            return [ChatResult(t, "ok", time.perf_counter() - t0, cut) for t, cut in answers]
        except asyncio.CancelledError:
            abandoned.set()
            raise
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as e:
            log.warning("generation failed on a batch of %d: %r", len(chunk), e)
            if len(chunk) > 1:
                # one bad item (an image the processor refuses) failed every request batched with it
                return [r for it in chunk for r in await self._chunk([it])]
            # a ValueError is the processor refusing this input (aspect ratio, size); torch's RuntimeErrors
            # (out of memory among them) may not repeat
            status = "rejected" if isinstance(e, ValueError) else "error"
            return [ChatResult(f"{type(e).__name__}: {e}", status, time.perf_counter() - t0)]


class TransformersJudge(VLMJudge):
    """A judge on a local transformers VLM. ``model_or_path``: a folder, or a :class:`TransformersVLM`
    (to share one loaded model with a proposer)."""

    def __init__(
        self,
        model_or_path,
        *,
        device: str | None = None,
        max_batch: int = 8,
        num_frames: int = 4,
        layout: str = "separate",
        max_new_tokens: int = 32,
    ) -> None:
        vlm = (
            model_or_path
            if isinstance(model_or_path, TransformersVLM)
            else TransformersVLM(model_or_path, device=device, max_batch=max_batch)
        )
        # Greedy decoding repeats itself: asking again after a parse error cannot help.
        super().__init__(
            vlm, num_frames=num_frames, layout=layout, max_new_tokens=max_new_tokens, parse_retries=0
        )
