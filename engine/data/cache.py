"""Latent + text-embedding cache: encode a dataset once, train from sharded safetensors.

Layout of a cache folder::

    index.json                 {"version", "fingerprint", "num_rows", "shard_size",
                                "shards": {name: {"sha256", "bytes", "rows": [first, end), "items",
                                                  "sources": [[path, size, mtime_ns] | [path], ...]}}}
    shard-00000.safetensors    per item j: "j.latent" (C, T', H', W'), "j.first_frame_latent" (C, 1, H', W'),
                               "j.<field>" (L_j, D) text embedding cut to its length, and
                               "j.<field>.<name>" (L, D') for each further sequence the text encoder's
                               ``cond`` returns (HunyuanVideo-1.5: "text_2", the ByT5 glyph states);
                               metadata "items": JSON list of {"index", "path", "fields"}
    quarantine.jsonl           skipped rows/files and corrupt shards, one JSON line each
    quarantine/                corrupt shards moved aside

Shard k holds the usable items of dataset rows [k * shard_size, (k + 1) * shard_size), so the same
row always lands in the same shard. The writer is resumable: a shard counts as done only once its
file was renamed into place *and* the index lists it with a matching sha256 and its rows' source files are
unchanged (size, mtime); anything else (a crash mid-shard, a quarantined shard, a video replaced in place) is
encoded again. The reader verifies each shard's sha256 on first
use; a mismatch is warned, the shard moved to ``quarantine/`` and its items skipped. Running the
writer again re-creates it. Training from the cache never loads the VAE or the text encoder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.data.dataset import SkipItem, iterate_skipping
from engine.data.quarantine import Quarantine
from engine.dist import proc_stat
from engine.log import get_logger, progress

log = get_logger("data")

CACHE_VERSION = 1


class VideoEncoder(Protocol):
    """A VAE: video (B, 3, T, H, W) in [-1, 1] -> latents (B, C, T', H', W')."""

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...


class TextEncoder(Protocol):
    """Texts -> the text entries of a model's cond dict: "text" (B, L, D) + "text_lengths" (B,), and any
    further sequence "<name>" (B, L', D') with its "<name>_lengths" (B,) (models.encoders: ``cond``)."""

    def cond(self, texts: list[str]) -> dict[str, torch.Tensor]: ...


class MapDataset(Protocol):
    """What the writer reads: ``len`` rows, ``ds[i]`` a dict with "video" or raises SkipItem."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_name(path: Path, suffix: str) -> Path:
    """A temporary name next to ``path`` that no other process or thread writing the same cache (on a shared
    file system: of any machine) uses."""
    return path.with_name(f"{path.name}.{_host()}.{os.getpid()}-{threading.get_ident()}{suffix}")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock: released when its holder dies)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _writer_alive(p: Path) -> bool | None:
    """Whether the writer whose temporary file or claim ``p`` is (a name of _tmp_name) runs; None: another
    machine's (its process ids are not ours to check) or not such a name."""
    m = re.fullmatch(r".+\.([A-Za-z0-9_-]+)\.(\d+)-\d+\.(partial|tmp|claim)", p.name)
    if m is None or m.group(1) != _host():
        return None
    pid = int(m.group(2))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user
    # a writer that died and was not yet reaped (a zombie) answers signal 0 too; without /proc (or a process
    # that ended just now) signal 0 is all there is
    stat = proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _remove_orphans(folder: Path) -> None:
    """Delete the temporary files and claims of this machine's writers that died (a crash mid-shard)."""
    for p in [*folder.glob("*.partial"), *folder.glob("*.tmp"), *folder.glob("*.claim")]:
        if _writer_alive(p) is False:
            p.unlink(missing_ok=True)


def _sources(dataset: MapDataset, rows: range) -> list[list]:
    """``[path, size, mtime_ns]`` (``[path]`` where missing) of the files of dataset rows ``rows`` (a dataset with
    ``rows``, as VideoDataset: every row's, the skipped ones too); [] for a dataset without them."""
    table = getattr(dataset, "rows", None)
    if not isinstance(table, list):
        return []
    out = []
    for i in rows:
        path = table[i].get("path") if isinstance(table[i], dict) else None
        if path is None:
            continue
        try:
            st = os.stat(path)
            out.append([str(path), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(path)])
    return out


def _read_index(path: Path) -> dict[str, Any]:
    """A cache's index.json; ValueError naming it where it is no JSON object (an interrupted copy of the cache)."""
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cache index '{path}' is unreadable ({type(e).__name__}: {e}); restore it from the "
                         "original cache, or delete the cache folder and precompute it again") from None  # fmt: skip
    if not isinstance(index, dict):
        raise ValueError(f"cache index '{path}': expected a JSON object, got {str(index)[:100]}")
    return index


