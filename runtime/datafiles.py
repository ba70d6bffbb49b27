"""Data files in: the file formats users have, which field is what, and the examples they hold.

Torch-free and stdlib-only at import (``pyarrow`` is imported for Parquet files only: the
``data`` extra). Training (``onnxformer.modeling.data.load_task_data``) and evaluation both read
data through one call::

    data = read_examples("train.csv", kinds=("classification",))
    data.kind, data.mapping        # "classification", FieldMap(text="text", label="label")
    for example in data:           # a fresh generator over the file each time: large files stream
        ...

Formats, by extension (anything else is refused with this list):

===========  ==================================================================================
``.csv``     comma-separated, a header row naming the fields; RFC 4180 quoting ("a, b" and "")
``.tsv``     tab-separated, a header row naming the fields; no quoting (fields hold no tabs).
             Without a header (its first row names no field), 2 columns are read as
             text<TAB>label or source<TAB>target, whichever the caller's kinds allow
``.jsonl``   JSON Lines: one object per line (a ``.json`` file whose first character is ``{`` too)
``.json``    a JSON array of objects, ``[{...}, {...}]`` (read whole: use JSONL for large files)
``.parquet`` Apache Parquet, read in row batches (``pip install 'onnxformer[data]'``)
``.txt``     plain text documents, laid out as ``lines`` (one document per non-blank line) or
             ``blank-line-documents`` (documents separated by blank lines, keeping their line
             breaks); auto-detected: blank lines present -> documents, else lines
===========  ==================================================================================

Schemas: the fields a record holds say its kind. Detected in this order of preference (the
caller's ``kinds`` first, then the schema with more fields), or named with a ``FieldMap``
(``--text-field``, ``--label-field``, ``--source-field``, ``--target-field``,
``--messages-field``):

==================  ==================================  =================  ====================
kind                detected fields                     example            example fields
==================  ==================================  =================  ====================
``classification``  ``text``+``label``,                 ``LabeledExample`` ``text``, ``label``
                    ``sentence``+``label``
``seq2seq``         ``source``+``target``,              ``PairExample``    ``source``, ``target``
                    ``prompt``+``completion``,
                    ``instruction``(+``input``)+``output``,
                    ``question``+``answer``
``chat``            ``messages``: ``[{"role", "content"}]`` ``ChatExample``  ``messages``
``text``            ``text`` (or any ``.txt`` file)     ``TextExample``    ``text``
==================  ==================================  =================  ====================

``instruction`` + ``input`` become one source, joined by a blank line (``input`` may be absent
or empty). Labels are strings or integers (read as their decimal string). Values are stripped
of surrounding whitespace and must not be empty. A conversation is a non-empty list of turns
whose roles are ``system``, ``user`` or ``assistant``, with at least one assistant turn and an
assistant turn last.

Every problem is a ``DataError`` whose message starts ``path:line:`` (``path:`` for whole-file
problems; for Parquet the number is the row, from 1) and says how to fix it. UTF-8 only, a BOM
is allowed (stripped), Windows line ends are read as line ends.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

KINDS = ("text", "classification", "seq2seq", "chat")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
TEXT_LAYOUTS = ("lines", "blank-line-documents")
ROLES = ("system", "user", "assistant")
# Example field -> the command-line flag that names its file field (training and evaluation share them).
FIELD_FLAGS = {
    "text": "--text-field", "label": "--label-field", "source": "--source-field", "target": "--target-field",
    "messages": "--messages-field",
}  # fmt: skip
SOURCE_JOIN = "\n\n"  # between the parts of a several-field source (instruction + input)
_ID_FIELDS = frozenset(("id", "idx", "index", "guid", "uid", "uuid"))  # never reported as unused


def data_error(message: str, path: str | os.PathLike | None = None, line: int | None = None) -> DataError:
    """A DataError whose message starts with ``path:line:`` (or ``path:``) when a file is at
    fault; ``err.path`` and ``err.line`` say the same for callers (None when not known)."""
    where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
    error = DataError(where + message)
    error.path, error.line = None if path is None else str(path), line
    return error


# Examples -------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


@dataclass(frozen=True)
class TextExample:
    """A document for language modelling."""

    text: str

    @property
    def sentences(self) -> list[str]:
        """Sentences: split after ``.``/``!``/``?`` followed by whitespace, and at line breaks."""
        return [s for s in _SENTENCE_END.split(self.text.strip()) if s]


@dataclass(frozen=True)
class LabeledExample:
    text: str
    label: str


@dataclass(frozen=True)
class PairExample:
    source: str
    target: str


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``role`` is system, user or assistant; ``content`` is not blank."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"unknown role {self.role!r}; a turn's role is one of {', '.join(ROLES)}")
        if not isinstance(self.content, str) or not self.content.strip():
            raise DataError(f"a {self.role} turn has no content; every turn needs a non-empty content string")


@dataclass(frozen=True)
class ChatExample:
    """A conversation: at least one assistant turn, and an assistant turn last."""

    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        if not self.messages:
            raise DataError("empty conversation; a conversation needs turns, ending with an assistant turn")
        if not all(isinstance(m, Message) for m in self.messages):
            raise DataError("a conversation's turns must be Message(role, content)")
        if self.messages[-1].role != "assistant":
            roles = ", ".join(m.role for m in self.messages)
            raise DataError(f"the conversation ends with a {self.messages[-1].role} turn ({roles}); the last turn "
                            "must be the assistant's reply: add it, or drop the trailing turns")


Example = TextExample | LabeledExample | PairExample | ChatExample
EXAMPLE_CLASSES: dict[str, type] = {
    "text": TextExample, "classification": LabeledExample, "seq2seq": PairExample, "chat": ChatExample,
}  # fmt: skip
KIND_ROLES: dict[str, tuple[str, ...]] = {
    "text": ("text",), "classification": ("text", "label"), "seq2seq": ("source", "target"), "chat": ("messages",),
}  # fmt: skip


# Field mapping --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldMap:
    """Which file field fills which example field; None (or an empty source) = not named.

    ``source`` may name several fields (a tuple, or ``"instruction,input"``): the first must be
    present, the others may be absent or empty, and the non-empty ones are joined by a blank line.
    A partial map (e.g. only ``text``) is completed by detection.
    """

    text: str | None = None
    label: str | None = None
    source: tuple[str, ...] = ()
    target: str | None = None
    messages: str | None = None

    def __post_init__(self) -> None:
        source = self.source
        if source is None:
            source = ()
        elif isinstance(source, str):
            source = tuple(part.strip() for part in source.split(","))
        object.__setattr__(self, "source", tuple(source))
        for role, name in self.items():
            names = name if isinstance(name, tuple) else (name,)
            if any(not isinstance(n, str) or not n for n in names):
                raise ConfigError(f"{FIELD_FLAGS[role]} must name a field; got {name!r}")
        roles = set(self.roles)
        kinds = [kind for kind, kind_roles in KIND_ROLES.items() if roles <= set(kind_roles)]
        if roles and not kinds:
            named = " and ".join(FIELD_FLAGS[r] for r in self.roles)
            raise ConfigError(f"{named} name fields of different kinds of data; choose one kind: "
                              + "; ".join(" + ".join(FIELD_FLAGS[r] for r in KIND_ROLES[k]) + f" ({k})"
                                          for k in ("classification", "seq2seq", "chat")))

    def items(self) -> list[tuple[str, str | tuple[str, ...]]]:
        """(role, field name(s)) of the roles that are named."""
        return [(role, value) for role in FIELD_FLAGS if (value := getattr(self, role))]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.items())

    @property
    def kind(self) -> str | None:
        """The kind a complete map reads; None for a partial one."""
        roles = set(self.roles)
        return next((k for k, kind_roles in KIND_ROLES.items() if roles == set(kind_roles)), None)

    @property
    def required(self) -> tuple[str, ...]:
        """File fields every record needs."""
        return tuple(value[0] if isinstance(value, tuple) else value for _, value in self.items())

    @property
    def fields(self) -> tuple[str, ...]:
        """Every file field the map reads."""
        return tuple(n for _, value in self.items() for n in (value if isinstance(value, tuple) else (value,)))

    def describe(self) -> str:
        """``text='review', label='stars'``; a several-field source as ``source='instruction'+'input'``."""
        return ", ".join(f"{role}=" + ("+".join(map(repr, v)) if isinstance(v, tuple) else repr(v))
                         for role, v in self.items())

    def flags(self) -> str:
        """The command-line flags that name this map, e.g. ``--text-field review --label-field stars``."""
        return " ".join(f"{FIELD_FLAGS[role]} {','.join(v) if isinstance(v, tuple) else v}" for role, v in self.items())

    def merged(self, user: FieldMap) -> FieldMap | None:
        """This map with ``user``'s named roles in place of its own; None if ``user`` names a role
        this map's kind has not."""
        if not set(user.roles) <= set(KIND_ROLES[self.kind]):
            return None
        return replace(self, **{role: value for role, value in user.items()})


