"""Token cache: a split's encoded rows on disk, memory-mapped by training.

Tokenization runs once per run, streaming: the split's raw examples are read in batches,
encoded by the task's objective (``Objective.encode``, modeling/tasks.py) and appended to flat
files; training memory-maps them (``CachedSplit``), so a split of any size costs memory only
for the pages a batch touches, and no split is ever held as Python lists::

    RUN/cache/KEY/                         one folder per key, published atomically (runtime/atomic.py)
        cache.json                         what the key hashes, and per split: rows, fields, CutReport
        SPLIT.ids.i32  SPLIT.ids.off.i64   a token field (ids, target, type_ids, loss_mask): the values of
                                           every row, and rows + 1 int64 offsets into them
        SPLIT.label.i64                    an integer field (label, prompt_len): one value a row
        SPLIT.text.u8  SPLIT.text.off.i64  a string field (text, source), UTF-8
        SPLIT.sentences.i32 / .off.i64     sentences: a row's sentence tokens one after the other,
        SPLIT.sentence_lens.i32 / .off.i64 and the lengths of its sentences

A field no row of a split uses (an empty list, prompt_len 0, label -1, "") is not written.

KEY is a hash of everything the rows depend on (``cache_key``): the data files (path, size,
modification time, and the bytes of their first and last MiB: ``file_fingerprint``), the
tokenizer's JSON, max_len, the objective and the run's data settings. ``--resume`` computes
the same key and reuses the folder; a change to any of them builds a new folder, and the
folders of other keys are removed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from onnxformer.runtime import atomic

from .tasks import CutReport, Encoded, Encoding

logger = logging.getLogger(__name__)

VERSION = 1  # of the folder layout; part of the key
META_FILE = "cache.json"
TOKEN_FIELDS = ("ids", "target", "type_ids", "sentences", "sentence_lens", "loss_mask")
INT_FIELDS = {"prompt_len": 0, "label": -1}  # field -> the value Encoded defaults to
TEXT_FIELDS = ("text", "source")
_SUFFIX = {np.int32: "i32", np.int64: "i64", np.uint8: "u8"}
BATCH_EXAMPLES = 1024  # raw examples encoded at a time (tokenizers' encode_batch runs them in parallel)
BATCH_CHARS = 4_000_000  # ... or fewer, once their text reaches this many characters
_PROGRESS_EVERY_S = 30.0


# ============================================================================================
# The key
# ============================================================================================


def file_fingerprint(path: str | os.PathLike, *, edge: int = 1 << 20) -> dict[str, Any]:
    """What identifies a data file's contents without reading all of it: its resolved path,
    size, modification time (ns) and a hash of its first and last `edge` bytes."""
    path = Path(path).resolve()
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        if stat.st_size > edge:
            f.seek(max(edge, stat.st_size - edge))
            digest.update(f.read(edge))
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges": digest.hexdigest()}


def cache_key(inputs: dict[str, Any]) -> str:
    """A short hash of `inputs` (JSON-serialisable: the data fingerprints, tokenizer hash, ...)."""
    text = json.dumps({"version": VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


# ============================================================================================
# Writing
# ============================================================================================


class _Column:
    """One field of a split being written: values appended batch by batch (+ offsets if ragged)."""

    def __init__(self, folder: Path, split: str, field: str, dtype, *, ragged: bool, default: int = 0):
        self.path = folder / f"{split}.{field}.{_SUFFIX[dtype]}"
        self.dtype, self.ragged, self.default = dtype, ragged, default
        self.values = open(self.path, "wb")
        self.offsets = open(folder / f"{split}.{field}.off.i64", "wb") if ragged else None
        self.end, self.used = 0, False  # used: a row holds a value other than the default
        if ragged:
            np.zeros(1, np.int64).tofile(self.offsets)

    def add(self, rows: Sequence) -> None:
        if not self.ragged:
            values = np.asarray(rows, dtype=self.dtype)
            self.used = self.used or bool((values != self.default).any())
            values.tofile(self.values)
            return
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        total = int(lengths.sum())
        if self.dtype is np.uint8:
            values = np.frombuffer(b"".join(rows), np.uint8)
        else:
            values = np.fromiter(itertools.chain.from_iterable(rows), self.dtype, total)
        self.used = self.used or total > 0
        values.tofile(self.values)
        (self.end + np.cumsum(lengths)).tofile(self.offsets)
        self.end += total

    def close(self) -> bool:
        """Flush and close; remove the files when no row used the field. Whether it is kept."""
        files = [self.values] + ([self.offsets] if self.offsets else [])
        for f in files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if not self.used:
            for f in files:
                Path(f.name).unlink()
        return self.used


class _SplitWriter:
    """Appends a split's Encoded rows to its column files."""

    def __init__(self, folder: Path, split: str):
        unknown = set(Encoded._fields) - set(TOKEN_FIELDS) - set(INT_FIELDS) - set(TEXT_FIELDS)
        if unknown:  # fail closed: a field the cache does not store would be lost silently
            raise TypeError(f"Encoded has fields the token cache does not store: {sorted(unknown)}; add them to "
                            "TOKEN_FIELDS, INT_FIELDS or TEXT_FIELDS in modeling/token_cache.py")
        self.rows = 0
        self.columns = {
            **{f: _Column(folder, split, f, np.int32, ragged=True) for f in TOKEN_FIELDS},
            **{f: _Column(folder, split, f, np.int64, ragged=False, default=d) for f, d in INT_FIELDS.items()},
            **{f: _Column(folder, split, f, np.uint8, ragged=True) for f in TEXT_FIELDS},
        }

    def add(self, examples: Sequence[Encoded]) -> None:
        if not examples:
            return
        self.rows += len(examples)
        c = self.columns
        for name in ("ids", "target", "type_ids", "loss_mask"):
            c[name].add([getattr(e, name) for e in examples])
        c["sentences"].add([list(itertools.chain.from_iterable(e.sentences)) for e in examples])
        c["sentence_lens"].add([[len(s) for s in e.sentences] for e in examples])
        for name in INT_FIELDS:
            c[name].add([getattr(e, name) for e in examples])
        for name in TEXT_FIELDS:
            c[name].add([getattr(e, name).encode("utf-8") for e in examples])

    def close(self) -> list[str]:
        """The fields written (the others no row used)."""
        return [name for name, column in self.columns.items() if column.close()]