class _SilentQuarantine(Quarantine):
    """A DataLoader worker's quarantine: records only; the main process adds the entries in row order."""

    def add(self, path: str | Path, reason: str) -> None:
        self.entries.append((str(path), reason))


class _Rows(torch.utils.data.Dataset):
    """Rows ``rows`` of ``dataset`` for DataLoader workers: ``(i, item or None, quarantine entries)``, None and
    the entries the worker's copy of the dataset recorded for a row that raised SkipItem."""

    def __init__(self, dataset: MapDataset, rows: range):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[int, dict[str, Any] | None, list[tuple[str, str]]]:
        i, q = self.rows[k], getattr(self.dataset, "quarantine", None)
        seen = len(q.entries) if isinstance(q, Quarantine) else 0
        try:
            return i, self.dataset[i], []
        except SkipItem:
            return i, None, list(q.entries[seen:]) if isinstance(q, Quarantine) else []

    @staticmethod
    def init_worker(_: int) -> None:
        ds = torch.utils.data.get_worker_info().dataset.dataset
        if isinstance(getattr(ds, "quarantine", None), Quarantine):
            ds.quarantine = _SilentQuarantine()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path, ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShapeBatches:
    """Encodes inputs in batches of ``batch_size`` of one shape as they come (the rest at ``flush``), so that a
    shard's clips are never all in memory at once; batches are those of grouping the shard's inputs by shape."""

    def __init__(self, fn, batch_size: int):
        self.fn, self.batch_size = fn, batch_size
        self.groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}

    def add(self, j: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Queue input ``j``; returns ``(j, output)`` of the batch it completed, if any."""
        group = self.groups.setdefault(tuple(x.shape), [])
        group.append((j, x))
        return self._encode(self.groups.pop(tuple(x.shape))) if len(group) == self.batch_size else []

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        out = [r for group in self.groups.values() for r in self._encode(group)]
        self.groups.clear()
        return out

    def _encode(self, group: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        z = self.fn(torch.stack([x for _, x in group]))  # n x (3, T, H, W) -> (n, 3, T, H, W)
        return [(j, zj.detach().cpu().contiguous()) for (j, _), zj in zip(group, z)]


def _encode_texts(enc: TextEncoder, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Per text: sequence name ("text", "text_2", ...) -> (L_j, D) cut to its length, on the CPU."""
    out: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(texts), batch_size):
        batch = texts[s : s + batch_size]
        cond = enc.cond(batch)
        names = [k for k in cond if not k.endswith("_lengths")]
        if "text" not in names:
            raise ValueError(
                f"text encoder: cond() must return 'text' and 'text_lengths', got {sorted(cond)}"
            )
        rows: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for name in names:
            emb, lengths = cond[name], cond.get(f"{name}_lengths")
            if emb.dim() != 3 or lengths is None or lengths.shape != (emb.shape[0],):
                raise ValueError(
                    f"text encoder: expected {name!r} (B, L, D) with {name + '_lengths'!r} (B,), got "
                    f"{tuple(emb.shape)}, {None if lengths is None else tuple(lengths.shape)}"
                )
            for row, e, n in zip(rows, emb, lengths):
                row[name] = e[: int(n)].detach().cpu().contiguous()
        out += rows
    return out