SCHEMAS: tuple[FieldMap, ...] = (
    FieldMap(text="text", label="label"),
    FieldMap(text="sentence", label="label"),
    FieldMap(source="source", target="target"),
    FieldMap(source="prompt", target="completion"),
    FieldMap(source=("instruction", "input"), target="output"),
    FieldMap(source="question", target="answer"),
    FieldMap(messages="messages"),
    FieldMap(text="text"),
)


def _schema_list() -> str:
    return ", ".join("+".join(m.fields) for m in SCHEMAS)


def detect_mapping(
    found: Sequence[str], *, kinds: Sequence[str] | None = None, fields: FieldMap | None = None,
    path: str | os.PathLike | None = None, line: int | None = None, header: bool = False,
) -> FieldMap:
    """The FieldMap for a record holding the fields ``found`` (``header``: a table's header row).

    Candidates are the SCHEMAS of an allowed kind, with the roles ``fields`` names put in; those
    whose required fields are all present compete: the earliest kind in ``kinds`` wins, then the
    schema with more fields. Two different winners are an error naming both and the flags that
    choose. When nothing fits, the error says what is missing; ``err.fits`` then lists the maps
    the record would fit under other kinds (training names the tasks that read those).
    """
    user = fields or FieldMap()
    allowed = tuple(KINDS if kinds is None else kinds)
    present = set(found)
    found_text = ", ".join(map(repr, found)) or "none"
    lacks = (lambda name: f"header {list(found)!r} lacks column {name!r}") if header else (
        lambda name: f"missing field {name!r}")

    def fitting(kind_order: Sequence[str]) -> list[FieldMap]:
        out: list[FieldMap] = []
        for schema in SCHEMAS:
            if schema.kind not in kind_order:
                continue
            merged = schema.merged(user)
            if merged is not None and all(n in present for n in merged.required) and merged not in out:
                out.append(merged)
        return out

    candidates = fitting(allowed)
    if candidates:
        rank = lambda m: (allowed.index(m.kind) if kinds is not None else 0, -len(m.required))  # noqa: E731
        best = min(map(rank, candidates))
        winners = [m for m in candidates if rank(m) == best]
        if len(winners) > 1:
            choices = "; ".join(f"{m.describe()} ({m.kind})" for m in winners)
            raise data_error(f"fields {found_text} fit several schemas: {choices}; name the fields to read, "
                             f"e.g. {winners[0].flags()}", path, line)
        return winners[0]

    for role, value in user.items():
        name = value[0] if isinstance(value, tuple) else value
        if name not in present:
            raise data_error(f"{lacks(name)} (named by {FIELD_FLAGS[role]}); the fields found are {found_text}: "
                             f"pass {FIELD_FLAGS[role]} with one of them", path, line)
    for schema in SCHEMAS:  # an allowed schema partly present: name what it lacks
        merged = schema.merged(user)
        if merged is None or merged.kind not in allowed or merged.kind == "text":
            continue
        missing = [(r, v[0] if isinstance(v, tuple) else v) for r, v in merged.items()
                   if (v[0] if isinstance(v, tuple) else v) not in present]
        if len(missing) < len(merged.required):
            role, name = missing[0]
            raise data_error(
                f"{lacks(name)}; {merged.kind} data needs {' + '.join(map(repr, merged.required))} "
                f"(found {found_text}): add the field, or name yours with {FIELD_FLAGS[role]} NAME", path, line)
    others = fitting(tuple(k for k in KINDS if k not in allowed))
    if others:
        error = data_error(
            f"fields {found_text} hold {others[0].kind} data ({others[0].describe()}), but "
            f"{' or '.join(allowed)} data is needed here", path, line)
        error.fits = tuple(others)
        raise error
    flags = dict.fromkeys(FIELD_FLAGS[r] for k in allowed for r in KIND_ROLES[k])
    no_header = " (a file without a header line needs one naming the columns, e.g. text,label)" if header else ""
    raise data_error(
        f"cannot tell the task kind from fields {sorted(present)}: known schemas are {_schema_list()}; "
        f"or name the fields with {', '.join(flags)}{no_header}", path, line)


