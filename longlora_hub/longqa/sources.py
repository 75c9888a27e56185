"""Readers for the LongQA builder's inputs, all streamed, all reporting bad input as `file:line: reason`.

- `iter_json_records`: JSON Lines or a JSON array, read incrementally (LongAlpaca-12k is one ~500 MB JSON array);
  a malformed element is reported and skipped without losing the elements after it.
- `DocumentStore`: a folder of `.txt`/`.md` documents (and `.pdf` with the optional `pypdf`), read on demand.
- `iter_document_rows`: QA rows over those documents, turned into instructions with the paper's templates.
- `iter_longalpaca_rows` / `iter_short_rows`: LongAlpaca-format and Alpaca-format rows, local or from the Hub.

Every reader yields plain dicts with the builder's intermediate columns (`instruction`, `completion`, `source`,
`task`, `where`) and sends every problem to a `ProblemLog`, which either raises at once (`on_error="fail"`) or
counts it and keeps a few examples for the summary, the card and `stats.json` (`on_error="skip"`).
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .templates import TASKS, load_template, render_instruction

ON_ERROR = ("fail", "skip")
PROBLEM_KINDS = {
    "malformed_json": "a line (or array element) that is not valid JSON, or not a JSON object",
    "not_utf8": "text that is not valid UTF-8",
    "missing_field": "a required field is missing or not a string",
    "empty_answer": "the answer / output is empty",
    "empty_question": "the question / instruction is empty",
    "bad_row": "a row that cannot be used as written (unknown task, wrong number of documents, template mismatch)",
    "missing_document": "a QA row names a document that is not in the documents folder",
    "unreadable_document": "a QA row names a document that could not be read (see its own problem)",
    "empty_document": "a document with no text",
    "unreadable_pdf": "a PDF that pypdf cannot read (damaged, encrypted, or not a PDF)",
}
DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf")
MAX_EXAMPLES = 20
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


class LongQAInputError(ValueError):
    """Bad input with `on_error="fail"`; the message starts with `file:line`."""


@dataclass(frozen=True)
class Problem:
    """One bad input: what kind, where (`file:line`), why, and which input it came from."""

    kind: str
    where: str
    reason: str
    source: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class ProblemLog:
    r"""
    Collects bad input according to the `--on-error` policy.

    Args:
        on_error (`str`, *optional*, defaults to `"fail"`): `"fail"` raises `LongQAInputError` at the first problem;
            `"skip"` counts every problem (by source and kind) and keeps the first `max_examples` of them.
        max_examples (`int`, *optional*, defaults to `20`): How many problems to keep as examples.
    """

    def __init__(self, on_error: str = "fail", max_examples: int = MAX_EXAMPLES):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.max_examples = max_examples
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: list[Problem] = []

    def report(self, kind: str, where: str, reason: str, source: str) -> None:
        """Record one problem, or raise it when failing on errors."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        problem = Problem(kind, where, reason, source)
        if self.on_error == "fail":
            raise LongQAInputError(
                f"{problem} [{kind}]. Fix the input, or pass --on-error skip to skip such rows (they are counted "
                "and listed in the summary, stats.json and the dataset card)."
            )
        self.counts[(source, kind)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(problem)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """The problems for `stats.json`: counts by kind and by source, and the kept examples."""
        by_kind: Counter[str] = Counter()
        by_source: dict[str, dict[str, int]] = {}
        for (source, kind), count in sorted(self.counts.items()):
            by_kind[kind] += count
            by_source.setdefault(source, {})[kind] = count
        return {
            "on_error": self.on_error,
            "total": self.total,
            "by_kind": dict(sorted(by_kind.items())),
            "by_source": by_source,
            "examples": [
                {"kind": p.kind, "where": p.where, "reason": p.reason, "source": p.source} for p in self.examples
            ],
        }


def _decode_error(data: bytes, error: UnicodeDecodeError) -> tuple[int, str]:
    """The 1-based line of a decoding error inside `data`, and a reason naming the byte."""
    line = data.count(b"\n", 0, error.start) + 1
    return line, f"not UTF-8 (byte 0x{data[error.start]:02X} at byte offset {error.start})"


class _JsonArrayReader:
    """Yields `(line, text)` for each top-level element of a JSON array without holding the file in memory.

    It only finds where each element ends (brackets and strings, skipping to the next interesting character
    with a regular expression, so a 500 MB file is scanned in seconds); `json.loads` then parses each element on
    its own. A malformed element therefore costs that element only. Bytes that are not UTF-8 are kept as
    surrogate escapes so the element holding them can be reported and skipped.
    """

    _OUTSIDE = re.compile(r'["{}\[\],]')
    _INSIDE = re.compile(r'["\\]')
    _NONSPACE = re.compile(r"\S")

    def __init__(self, stream: BinaryIO, chunk_size: int = 1 << 20):
        self.stream = stream
        self.chunk_size = chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buffer = ""
        self.pos = 0
        self.line = 1
        self.eof = False

    def _fill(self) -> int:
        """Append the next chunk, dropping the consumed text before `pos`; return how far indices moved (-1: EOF)."""
        if self.eof:
            return -1
        chunk = self.stream.read(self.chunk_size)
        self.eof = not chunk
        shift = self.pos
        self.buffer = self.buffer[shift:] + self.decoder.decode(chunk, final=self.eof)
        self.pos = 0
        return shift

    def _next_char(self) -> str:
        """Skip whitespace (counting lines); the next character, or "" at the end of the file."""
        while True:
            match = self._NONSPACE.search(self.buffer, self.pos)
            if match:
                self.line += self.buffer.count("\n", self.pos, match.start())
                self.pos = match.start()
                return self.buffer[self.pos]
            self.line += self.buffer.count("\n", self.pos)
            self.pos = len(self.buffer)
            if self._fill() < 0:
                return ""

    def _element_end(self) -> int | None:
        """Index just past the element starting at `pos`, reading more as needed; None if the file ends first."""
        i, depth, in_string = self.pos, 0, False
        while True:
            match = (self._INSIDE if in_string else self._OUTSIDE).search(self.buffer, i)
            if match is None or (in_string and match.group() == "\\" and match.end() >= len(self.buffer)):
                # the element continues past the buffer (an escape needs the character after it too)
                resume = match.start() if match is not None else len(self.buffer)
                shift = self._fill()
                if shift < 0:
                    return None
                i = resume - shift
                continue
            char, i = match.group(), match.end()
            if in_string:
                if char == "\\":
                    i += 1
                else:
                    in_string = False
                    if depth == 0:
                        return i
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                if depth == 0:
                    return match.start()  # a bare scalar followed by the array's closing bracket
                depth -= 1
                if depth == 0:
                    return i
            elif depth == 0:  # a comma ends a bare scalar
                return match.start()

    def __iter__(self) -> Iterator[tuple[int, str | None, str]]:
        """`(line, element text or None, reason)`; None marks a broken structure, after which reading stops."""
        if self._fill() < 0 or self._next_char() != "[":
            yield self.line, None, "expected a JSON array starting with '['"
            return
        self.pos += 1
        if self._next_char() == "]":
            return
        while True:
            start_line = self.line
            end = self._element_end()
            if end is None:
                yield start_line, None, "the JSON array ends in the middle of an element (truncated file?)"
                return
            text = self.buffer[self.pos : end]
            self.line += text.count("\n")
            self.pos = end
            yield start_line, text, ""
            char = self._next_char()
            if char == "]":
                return
            if char != ",":
                found = repr(char) if char else "the end of the file"
                yield self.line, None, f"expected ',' or ']' after an array element, found {found}"
                return
            self.pos += 1
            self._next_char()


class _RawAdapter(io.RawIOBase):
    """Any object with `read(n)` (an HTTP file of `HfFileSystem`, say) as a raw stream, so that it can be wrapped
    in an `io.BufferedReader` and get `peek` and line iteration."""

    def __init__(self, stream):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_json_stream(
    stream, name: str, log: ProblemLog, source: str, jsonl: bool | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    r"""
    Stream the JSON objects of JSON Lines or of one JSON array from a binary stream, one object at a time.

    Args:
        stream (binary file-like): Anything with `read(n)`.
        name (`str`): The name used in `name:line` locations.
        log (`ProblemLog`): Where problems go.
        source (`str`): The input's name in the stats (`"longalpaca"`, `"short"`, `"documents"`).
        jsonl (`bool`, *optional*): Force JSON Lines (`True`); by default, a stream whose first non-blank
            character is `[` is a JSON array and any other is JSON Lines.

    Yields:
        `(where, record)`: `where` is `"name:line"`, `record` a dict.
    """
    if not hasattr(stream, "peek"):
        stream = io.BufferedReader(_RawAdapter(stream), buffer_size=1 << 20)
    head = stream.peek(1 << 16)[: 1 << 16].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not jsonl and head[:1] == b"[":
        for line, text, reason in _JsonArrayReader(stream):
            where = f"{name}:{line}"
            if text is None:
                log.report("malformed_json", where, reason, source)
                return
            if _ESCAPED_BYTE.search(text):
                log.report("not_utf8", where, "the element holds bytes that are not UTF-8", source)
                continue
            record = _parse_object(text, where, log, source)
            if record is not None:
                yield where, record
        return
    for line, raw in enumerate(stream, start=1):
        where = f"{name}:{line}"
        try:
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError as error:
            log.report("not_utf8", where, _decode_error(raw, error)[1], source)
            continue
        if not text.strip():
            continue
        record = _parse_object(text, where, log, source)
        if record is not None:
            yield where, record


def iter_json_records(path: str | Path, log: ProblemLog, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    r"""
    Stream the JSON objects of a JSON Lines file or of a JSON array file, one at a time, never holding the file.

    A `.jsonl` file is read line by line; any other file is a JSON array if its first character is `[`, and JSON
    Lines otherwise. Bad lines or elements go to `log` as `file:line: reason` (see `iter_json_stream`).
    """
    path = Path(path)
    with open(path, "rb", buffering=1 << 20) as stream:
        yield from iter_json_stream(stream, str(path), log, source, jsonl=path.suffix.lower() == ".jsonl")


def _parse_object(text: str, where: str, log: ProblemLog, source: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        log.report("malformed_json", where, f"invalid JSON: {error.msg} (column {error.colno})", source)
        return None
    if not isinstance(record, dict):
        log.report("malformed_json", where, f"expected a JSON object, got {type(record).__name__}", source)
        return None
    return record


def _string_field(record: dict[str, Any], names: Iterable[str], where: str, log: ProblemLog, source: str):
    """The first of `names` present in the record, as a string; reports and returns None when none is usable."""
    names = tuple(names)
    for name in names:
        if name in record:
            value = record[name]
            if isinstance(value, str):
                return value
            log.report("missing_field", where, f"field {name!r} must be a string, got {type(value).__name__}", source)
            return None
    log.report("missing_field", where, f"no {' / '.join(map(repr, names))} field", source)
    return None


def _iter_hub_records(repo_id: str, log: ProblemLog, source: str, split: str):
    """Records of a Hub dataset: its JSON/JSONL files read over HTTP by the same streaming reader as local files
    (`datasets` would parse a JSON array whole in memory, ~500 MB for LongAlpaca-12k); other formats through
    `datasets` streaming."""
    from huggingface_hub import HfApi, HfFileSystem

    files = sorted(
        name
        for name in HfApi().list_repo_files(repo_id, repo_type="dataset")
        if name.lower().endswith((".json", ".jsonl")) and not name.startswith(".")
    )
    if files:
        filesystem = HfFileSystem()
        for name in files:
            with filesystem.open(f"datasets/{repo_id}/{name}", "rb", block_size=1 << 22) as stream:
                jsonl = name.lower().endswith(".jsonl")
                yield from iter_json_stream(stream, f"{repo_id}/{name}", log, source, jsonl=jsonl)
        return
    from datasets import load_dataset

    for index, record in enumerate(load_dataset(repo_id, split=split, streaming=True)):
        yield f"{repo_id}:row {index}", record


def iter_records(spec: str | Path, log: ProblemLog, source: str, split: str = "train"):
    r"""
    Stream records from a local JSON/JSONL file, a folder of them, or a Hub dataset id (streamed over HTTP, never
    downloaded or loaded whole).

    Yields:
        `(where, record)` pairs; `where` is `file:line` (`repo_id/file:line` for a Hub JSON file, `repo_id:row N`
        for other Hub formats).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .json or .jsonl file.")
        for file in files:
            yield from iter_json_records(file, log, source)
        return
    if path.is_file():
        yield from iter_json_records(path, log, source)
        return
    if not _HUB_ID.fullmatch(str(spec)):
        raise FileNotFoundError(f"{spec} is neither a file, a folder, nor a Hub dataset id (owner/name).")
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield from _iter_hub_records(str(spec), log, source, split)
    except LongQAInputError:
        raise
    except (HfHubHTTPError, OSError, ValueError, ConnectionError) as error:
        raise LongQAInputError(
            f"could not stream the Hub dataset {spec!r} ({type(error).__name__}: {error}). Check the id, your "
            "network and token (HF_TOKEN), or download the file and pass its path."
        ) from error


_TWO_PAPERS = ("There are two papers", "The first paper begins")
_LONG_MARKERS = ("Now the paper ends", "Now the material ends", "Now the second paper ends", "The paper begins")


def longalpaca_task(instruction: str) -> str:
    r"""
    Guess the task of a LongAlpaca row from its instruction: `compare` (two papers), `review`, `summary` or `qa`
    for rows over a long document, and `short` for the Alpaca rows mixed into LongAlpaca-12k.
    """
    if any(marker in instruction for marker in _TWO_PAPERS):
        return "compare"
    ends = [instruction.rfind(marker) for marker in _LONG_MARKERS]
    if max(ends) < 0:
        return "short"
    question = instruction[max(ends) :]
    if re.search(r"\breview", question, re.IGNORECASE):
        return "review"
    if re.search(r"summar", question, re.IGNORECASE):
        return "summary"
    return "qa"


def _instruction_rows(spec, log: ProblemLog, source: str, task: str | None) -> Iterator[dict[str, str]]:
    for where, record in iter_records(spec, log, source):
        instruction = _string_field(record, ("instruction",), where, log, source)
        if instruction is None:
            continue
        output = _string_field(record, ("output",), where, log, source)
        if output is None:
            continue
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            log.report("missing_field", where, f"field 'input' must be a string, got {type(extra).__name__}", source)
            continue
        if extra:
            # the same joining as longlora_hub.data.to_prompt_completion, so both paths train on the same text
            instruction = f"{instruction}\n{extra}"
        if not instruction.strip():
            log.report("empty_question", where, "empty instruction", source)
            continue
        if not output.strip():
            log.report("empty_answer", where, "empty output", source)
            continue
        yield {
            "instruction": instruction,
            "completion": output,
            "source": source,
            "task": task or longalpaca_task(instruction),
            "where": where,
        }


def iter_longalpaca_rows(spec: str | Path, log: ProblemLog) -> Iterator[dict[str, str]]:
    r"""
    Rows of LongAlpaca-format data (`instruction`, `output`, optional `input` and `file`), streamed.

    Args:
        spec (`str` or `Path`): A `.json` (array) or `.jsonl` file, a folder of them, or a Hub id such as
            `Yukang/LongAlpaca-12k`.
        log (`ProblemLog`): Where problems go.
    """
    yield from _instruction_rows(spec, log, "longalpaca", None)


def iter_short_rows(spec: str | Path, log: ProblemLog) -> Iterator[dict[str, str]]:
    """Rows of short Alpaca-format instruction data (`instruction`, optional `input`, `output`), streamed."""
    yield from _instruction_rows(spec, log, "short", "short")


# how the store records a failed document, and the log's wording where it is not the error's own
_FAILURES = {"unreadable_pdf": "unreadable PDF", "not_utf8": "not UTF-8", "empty_document": "empty"}
_LOGGED_REASONS = {"empty_document": "the document has no text"}


class DocumentError(ValueError):
    """A document that cannot be read: `kind` (`unreadable_pdf`, `not_utf8` or `empty_document`, the LongQA log's
    names), `where` (the path, with a line for text) and `reason`; the message adds what to do."""

    def __init__(self, kind: str, where: str, reason: str, advice: str):
        super().__init__(f"{where}: {reason}; {advice}")
        self.kind, self.where, self.reason = kind, where, reason


def read_document(path: Path) -> str:
    """The text of a document file (.pdf through pypdf, anything else as UTF-8, a BOM allowed), with Windows line
    ends made plain and the ends stripped.

    Raises:
        `DocumentError`: An unreadable PDF, text that is not UTF-8, or a document with no text.
        `ImportError`: A PDF without pypdf installed.
    """
    if path.suffix.lower() == ".pdf":
        try:
            text = _read_pdf(path)
        except ImportError:
            raise
        except Exception as error:  # pypdf raises many kinds for damaged files; all mean "cannot read it"
            raise DocumentError(
                "unreadable_pdf",
                str(path),
                f"could not be read as a PDF ({type(error).__name__}: {error})",
                "it may be damaged, encrypted or not a PDF at all. Open it in a PDF reader to check, or pass its "
                "text as a .txt file.",
            ) from None
        empty = (
            "holds no text pypdf can extract (a scanned PDF holds images of pages: run OCR on it first, or pass its "
            "text as a .txt file)"
        )
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line, reason = _decode_error(data, error)
            raise DocumentError("not_utf8", f"{path}:{line}", reason, "save the document as UTF-8 text.") from None
        empty = "is empty (or only blank space)"
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise DocumentError("empty_document", str(path), empty, "pass a document with text.")
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError as error:
        raise ImportError(
            f"{path} is a PDF; reading PDF documents needs pypdf: pip install 'longlora-hub[pdf]' (or pip install "
            "pypdf), or convert the PDF to text first."
        ) from error
    return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)


class DocumentStore:
    r"""
    The documents of a folder, by id, read when first asked for (a few kept in memory, since the QA rows over
    one document usually come together).

    A document's id is its path inside the folder without the suffix, with `/` separators (`papers/attention`
    for `papers/attention.txt`); the id with its suffix is accepted too.

    Args:
        folder (`str` or `Path`): The folder, searched recursively for `.txt`, `.md` and `.pdf` files.
        log (`ProblemLog`): Where unreadable documents go.
        cache_size (`int`, *optional*, defaults to `8`): How many documents stay in memory.
    """

    def __init__(self, folder: str | Path, log: ProblemLog, cache_size: int = 8):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"The documents folder {self.folder} does not exist.")
        self.log = log
        self.cache_size = cache_size
        self.paths: dict[str, Path] = {}
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            if not path.is_file() or path.suffix.lower() not in DOCUMENT_SUFFIXES:
                continue
            if any(part.startswith(".") for part in relative.parts):
                continue  # editor swap files, .git and the like
            doc_id = relative.with_suffix("").as_posix()
            if doc_id in self.paths:
                raise ValueError(
                    f"Two documents have the id {doc_id!r}: {self.paths[doc_id]} and {path}. Rename one of them."
                )
            self.paths[doc_id] = path
        if not self.paths:
            raise FileNotFoundError(f"{self.folder} holds no {'/'.join(DOCUMENT_SUFFIXES)} document.")
        if any(p.suffix.lower() == ".pdf" for p in self.paths.values()):
            _check_pypdf(self.folder)
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self.failed: dict[str, str] = {}

    def resolve(self, doc_id: str) -> str | None:
        """The canonical id of `doc_id` (with or without its suffix), or None when there is no such document."""
        if doc_id in self.paths:
            return doc_id
        stem = Path(doc_id).with_suffix("").as_posix()
        if stem in self.paths and self.paths[stem].name == Path(doc_id).name:
            return stem
        return None

    def get(self, doc_id: str) -> str | None:
        """The text of a known document, or None when it could not be read (reported once, at the document)."""
        if doc_id in self._cache:
            self._cache.move_to_end(doc_id)
            return self._cache[doc_id]
        if doc_id in self.failed:
            return None
        text = self._read(doc_id)
        self._cache[doc_id] = text
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return text

    def _read(self, doc_id: str) -> str | None:
        try:
            return read_document(self.paths[doc_id])
        except DocumentError as error:  # reported once, with the document; its questions are then skipped
            self.failed[doc_id] = _FAILURES[error.kind]
            where = f"{error.where}:1" if error.kind == "empty_document" else error.where
            self.log.report(error.kind, where, _LOGGED_REASONS.get(error.kind, error.reason), "documents")
            return None


def _check_pypdf(folder: Path) -> None:
    try:
        import pypdf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"{folder} holds PDF documents; reading them needs pypdf: pip install 'longlora-hub[pdf]' (or pip "
            "install pypdf), or convert them to .txt first."
        ) from error


def _document_ids(record: dict[str, Any]) -> list[str] | str:
    """The document ids of a QA row, or a reason why there are none."""
    value = record.get("documents", record.get("document"))
    if value is None:
        return "no 'document' or 'documents' field"
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, list) or not all(isinstance(doc_id, str) and doc_id for doc_id in ids):
        return "'document(s)' must be a document id or a list of ids"
    return ids


def iter_document_rows(
    store: DocumentStore,
    qa_file: str | Path,
    log: ProblemLog,
    template: str | Path | None = None,
) -> Iterator[dict[str, str]]:
    r"""
    Instruction rows from a QA file over the documents of `store`.

    Each QA row (JSON Lines, or a JSON array) has `document` (an id) or `documents` (one or two ids), `question`,
    `answer`, and optionally `task` (`qa` (default), `summary`, `review`, `compare`; `compare` takes two
    documents), `template` (`paper`, `book`, `compare`; the paper's templates) and `title` (fills `{title}`; the
    book template names the book, defaulting to the document id).

    Args:
        store (`DocumentStore`): The documents.
        qa_file (`str` or `Path`): The QA rows.
        log (`ProblemLog`): Where problems go (a missing document, an empty answer, a malformed line...).
        template (`str` or `Path`, *optional*): A user template file used for every row instead of the paper's.
    """
    user_template = load_template(template) if template is not None else None
    for where, record in iter_json_records(qa_file, log, "documents"):
        ids = _document_ids(record)
        if isinstance(ids, str):
            log.report("missing_field", where, ids, "documents")
            continue
        question = _string_field(record, ("question",), where, log, "documents")
        if question is None:
            continue
        answer = _string_field(record, ("answer",), where, log, "documents")
        if answer is None:
            continue
        if not question.strip():
            log.report("empty_question", where, "empty question", "documents")
            continue
        if not answer.strip():
            log.report("empty_answer", where, "empty answer", "documents")
            continue
        task = record.get("task") or ("compare" if len(ids) == 2 else "qa")
        if task not in TASKS:
            log.report("bad_row", where, f"unknown task {task!r}; the tasks are {', '.join(TASKS)}", "documents")
            continue
        wanted = 2 if task == "compare" else 1
        if len(ids) != wanted:
            log.report("bad_row", where, f"task {task!r} takes {wanted} document(s), got {len(ids)}", "documents")
            continue
        texts = []
        for doc_id in ids:
            resolved = store.resolve(doc_id)
            if resolved is None:
                reason = f"document {doc_id!r} is not in the documents folder ({store.folder.name}/)"
                log.report("missing_document", where, reason, "documents")
                break
            text = store.get(resolved)
            if text is None:
                reason = f"document {doc_id!r} could not be read ({store.failed[resolved]})"
                log.report("unreadable_document", where, reason, "documents")
                break
            texts.append(text)
        if len(texts) != wanted:
            continue
        kind = record.get("template")
        title = record.get("title") or ids[0]
        try:
            instruction = render_instruction(texts, question, template=user_template, kind=kind, title=str(title))
        except (KeyError, ValueError) as error:
            log.report("bad_row", where, str(error).strip("'\""), "documents")
            continue
        yield {"instruction": instruction, "completion": answer, "source": "documents", "task": task, "where": where}


__all__ = [
    "DOCUMENT_SUFFIXES",
    "ON_ERROR",
    "PROBLEM_KINDS",
    "DocumentStore",
    "LongQAInputError",
    "Problem",
    "ProblemLog",
    "iter_document_rows",
    "iter_json_records",
    "iter_json_stream",
    "iter_longalpaca_rows",
    "iter_records",
    "iter_short_rows",
    "longalpaca_task",
]