class LatentCacheWriter:
    """Encodes a map-style dataset into a sharded cache (see the module docstring)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        vae: VideoEncoder,
        text_encoder: TextEncoder | None = None,
        text_fields: Sequence[str] = ("task", "solution", "caption"),
        shard_size: int = 64,
        batch_size: int = 4,
        first_frame: bool = True,
        dtype: torch.dtype | None = None,
        fingerprint: dict[str, Any] | None = None,
        num_workers: int = 0,
    ):
        if shard_size < 1 or batch_size < 1:
            raise ValueError(f"cache: shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
        if num_workers < 0:
            raise ValueError(f"cache: num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers  # not in the fingerprint: a shard holds the same either way
        self.out = Path(out_dir)
        self.vae, self.text_encoder, self.text_fields = vae, text_encoder, list(text_fields)
        self.shard_size, self.batch_size, self.first_frame, self.dtype = (
            shard_size,
            batch_size,
            first_frame,
            dtype,
        )
        self.fingerprint = {
            "text_fields": self.text_fields,
            "first_frame": first_frame,
            # the stored dtype (absent for the encoders' own, as caches written before it was recorded)
            **({"dtype": str(dtype).removeprefix("torch.")} if dtype is not None else {}),
            **(fingerprint or {}),
        }

    def _load_index(self, num_rows: int) -> dict[str, Any]:
        path = self.out / "index.json"
        fresh = {
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "num_rows": num_rows,
            "shard_size": self.shard_size,
            "shards": {},
        }
        if not path.exists():
            return fresh
        index = _read_index(path)
        for key in ("version", "fingerprint", "num_rows", "shard_size"):
            if index.get(key) != fresh[key]:
                raise ValueError(
                    f"cache '{self.out}' was written with {key}={index.get(key)!r}, this run has {fresh[key]!r}; "
                    "use another cache_dir or delete this one"
                )
        return index

    def _done(self, index: dict[str, Any], name: str, sources: list[list]) -> bool:
        entry = index["shards"].get(name)
        path = self.out / name
        return (
            bool(entry)
            and entry.get("sources", sources) == sources  # a source file replaced: its latents are stale
            and path.is_file()
            and path.stat().st_size == entry["bytes"]
            and sha256_file(path) == entry["sha256"]
        )

    def write(self, dataset: MapDataset) -> dict[str, Any]:
        """Encode every shard not already complete; returns the index.

        Several writers (ranks) may write one cache at once: each shard goes to a temporary file of its own and
        is renamed into place together with its index entry under a lock, the index re-read from disk there, so
        no writer's shards are lost from the index and every entry matches the file on disk. A writer claims the
        shard it encodes (``claims/<shard>.<host>.<pid>-<thread>.claim``) and first takes the shards nobody
        claimed, so the writers share the work; then it waits for those a live writer of this machine encodes and
        encodes the others still unfinished (another machine's writer's, or a dead one's)."""
        self.out.mkdir(parents=True, exist_ok=True)
        n = len(dataset)
        lock = self.out / "index.json.lock"
        with _exclusive(lock):
            index = self._load_index(n)
            _remove_orphans(self.out)
            _remove_orphans(self.out / "claims")
        num_shards = -(-n // self.shard_size)
        claimed = [k for k in progress(range(num_shards), desc="cache shards", total=num_shards)
                   if not self._write_shard(dataset, k, lock, defer=lambda c: True)]  # fmt: skip
        while claimed:
            claimed = [k for k in claimed if not self._write_shard(dataset, k, lock, defer=_writer_alive)]
            time.sleep(0.2 if claimed else 0)
        with _exclusive(lock):
            index = self._load_index(n)
        log.info(
            "cache '%s': %d shards, %d items",
            self.out,
            num_shards,
            sum(s["items"] for s in index["shards"].values()),
        )
        return index

    def _write_shard(self, dataset: MapDataset, k: int, lock: Path, *, defer: Callable[[Path], Any]) -> bool:
        """Encode and commit shard ``k`` unless it is done; False where it is left to a writer that claimed it
        (a claim for which ``defer`` is true)."""
        n = len(dataset)
        name = f"shard-{k:05d}.safetensors"
        rows = (k * self.shard_size, min(n, (k + 1) * self.shard_size))
        # the files' identity before they are read: one changed while encoding is seen by the next run
        sources = _sources(dataset, range(*rows))
        with _exclusive(lock):
            index = self._load_index(n)  # another writer may have finished this shard
            if self._done(index, name, sources):
                return True
            # in a folder of their own: a glob among the shards costs O(shards) per shard
            found = list((self.out / "claims").glob(f"{name}.*.claim"))
            claims = [c for c in found if _writer_alive(c) is not False]
            for c in set(found) - set(claims):
                c.unlink(missing_ok=True)  # of a writer of this machine that died
            if any(defer(c) for c in claims):
                return False  # another writer is encoding it
            claim = _tmp_name(self.out / "claims" / name, ".claim")
            claim.parent.mkdir(exist_ok=True)
            claim.touch()
        try:
            tensors, items = self._encode_rows(dataset, range(*rows))
            tmp = self._save_shard(name, tensors, items)
            entry = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size, "rows": list(rows),
                     "items": len(items), "sources": sources}  # fmt: skip
            with _exclusive(lock):
                index = self._load_index(n)
                os.replace(tmp, self.out / name)
                index["shards"][name] = entry
                _atomic_write_text(self.out / "index.json", json.dumps(index, indent=1))
        finally:
            claim.unlink(missing_ok=True)
        return True

    def _save_shard(self, name: str, tensors: dict[str, torch.Tensor], items: list[dict[str, Any]]) -> Path:
        """Write the shard to a temporary file of this writer's (synced); returns its path."""
        from safetensors.torch import save_file

        tmp = _tmp_name(self.out / name, ".partial")
        save_file(tensors, str(tmp), metadata={"items": json.dumps(items)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return tmp

    def _read(self, dataset: MapDataset, rows: range) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(i, dataset[i])`` in row order, rows that raise SkipItem left out: read here, or with ``num_workers``
        in DataLoader worker processes (spawned where this process uses CUDA), so decoding overlaps encoding."""
        if self.num_workers == 0:
            for i in rows:
                try:
                    item = dataset[i]
                except SkipItem:
                    continue
                yield i, item
                del item  # the clip's memory is freed before the next is read
            return
        loader = torch.utils.data.DataLoader(
            _Rows(dataset, rows), batch_size=None, num_workers=min(self.num_workers, len(rows)),
            worker_init_fn=_Rows.init_worker, multiprocessing_context="spawn" if torch.cuda.is_initialized() else None,
        )  # fmt: skip
        q = getattr(dataset, "quarantine", None)
        for i, item, skipped in loader:
            for path, reason in skipped:  # the main process's quarantine, as dataset[i] here would have
                q.add(path, reason)
            if item is not None:
                yield i, item
            del item

    def _encode_rows(
        self, dataset: MapDataset, rows: range
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        items: list[dict[str, Any]] = []
        tensors: dict[str, torch.Tensor] = {}
        cast = (lambda t: t.to(self.dtype)) if self.dtype is not None else (lambda t: t)
        clips = _ShapeBatches(self.vae.encode, self.batch_size)
        firsts = _ShapeBatches(self.vae.encode, self.batch_size)
        with torch.no_grad():
            for i, item in self._read(dataset, rows):
                j, video = len(items), item["video"]
                meta = {k: v for k, v in item.items() if k not in ("video", "index", "path")}
                items.append({"index": i, "path": item.get("path", ""), "fields": meta})
                for jj, z in clips.add(j, video):
                    tensors[f"{jj}.latent"] = cast(z)
                if self.first_frame:  # (3, T, H, W) -> (3, 1, H, W), a copy: the clip's memory is freed
                    for jj, z in firsts.add(j, video[:, :1].clone()):
                        tensors[f"{jj}.first_frame_latent"] = cast(z)
                del item, video
            for jj, z in clips.flush():
                tensors[f"{jj}.latent"] = cast(z)
            for jj, z in firsts.flush():
                tensors[f"{jj}.first_frame_latent"] = cast(z)
            if self.text_encoder is not None:
                for field in self.text_fields:
                    js = [j for j, it in enumerate(items) if isinstance(it["fields"].get(field), str)]
                    embs = _encode_texts(
                        self.text_encoder, [items[j]["fields"][field] for j in js], self.batch_size
                    )
                    for j, seqs in zip(js, embs):
                        for name, e in seqs.items():
                            key = f"{j}.{field}" if name == "text" else f"{j}.{field}.{name}"
                            tensors[key] = cast(e)
        return tensors, items


class LatentCacheDataset:
    """Items of a cache folder: latents, text embeddings and the row's fields, no encoders needed.

    ``ds[i]`` -> {"latent", "first_frame_latent"?, "<field>_emb" (L, D) for each embedded field,
    "index", "path", <row fields>}; raises SkipItem for items of a corrupt shard.
    """

    def __init__(self, cache_dir: str | Path, *, verify: bool = True, quarantine: str | Path | None = None):
        self.dir = Path(cache_dir)
        path = self.dir / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"cache '{self.dir}': no index.json (run recipes/precompute.py first)")
        self.index = _read_index(path)
        if self.index.get("version") != CACHE_VERSION:
            raise ValueError(
                f"cache '{self.dir}': version {self.index.get('version')}, expected {CACHE_VERSION}"
            )
        self.verify = verify
        self.quarantine = Quarantine(quarantine or self.dir / "quarantine.jsonl")
        self.items: list[tuple[str, int]] = [
            (name, j) for name, entry in sorted(self.index["shards"].items()) for j in range(entry["items"])
        ]
        if not self.items:
            raise RuntimeError(f"cache '{self.dir}': the index lists no items")
        self._state: dict[str, bool] = {}  # shard -> usable
        self._meta: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()  # BatchLoader's decode threads check a shard once between them

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lock": None}  # to a DataLoader worker (spawn), which makes its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.quarantine.entries

    def __len__(self) -> int:
        return len(self.items)

    def _check(self, name: str) -> bool:
        if name in self._state:
            return self._state[name]
        with self._lock:
            if name not in self._state:
                self._state[name] = self._check_shard(name)
        return self._state[name]

    def _check_shard(self, name: str) -> bool:
        """Is shard ``name`` usable (checksum with ``verify``, readable header)? Quarantines it if not."""
        from safetensors import SafetensorError, safe_open

        path, entry = self.dir / name, self.index["shards"][name]
        reason = None
        if not path.is_file():
            reason = "shard file missing"
        elif self.verify and sha256_file(path) != entry["sha256"]:
            reason = f"sha256 mismatch (expected {entry['sha256'][:12]}...): corrupt shard"
        if reason is None:
            try:
                with safe_open(str(path), "pt") as f:
                    self._meta[name] = json.loads(f.metadata()["items"])
            except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as e:
                reason = f"unreadable shard ({type(e).__name__}: {e})"
        if reason is not None:
            self.quarantine.add(path, reason)
            try:
                if path.is_file():
                    (self.dir / "quarantine").mkdir(exist_ok=True)
                    shutil.move(str(path), self.dir / "quarantine" / name)
            except OSError as e:  # a read-only cache, or another rank moved it first: skipped all the same
                log.warning("cache '%s': corrupt shard '%s' not moved to quarantine/ (%s)", self.dir, name, e)
        return reason is None

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors import safe_open

        name, j = self.items[i]
        if not self._check(name):
            raise SkipItem(f"shard '{name}' is quarantined")
        meta = self._meta[name][j]
        out: dict[str, Any] = {"index": meta["index"], "path": meta["path"], **meta["fields"]}
        with safe_open(str(self.dir / name), "pt") as f:
            for key in f.keys():
                if key.startswith(f"{j}."):
                    sub = key.split(".", 1)[1]  # latent | first_frame_latent | <field> | <field>.<name>
                    out[sub if "latent" in sub else f"{sub.replace('.', '_')}_emb"] = f.get_tensor(key)
        return out

    def iterate(self, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
        """Items for ``indices`` (e.g. a ResumableSampler), skipping those of corrupt shards."""
        return iterate_skipping(
            self.__getitem__,
            indices,
            lambda tried: (
                f"cache '{self.dir}': all {tried} items of this pass were skipped: {self.skipped[:3]}"
            ),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate(range(len(self)))


def collate_latents(items: list[dict[str, Any]], text_fields: Sequence[str] = ()) -> dict[str, Any]:
    """Stack latents (equal shapes) and pad each text embedding to its longest: "<field>_emb" (B, L, D) +
    "<field>_lengths" (B,), and likewise "<field>_<name>_emb" / "<field>_<name>_lengths" for further
    sequences (e.g. task_text_2_*: glyph states; at least one row of padding, so a batch without any
    quoted text still has the (B, 1, D) shape a model takes, with zero lengths)."""
    out: dict[str, Any] = {"latent": torch.stack([it["latent"] for it in items])}  # (B, C, T', H', W')
    if all("first_frame_latent" in it for it in items):
        out["first_frame_latent"] = torch.stack([it["first_frame_latent"] for it in items])
    for field in text_fields:
        lacking = [it.get("index") for it in items if f"{field}_emb" not in it]
        if lacking:
            raise ValueError(
                f"collate_latents: the cache items of dataset rows {lacking} have no '{field}' embedding (their "
                f"manifest rows lack a '{field}' text, or the cache was written without it in text_fields)"
            )
        extra = sorted(
            k[: -len("_emb")] for k in items[0] if k.startswith(f"{field}_") and k.endswith("_emb")
        )
        for prefix in [field, *(e for e in extra if e not in text_fields)]:
            embs = [it[f"{prefix}_emb"] for it in items]
            lengths = torch.tensor([e.shape[0] for e in embs])
            width = max(int(lengths.max()), 1 if prefix != field else 0)
            padded = embs[0].new_zeros(len(embs), width, embs[0].shape[1])  # (B, L_max, D)
            for b, e in enumerate(embs):
                padded[b, : e.shape[0]] = e
            out[f"{prefix}_emb"], out[f"{prefix}_lengths"] = padded, lengths
        out[field] = [it[field] for it in items]
    out["index"] = [it["index"] for it in items]
    return out