# Reading lines ----------------------------------------------------------------------------------
_SNIFF_BYTES = 1 << 16


def _open(path: Path):
    if not path.exists():
        raise data_error("file not found; check the path", path)
    if not path.is_file():
        raise data_error("not a file; pass the path of a data file", path)
    try:
        return path.open("rb")
    except OSError as exc:
        raise data_error(f"cannot read the file ({exc.strerror or exc})", path) from None


def _binary_error(path: Path, data: bytes, nul: int, line_offset: int = 0) -> DataError:
    line = line_offset + data.count(b"\n", 0, nul) + 1
    return data_error("binary data (NUL byte); expected a UTF-8 text file", path, line)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end), decoded as UTF-8; a BOM on line 1 is dropped.

    A NUL byte in the first 64 KiB makes the file binary (as git and grep decide it), so an
    image or a UTF-16 file is named as such rather than by its first undecodable byte.
    """
    with _open(path) as handle:
        head = handle.read(_SNIFF_BYTES)
        if (nul := head.find(b"\x00")) >= 0:
            raise _binary_error(path, head, nul)
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if (nul := raw.find(b"\x00")) >= 0:
                raise _binary_error(path, raw, nul, number - 1)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = exc.start + 1
                raise data_error(
                    f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); re-save the file as UTF-8",
                    path, number) from None
            yield number, text.rstrip("\n").removesuffix("\r")


def _empty(path: Path) -> DataError:
    return data_error("empty file; expected at least one example", path)


# Records per format: (line, {field: value}) --------------------------------------------------------
_JSONL_HINT = "each line must hold one complete JSON object (JSON Lines)"


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise data_error(f"invalid JSON ({exc.msg} at column {exc.colno}); {_JSONL_HINT}", path, number) from None
        except RecursionError:
            raise data_error(f"JSON nested too deeply to read; {_JSONL_HINT}", path, number) from None
        yield number, record


def _json_array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    text = "\n".join(line for _, line in _lines(path))
    decoder = json.JSONDecoder()
    hint = "a .json file holds one JSON array of objects, [{...}, {...}] (or JSON Lines: one object per line)"

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def fail(message: str, at: int) -> DataError:
        return data_error(f"{message}; {hint}", path, text.count("\n", 0, at) + 1)

    at = skip(0)
    if at == len(text) or text[at] != "[":
        raise fail("expected '['", at)
    at, line, line_at = skip(at + 1), 1, 0
    if at < len(text) and text[at] == "]":
        return
    while True:
        line += text.count("\n", line_at, at)
        line_at = at
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise data_error(f"invalid JSON ({exc.msg}); {hint}", path, exc.lineno) from None
        except RecursionError:
            raise fail("JSON nested too deeply to read", at) from None
        yield line, value
        at = skip(at)
        if at < len(text) and text[at] == ",":
            at = skip(at + 1)
        elif at < len(text) and text[at] == "]":
            if skip(at + 1) != len(text):
                raise fail("text after the closing ']'", skip(at + 1))
            return
        else:
            raise fail("expected ',' or ']' after an element", at)


def _first_char(path: Path) -> str:
    for _, line in _lines(path):
        if line.strip():
            return line.strip()[0]
    raise _empty(path)


_HEADER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def _table_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank rows with the line each starts on. CSV: RFC 4180 quoting (a quoted field may
    span lines); TSV: split on tabs, no quoting."""
    if delimiter == "\t":
        for number, line in _lines(path):
            if line.strip():
                yield number, line.split("\t")
        return
    consumed = 0  # lines the csv reader has taken so far

    def feed() -> Iterator[str]:
        nonlocal consumed
        for consumed, line in _lines(path):
            yield line + "\n"

    reader = csv.reader(feed(), strict=True)
    while True:
        start = consumed + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise data_error(
                f"malformed CSV row ({exc}); a field holding commas, quotes or line breaks must be quoted, "
                'e.g. "a, b", with its quotes doubled: "say ""hi"""', path, start) from None
        if any(cell.strip() for cell in row):
            yield start, row


