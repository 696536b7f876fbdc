"""The skip list: every file or row the data pipeline refuses, with the reason, warned and kept.

Entries go to memory (``entries``, a list of ``(path, reason)``) and, when a path is given, are
appended as JSON lines ``{"path", "reason", "time"}`` to that file, so a long run leaves a record of
what it left out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.log import get_logger

log = get_logger("data")


class Quarantine:
    """Collects skipped items; ``add`` warns once per item and appends to the JSONL file if any."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.entries: list[tuple[str, str]] = []

    def add(self, path: str | Path, reason: str) -> None:
        """Record ``path`` as skipped because of ``reason``."""
        self.entries.append((str(path), reason))
        log.warning("skipping '%s': %s", path, reason)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"path": str(path), "reason": reason, "time": time.time()}) + "\n")
            except OSError as e:  # a read-only dataset or cache: the skip stands, only its record is lost
                log.warning("quarantine file '%s' not written (%s)", self.path, e)

    def __len__(self) -> int:
        return len(self.entries)