def _chars(example) -> int:
    text = getattr(example, "text", None)
    return len(text) if text is not None else len(getattr(example, "source", "")) + len(getattr(example, "target", ""))


def _batches(examples: Iterable, *, size: int = BATCH_EXAMPLES, chars: int = BATCH_CHARS) -> Iterator[tuple[list, int]]:
    """Raw examples in lists of `size`, or fewer once their text reaches `chars` characters;
    each with its characters."""
    batch, length = [], 0
    for example in examples:
        batch.append(example)
        length += _chars(example)
        if len(batch) >= size or length >= chars:
            yield batch, length
            batch, length = [], 0
    if batch:
        yield batch, length


def _encode_split(writer: _SplitWriter, examples: Iterable, encode, split: str) -> CutReport:
    report, chars, last = CutReport(), 0, time.monotonic()
    for batch, length in _batches(examples):
        encoding: Encoding = encode(batch)
        writer.add(encoding.examples)
        report.merge(encoding.report)
        chars += length
        if time.monotonic() - last > _PROGRESS_EVERY_S:
            last = time.monotonic()
            logger.info("token cache: %s: %s examples (%.0f M characters) read, %s rows", split,
                        f"{report.examples:,}", chars / 1e6, f"{report.rows:,}")
    return report


def build(
    folder: Path, splits: dict[str, Iterable], encode, inputs: dict[str, Any],
) -> dict[str, tuple["CachedSplit", CutReport]]:
    """Encode each split's raw examples (``encode(batch) -> Encoding``) into `folder`, atomically:
    written in a staging folder beside it, published when every split is done (a killed build
    leaves no folder at `folder`). Returns each split's rows and CutReport."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(folder.parent, "*")
    tmp = atomic.staging_dir(folder)
    try:
        meta: dict[str, Any] = {"version": VERSION, "inputs": inputs, "splits": {}}
        started = time.monotonic()
        for split, examples in splits.items():
            writer = _SplitWriter(tmp, split)
            try:
                report = _encode_split(writer, examples, encode, split)
            finally:
                fields = writer.close()
            meta["splits"][split] = {"rows": writer.rows, "fields": fields, "report": report.__dict__}
        meta["build_s"] = round(time.monotonic() - started, 3)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str), encoding="utf-8")
        atomic.publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("token cache: built %s in %.1fs", folder, meta["build_s"])
    return load(folder)


def load(folder: Path) -> dict[str, tuple["CachedSplit", CutReport]]:
    """A built cache folder's splits (memory-mapped) and their CutReports."""
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return {split: (CachedSplit(folder, split, info["rows"], info["fields"]), CutReport(**info["report"]))
            for split, info in meta["splits"].items()}