# Values -> examples -----------------------------------------------------------------------------------
def _string(value: Any, name: str, path: Path, line: int, *, optional: bool = False, label: bool = False) -> str:
    if label and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # integer class labels are common; they name the class
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise data_error(f"field {name!r} must be a string; got {type(value).__name__} {value!r}"[:300], path, line)
    if not value.strip() and not optional:
        raise data_error(f"field {name!r} is empty; remove the line or fill it in", path, line)
    return value.strip()


def _conversation(value: Any, name: str, path: Path, line: int) -> ChatExample:
    if isinstance(value, str):  # a CSV/TSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise data_error(f"field {name!r} is not a JSON list of turns ({exc.msg})", path, line) from None
    if not isinstance(value, (list, tuple)):
        raise data_error(f"field {name!r} must be a list of turns {{\"role\": ..., \"content\": ...}}; "
                         f"got {type(value).__name__}", path, line)
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not {"role", "content"} <= set(turn):
            raise data_error(f"{name}[{i}] must be an object with 'role' and 'content'; got {turn!r}"[:300], path, line)
        try:
            turns.append(Message(turn["role"], turn["content"]))
        except DataError as exc:
            raise data_error(f"{name}[{i}]: {exc}", path, line) from None
    if not any(t.role == "assistant" for t in turns) and turns:
        raise data_error(f"the conversation has no assistant turn ({', '.join(t.role for t in turns)}); "
                         "add the assistant's reply (chat training learns the assistant turns)", path, line)
    try:
        return ChatExample(tuple(turns))
    except DataError as exc:
        raise data_error(str(exc), path, line) from None


