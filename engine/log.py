"""One logger for the engine, rank-0 aware, plus tqdm progress bars that stay quiet off rank 0, off a
TTY and in CI. Metrics (JSONL / TensorBoard) live in engine/metrics.py."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_LOGGER_NAME = "wmsd"


def rank() -> int:
    """This process's global rank from the torchrun environment (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return rank() == 0 or record.levelno >= logging.WARNING or os.environ.get("WMSD_LOG_ALL_RANKS") == "1"


def get_logger(name: str | None = None) -> logging.Logger:
    """The engine's logger (or a child of it). INFO on rank 0; warnings and errors on every rank."""
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s [r%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("WMSD_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root if not name else root.getChild(name)


def progress_enabled() -> bool:
    """Bars on rank 0, on a TTY, outside CI; WMSD_PROGRESS=1/0 forces them on/off."""
    forced = os.environ.get("WMSD_PROGRESS")
    if forced is not None:
        return forced == "1" and rank() == 0
    return rank() == 0 and sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, **kwargs) -> Iterator[T]:
    """tqdm over ``iterable`` when :func:`progress_enabled`, else the iterable itself."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)