def open_or_build(
    root: Path, key: str, splits: dict[str, Iterable], encode, inputs: dict[str, Any],
) -> dict[str, tuple["CachedSplit", CutReport]]:
    """The cache of `key` under `root` (RUN/cache): reused when it exists, else built; the
    folders of other keys (another tokenizer, data, max_len) are removed once it is there."""
    folder = root / key
    if (folder / META_FILE).is_file():
        logger.info("token cache: reusing %s", folder)
        result = load(folder)
    else:
        result = build(folder, splits, encode, inputs)
    for other in root.iterdir():
        if other.is_dir() and other.name != key and not other.name.startswith("."):
            logger.info("token cache: removing %s (built for other data, tokenizer or settings)", other)
            shutil.rmtree(other, ignore_errors=True)
    return result


# ============================================================================================
# Reading
# ============================================================================================


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap refuses empty files
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class CachedSplit(Sequence[Encoded]):
    """A split's rows, memory-mapped: ``split[i]`` is an Encoded read from disk; ``split[a:b]`` a list."""

    def __init__(self, folder: Path, split: str, rows: int, fields: Sequence[str]):
        self.folder, self.split, self.rows, self.fields = folder, split, rows, tuple(fields)
        self._maps: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None

    def _columns(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        if self._maps is None:  # opened on first use (and again in each process that reads it)
            maps = {}
            for name in self.fields:
                base = self.folder / f"{self.split}.{name}"
                if name in INT_FIELDS:
                    maps[name] = (_map(base.with_name(base.name + ".i64"), np.int64), None)
                else:
                    dtype, suffix = (np.uint8, "u8") if name in TEXT_FIELDS else (np.int32, "i32")
                    maps[name] = (_map(base.with_name(f"{base.name}.{suffix}"), dtype),
                                  _map(base.with_name(base.name + ".off.i64"), np.int64))
            self._maps = maps
        return self._maps

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.rows))]
        i = int(index)
        if i < 0:
            i += self.rows
        if not 0 <= i < self.rows:
            raise IndexError(f"row {index} of a split of {self.rows}")
        columns, values = self._columns(), {}
        for name, (data, offsets) in columns.items():
            if offsets is None:
                values[name] = int(data[i])
            else:
                row = data[int(offsets[i]) : int(offsets[i + 1])]
                values[name] = bytes(row).decode("utf-8") if name in TEXT_FIELDS else row.tolist()
        lens = values.pop("sentence_lens", None)
        flat = values.pop("sentences", None)
        if lens is not None:
            bounds = np.cumsum([0] + lens).tolist()
            values["sentences"] = [flat[a:b] for a, b in zip(bounds, bounds[1:])] if flat is not None else [[] for _ in lens]
        values.setdefault("ids", [])
        return Encoded(**values)

    def tokens(self, field: str = "ids") -> int:
        """Total tokens of a token field over every row (0 when no row has it)."""
        if field not in self.fields:
            return 0
        return int(self._columns()[field][1][-1])


__all__ = ["CachedSplit", "build", "cache_key", "file_fingerprint", "load", "open_or_build"]