def _builder(mapping: FieldMap, path: Path) -> Callable[[dict, int], Example]:
    """record, line -> example, for a complete ``mapping`` (resolved once per file, not per record)."""
    kind = mapping.kind
    if kind == "chat":
        name = mapping.messages
        return lambda record, line: _conversation(record[name], name, path, line)
    if kind == "seq2seq":
        (first, *extra), target = mapping.source, mapping.target

        def pair(record: dict, line: int) -> PairExample:
            parts = [_string(record[first], first, path, line)]
            parts += [p for n in extra if (p := _string(record.get(n), n, path, line, optional=True))]
            return PairExample(SOURCE_JOIN.join(parts), _string(record[target], target, path, line))

        return pair
    text = mapping.text
    if kind == "text":
        return lambda record, line: TextExample(_string(record[text], text, path, line))
    label = mapping.label
    return lambda record, line: LabeledExample(_string(record[text], text, path, line),
                                               _string(record[label], label, path, line, label=True))


def _missing(mapping: FieldMap, record: dict, first_line: int, path: Path, line: int) -> DataError:
    """A record that lacks mapped fields: another schema's record (mixed file) or an incomplete one."""
    missing = [n for n in mapping.required if n not in record]
    keys = ", ".join(map(repr, record)) or "no keys"
    other = next((s for s in SCHEMAS if not set(s.required) <= set(mapping.fields)
                  and all(n in record for n in s.required)), None)
    if other is not None:
        return data_error(
            f"this record holds {'+'.join(other.fields)} fields ({keys}), but the file's first record (line "
            f"{first_line}) holds {mapping.describe()}: one file holds one schema; split the file in two, "
            "or rename the fields to match", path, line)
    return data_error(f"missing field {', '.join(map(repr, missing))}; every record needs "
                      f"{', '.join(map(repr, mapping.required))} (found {keys})", path, line)


# The file -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFile:
    """A data file whose format, kind and field mapping are known. Iterating it reads the file
    afresh (a generator: large files stream); ``numbered()`` also gives each example's line."""

    path: Path
    format: str  # a value of FORMATS
    kind: str  # one of KINDS
    mapping: FieldMap  # file field of each example field (a .txt file: text='text')
    detected: bool  # the mapping (or text layout) was detected, not named by the caller
    text_layout: str | None = None  # .txt only: one of TEXT_LAYOUTS
    fields_found: tuple[str, ...] = ()  # the first record's fields (or the header)
    unused_fields: tuple[str, ...] = ()  # fields_found the mapping does not read
    _headerless: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[Example]:
        return (example for _, example in self.numbered())

    def numbered(self) -> Iterator[tuple[int, Example]]:
        """(line, example) for every example; a file without any is a DataError at its end."""
        count = 0
        for line, example in self._examples():
            count += 1
            yield line, example
        if not count:
            if self.format in ("txt", "jsonl"):
                raise _empty(self.path)
            below = "below the header" if self.format in ("csv", "tsv") else "in the file"
            raise data_error(f"no examples {below}", self.path)

    def describe(self) -> str:
        """One line for the log: format, kind, mapping (and the text layout)."""
        how = "detected" if self.detected else "as named"
        if self.format == "txt":
            return f"{self.path}: txt, {self.kind} data, text layout {self.text_layout} ({how})"
        return f"{self.path}: {self.format}, {self.kind} data: {self.mapping.describe()} ({how})"

    def _examples(self) -> Iterator[tuple[int, Example]]:
        if self.format == "txt":
            yield from _text_documents(self.path, self.text_layout)
            return
        records = _records(self.path, self.format)
        if self.format in ("csv", "tsv"):
            yield from self._table_examples(records)
            return
        first_line, build, required = None, _builder(self.mapping, self.path), self.mapping.required
        for line, record in records:
            if not isinstance(record, dict):
                raise data_error(f"expected a JSON object with keys {', '.join(self.mapping.required)}; "
                                 f"got {type(record).__name__}", self.path, line)
            if first_line is None:
                first_line = line
            if not all(n in record for n in required):
                raise _missing(self.mapping, record, first_line, self.path, line)
            yield line, build(record, line)

    def _table_examples(self, rows) -> Iterator[tuple[int, Example]]:
        header = list(self.fields_found)
        if not self._headerless:
            next(rows)
        sep = "comma" if self.format == "csv" else "tab"
        advice = ("quote fields that contain commas" if self.format == "csv" else "fields may not contain tabs")
        build = _builder(self.mapping, self.path)
        for line, cells in rows:
            if len(cells) != len(header):
                raise data_error(f"{len(cells)} {sep}-separated columns, but the header has {len(header)}; {advice}",
                                 self.path, line)
            yield line, build(dict(zip(header, cells)), line)


def _records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    if fmt == "jsonl":
        return _jsonl_records(path)
    if fmt == "json":
        return _json_array_records(path) if _first_char(path) == "[" else _jsonl_records(path)
    if fmt == "parquet":
        return _parquet_records(path)
    return _table_rows(path, "," if fmt == "csv" else "\t")


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise data_error("reading Parquet needs pyarrow: pip install 'onnxformer[data]' "
                         "(or convert the file to .jsonl)", path) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: a file it cannot read
        raise data_error(f"not a readable Parquet file ({type(exc).__name__}: {exc})"[:400], path) from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _text_documents(path: Path, layout: str) -> Iterator[tuple[int, TextExample]]:
    if layout == "lines":
        for number, line in _lines(path):
            if line.strip():
                yield number, TextExample(line.strip())
        return
    current: list[str] = []
    start = 0
    for number, line in _lines(path):
        if line.strip():
            if not current:
                start = number
            current.append(line.strip())
        elif current:
            yield start, TextExample("\n".join(current))
            current = []
    if current:
        yield start, TextExample("\n".join(current))


def _detect_layout(path: Path) -> str:
    """blank-line-documents if a blank line separates two non-blank lines, else lines."""
    seen_text = seen_gap = False
    for _, line in _lines(path):
        if line.strip():
            if seen_gap:
                return "blank-line-documents"
            seen_text = True
        elif seen_text:
            seen_gap = True
    if not seen_text:
        raise _empty(path)
    return "lines"


def _unused(found: Sequence[str], mapping: FieldMap) -> tuple[str, ...]:
    used = set(mapping.fields)
    return tuple(f for f in found if f not in used and f.lower() not in _ID_FIELDS)


def read_examples(
    path: str | os.PathLike,
    *,
    kinds: Sequence[str] | str | None = None,
    fields: FieldMap | None = None,
    text_layout: str | None = None,
) -> DataFile:
    """Open a data file: its format from the extension, its kind and field mapping from the
    first record (or header), checked against ``kinds`` (the kinds the caller can use, most
    wanted first; None = any) and completed from ``fields`` (names the caller gave).
    ``text_layout`` is a .txt file's layout (None: detected). Logs the result (INFO) and fields
    the mapping leaves unused (WARNING). Nothing but the first record is read here; iterate the
    returned DataFile for the examples.
    """
    path = Path(path)
    kinds = (kinds,) if isinstance(kinds, str) else None if kinds is None else tuple(kinds)
    for kind in kinds or ():
        if kind not in KINDS:
            raise ConfigError(f"kinds must be among {', '.join(map(repr, KINDS))}; got {kind!r}")
    if text_layout is not None and text_layout not in TEXT_LAYOUTS:
        raise ConfigError(f"text layout (--text-layout) must be one of {', '.join(TEXT_LAYOUTS)}; got {text_layout!r}")
    user = fields or FieldMap()
    _open(path).close()  # missing, a directory, unreadable: said before the extension
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise data_error(f"unknown file type {path.suffix or '(no extension)'!r}; known: "
                         f"{', '.join(FORMATS)} (rename the file to the extension of its format)", path)
    if fmt == "txt":
        if kinds is not None and "text" not in kinds:
            error = data_error(
                f"cannot read {' or '.join(kinds)} data from a .txt file: it holds plain text only; use .csv, .tsv, "
                f".jsonl, .json or .parquet with {' or '.join('+'.join(KIND_ROLES[k]) for k in kinds)} fields", path)
            error.fits = (FieldMap(text="text"),)
            raise error
        if user.roles:
            raise ConfigError(f"{' and '.join(FIELD_FLAGS[r] for r in user.roles)} name fields of a table or JSON "
                              f"file; {path} is plain text: drop them")
        layout = text_layout or _detect_layout(path)
        data = DataFile(path, fmt, "text", FieldMap(text="text"), detected=text_layout is None, text_layout=layout)
        if text_layout is None:
            how = ("blank lines separate documents; pass --text-layout lines for one document per line"
                   if layout == "blank-line-documents" else
                   "no blank lines, one document per line; pass --text-layout blank-line-documents if a "
                   "document spans lines")
            logger.info("%s (%s)", data.describe(), how)
        else:
            logger.info("%s", data.describe())
        return data
    if text_layout is not None:
        raise ConfigError(f"--text-layout applies to .txt files; {path} is {fmt}: drop it")

    records = _records(path, fmt)
    headerless = False
    try:
        line, first = next(records)
    except StopIteration:
        if fmt in ("json", "parquet"):
            raise data_error("no examples in the file (no records)", path) from None
        raise _empty(path) from None
    if fmt in ("csv", "tsv"):
        found = tuple(cell.strip() for cell in first)
        known = {n for s in SCHEMAS for n in s.fields} | set(user.fields)
        if not known & set(found) and fmt == "tsv" and not all(_HEADER_NAME.fullmatch(c) for c in found):
            mapping, found = _headerless_mapping(found, kinds, user, path)
            headerless = True
        if not headerless and len(set(found)) != len(found):
            raise data_error(f"the header names a column twice ({', '.join(found)}); column names must differ",
                             path, line)
    elif isinstance(first, dict):
        found = tuple(first)
    else:
        raise data_error(f"expected a JSON object (a record's fields); got {type(first).__name__}", path, line)
    if not headerless:
        mapping = detect_mapping(found, kinds=kinds, fields=user, path=path, line=line,
                                 header=fmt in ("csv", "tsv"))
    detected = mapping != user
    data = DataFile(path, fmt, mapping.kind, mapping, detected=detected, fields_found=found,
                    unused_fields=() if headerless else _unused(found, mapping), _headerless=headerless)
    logger.info("%s", data.describe())
    if data.unused_fields:
        logger.warning("%s: field%s %s not used by %s data (%s); if the data is there, name it with %s",
                       path, "s" if len(data.unused_fields) > 1 else "", ", ".join(map(repr, data.unused_fields)),
                       data.kind, mapping.describe(), " / ".join(FIELD_FLAGS.values()))
    return data


def _headerless_mapping(first: Sequence[str], kinds, user: FieldMap, path: Path) -> tuple[FieldMap, tuple[str, ...]]:
    """A TSV without a header: 2 columns are text<TAB>label or source<TAB>target."""
    pick = [k for k in (kinds or ("classification", "seq2seq")) if k in ("classification", "seq2seq", "text")]
    if len(first) != 2 or user.roles or not pick or (kinds is None and len(pick) > 1):
        raise data_error(
            f"the first line names no known fields ({len(first)} columns); add a header line naming the columns, "
            f"e.g. text<TAB>label or source<TAB>target (known schemas: {_schema_list()})", path, 1)
    kind = "classification" if pick[0] == "text" else pick[0]
    names = KIND_ROLES[kind]
    logger.info("%s: no header; reading the 2 columns as %s", path, "<TAB>".join(names))
    return FieldMap(**{role: role for role in names}), names


__all__ = [
    "EXAMPLE_CLASSES", "FIELD_FLAGS", "FORMATS", "KINDS", "KIND_ROLES", "ROLES", "SCHEMAS", "TEXT_LAYOUTS",
    "ChatExample", "DataFile", "Example", "FieldMap", "LabeledExample", "Message", "PairExample", "TextExample",
    "data_error", "detect_mapping", "read_examples",
]
