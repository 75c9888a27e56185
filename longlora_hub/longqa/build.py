"""Build a LongQA / LongAlpaca-style supervised dataset: read the inputs (streamed), count tokens, filter by
length, remove duplicates, mix in short instructions, split, and write parquet files, `stats.json`, a length
histogram and a dataset card; optionally push the result to the Hub.

Memory stays flat whatever the input size: rows are streamed from the inputs into an Arrow file on disk, the
token counts and MinHash signatures are computed over that memory-mapped file with `Dataset.map` (batched, with
`num_proc` workers), and the output is written in batches. Only per-row numbers (lengths, digests, signatures)
are held in memory.

The build happens in a hidden folder next to the output, moved into place at the end: a failed build leaves no
half-written output, and an existing non-empty output folder is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DEFAULT_TEMPLATE
from ..hub import HubPushError, hub_errors, hub_failure
from ..hub import check_hub_access as _check_hub_access
from ..log import PROGRESS_BAR_GROUP, get_logger, progress_bar
from .card import HISTOGRAM_FILE, built_at, public_stats, render_card, save_length_histogram
from .process import (
    DEFAULT_NEAR_DUP_THRESHOLD,
    NUM_PERM,
    Deduplicator,
    count_tokens,
    exact_key,
    minhash_signature,
    row_stats,
    short_rows_for_ratio,
    split_indices,
)
from .sources import (
    ON_ERROR,
    DocumentStore,
    ProblemLog,
    iter_document_rows,
    iter_longalpaca_rows,
    iter_short_rows,
)
from .synthetic import synthetic_rows

RAW_COLUMNS = ("instruction", "completion", "source", "task", "where")
SPLITS = ("train", "validation")
DATA_DIR = "data"
LONGALPACA_LICENSE = "cc-by-nc-4.0"
SHORT_SLACK = 0.1  # extra short rows sampled to replace the ones the length filter or dedupe drops
MAX_SHARD_BYTES = 500 * 1000**2  # Arrow bytes per parquet shard: datasets' `push_to_hub` default ("500MB")
WRITE_BATCH_ROWS = 128  # rows per parquet write (and the granularity of a shard's size)

logger = get_logger(__name__)


def output_features():
    """The features of a LongQA build (`datasets.Features`)."""
    from datasets import Features, List, Value

    return Features(
        {
            "prompt": Value("string"),
            "completion": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "source": Value("string"),
            "task": Value("string"),
            "num_tokens": Value("int64"),
        }
    )


@dataclass
class LongQAConfig:
    r"""
    What to build; the `longlora-hub longqa build` options, one field each.

    Args:
        output (`str`): The output folder; must not exist or be empty.
        longalpaca (`list[str]`): LongAlpaca-format JSON/JSONL files, folders or Hub ids, streamed.
        documents (`str`, *optional*): A folder of `.txt`/`.md` (and `.pdf` with pypdf) documents; needs `qa`.
        qa (`str`, *optional*): The QA rows (JSONL or JSON array) over `documents`.
        template (`str`, *optional*): A user template file for the document rows (see `templates.py`).
        short (`str`, *optional*): Short Alpaca-format instructions (file or Hub id).
        short_ratio (`float`, *optional*): The fraction of the output that is short rows (0.25: the paper's
            9k long : 3k short); all short rows when unset.
        synthetic (`int`, defaults to `0`): How many synthetic retrieval rows to generate.
        synthetic_lengths (`list[int]`, *optional*): Their target lengths; defaults to `max_length / 2` and
            `max_length`, or 1024 and 2048 without `max_length`.
        synthetic_corpus (`str`, *optional*): A text file whose sentences fill the synthetic rows.
        tokenizer (`str`, *optional*): A tokenizer folder or Hub id; lengths are in its tokens (in words without).
        max_length (`int`, *optional*): Drop rows longer than this (tokens); needs `tokenizer`.
        on_error (`str`, defaults to `"fail"`): `"fail"` stops at the first bad input; `"skip"` skips, counts and
            reports it.
        seed (`int`, defaults to `0`): Seeds the split, the short-row sample and the synthetic rows.
        validation_size (`float`, defaults to `0.02`): The validation fraction (at least one row when > 0).
        dedupe (`bool`, defaults to `True`): Remove exact and near duplicates.
        near_dup_threshold (`float`, defaults to `0.8`): MinHash similarity of prompt and of completion above
            which two rows are near-duplicates; `None` for exact deduplication only.
        prompt_template (`str`, defaults to `"[INST]{instruction}[/INST]"`): Wraps the instruction in `prompt`,
            as the training recipe does for instruction/output rows.
        num_proc (`int`, defaults to `1`): Worker processes for token counting and signatures.
        batch_size (`int`, defaults to `64`): Rows per tokenizer call.
        license (`str`, *optional*): The card's license; inferred from the sources when unset.
        pretty_name (`str`, defaults to `"LongQA"`): The card's title.
        card_template (`str`, *optional*): A card template file (`datasets/longqa/README.md` is the default's
            text).
        save_arrow (`bool`, defaults to `False`): Also write `OUTPUT/arrow/` for `datasets.load_from_disk`.
    """

    output: str
    longalpaca: list[str] = field(default_factory=list)
    documents: str | None = None
    qa: str | None = None
    template: str | None = None
    short: str | None = None
    short_ratio: float | None = None
    synthetic: int = 0
    synthetic_lengths: list[int] | None = None
    synthetic_corpus: str | None = None
    tokenizer: str | None = None
    max_length: int | None = None
    on_error: str = "fail"
    seed: int = 0
    validation_size: float = 0.02
    dedupe: bool = True
    near_dup_threshold: float | None = DEFAULT_NEAR_DUP_THRESHOLD
    prompt_template: str = DEFAULT_TEMPLATE
    num_proc: int = 1
    batch_size: int = 64
    license: str | None = None
    pretty_name: str = "LongQA"
    card_template: str | None = None
    save_arrow: bool = False

    def validate(self) -> None:
        """Refuse inconsistent options before any work is done."""
        if not (self.longalpaca or self.documents or self.qa or self.short or self.synthetic):
            raise ValueError("Nothing to build: give --longalpaca, --documents with --qa, --short or --synthetic N.")
        if bool(self.documents) != bool(self.qa):
            raise ValueError("--documents and --qa go together: the QA file names the documents it asks about.")
        if self.template and not self.documents:
            raise ValueError("--template applies to --documents/--qa rows only.")
        if self.short_ratio is not None:
            if not self.short:
                raise ValueError("--short-ratio needs --short (the short instruction data to mix in).")
            if not 0 <= self.short_ratio < 1:
                raise ValueError(f"--short-ratio must be in [0, 1), got {self.short_ratio}.")
            if not (self.longalpaca or self.documents or self.synthetic):
                raise ValueError("--short-ratio mixes short rows into long ones; give a long input too.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"--max-length must be positive, got {self.max_length}.")
        if self.max_length is not None and not self.tokenizer:
            raise ValueError("--max-length counts tokens: give --tokenizer too.")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {ON_ERROR}, got {self.on_error!r}.")
        if self.synthetic < 0:
            raise ValueError(f"--synthetic must be >= 0, got {self.synthetic}.")
        if not 0 <= self.validation_size < 1:
            raise ValueError(f"--validation-size must be in [0, 1), got {self.validation_size}.")
        if "{instruction}" not in self.prompt_template:
            raise ValueError(f"--prompt-template must contain '{{instruction}}', got {self.prompt_template!r}.")
        if self.num_proc < 1 or self.batch_size < 1:
            raise ValueError("--num-proc and the batch size must be at least 1.")

    def lengths_for_synthetic(self) -> list[int]:
        if self.synthetic_lengths:
            return list(self.synthetic_lengths)
        top = self.max_length or 2048
        return [top // 2, top]


@dataclass
class BuildResult:
    """What a build wrote: the output folder, its statistics (`stats.json`) and the time of each stage."""

    output: Path
    stats: dict[str, Any]
    timings: dict[str, float]

    @property
    def data_files(self) -> dict[str, str]:
        return {
            split: str(self.output / DATA_DIR / f"{split}-*.parquet") for split, n in self.stats["splits"].items() if n
        }

    def load(self):
        """The built `DatasetDict`, read back from its parquet files."""
        from datasets import load_dataset

        return load_dataset("parquet", data_files=self.data_files)


def apply_prompt_template(template: str, instruction: str) -> str:
    """`template` with `{instruction}` replaced; other braces stay as they are (unlike `str.format`)."""
    return template.replace("{instruction}", instruction)


def check_output_folder(output: str | Path) -> Path:
    """The output path, if it is free: missing, or an empty folder. Never overwrite the user's data."""
    output = Path(output).expanduser()
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"{output} exists and is not a folder; choose another --output.")
        if any(output.iterdir()):
            raise FileExistsError(
                f"{output} is not empty; refusing to overwrite it. Choose a new --output or empty it yourself."
            )
    return output


class _RowWriter:
    """Appends raw rows to an Arrow stream file on disk (what `Dataset.from_file` memory-maps), in batches."""

    def __init__(self, path: Path, batch_rows: int = 256):
        import pyarrow as pa

        self.pa = pa
        self.path = path
        self.schema = pa.schema([(name, pa.string()) for name in RAW_COLUMNS])
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.batch_rows = batch_rows
        self.pending: list[dict[str, str]] = []
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            columns = {name: [row[name] for row in self.pending] for name in RAW_COLUMNS}
            self.writer.write_table(self.pa.table(columns, schema=self.schema))
            self.rows += len(self.pending)
            self.pending = []

    def close(self):
        """Finish the file and return it as a memory-mapped `Dataset`."""
        from datasets import Dataset

        self._flush()
        self.writer.close()
        self.sink.close()
        return Dataset.from_file(str(self.path))


def _annotate(batch: dict[str, list], tokenizer, prompt_template: str, dedupe: bool) -> dict[str, list]:
    """Per-row numbers for a batch: token count, and (for dedupe) exact digest and MinHash signatures."""
    prompts = [apply_prompt_template(prompt_template, text) for text in batch["instruction"]]
    completions = batch["completion"]
    out: dict[str, list] = {"num_tokens": count_tokens(tokenizer, prompts, completions)}
    if dedupe:
        out["key"] = [exact_key(p, c) for p, c in zip(prompts, completions, strict=True)]
        out["prompt_sig"] = [minhash_signature(p) for p in prompts]
        out["completion_sig"] = [minhash_signature(c) for c in completions]
    return out


def _annotations(raw, config: LongQAConfig, tokenizer, work: Path, name: str) -> dict[str, Any]:
    """Token counts (and dedupe keys and signatures) of every raw row, as numpy arrays / lists."""
    if len(raw) == 0:
        empty_sig = np.zeros((0, NUM_PERM), dtype=np.uint64)
        return {
            "num_tokens": np.zeros(0, dtype=np.int64),
            "key": [],
            "prompt_sig": empty_sig,
            "completion_sig": empty_sig,
        }
    with _datasets_bars_like_ours():
        annotated = raw.map(
            _annotate,
            batched=True,
            batch_size=config.batch_size,
            num_proc=config.num_proc if config.num_proc > 1 and len(raw) >= 2 * config.batch_size else None,
            remove_columns=list(raw.column_names),
            fn_kwargs={"tokenizer": tokenizer, "prompt_template": config.prompt_template, "dedupe": config.dedupe},
            cache_file_name=str(work / f"{name}-annotations.arrow"),
            new_fingerprint=f"longqa-{name}-{os.getpid()}-{time.time_ns()}",  # never reuse a cache across builds
            desc=f"Counting tokens ({name})",
        )
    table = annotated.data
    result: dict[str, Any] = {"num_tokens": np.asarray(table.column("num_tokens").to_numpy(), dtype=np.int64)}
    if config.dedupe:
        result["key"] = table.column("key").to_pylist()
        for column in ("prompt_sig", "completion_sig"):
            values = table.column(column).combine_chunks().flatten().to_numpy()
            result[column] = np.asarray(values, dtype=np.uint64).reshape(-1, NUM_PERM)
    return result


@contextmanager
def _datasets_bars_like_ours() -> Iterator[None]:
    """`datasets` has progress bars of its own (the token count's `Dataset.map`), with their own switch: within the
    block they are off when this package's are (`HF_HUB_DISABLE_PROGRESS_BARS=1`, `longlora-hub -q`), so that one
    setting silences a whole build."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import are_progress_bars_disabled as ours_disabled

    if not ours_disabled(f"{PROGRESS_BAR_GROUP}.longqa") or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


class _Selection:
    """Applies the length filter and the deduplication to rows in order, and counts what it drops."""

    def __init__(self, config: LongQAConfig):
        self.max_length = config.max_length
        self.dedupe = Deduplicator(config.near_dup_threshold) if config.dedupe else None
        self.dropped: dict[str, Counter[str]] = {
            reason: Counter() for reason in ("too_long", "exact_duplicate", "near_duplicate", "short_unused")
        }
        self.next_id = 0

    def select(self, sources: list[str], notes: dict[str, Any]) -> list[int]:
        kept = []
        for index, source in enumerate(sources):
            row_id, self.next_id = self.next_id, self.next_id + 1
            if self.max_length is not None and notes["num_tokens"][index] > self.max_length:
                self.dropped["too_long"][source] += 1
                continue
            if self.dedupe is not None:
                verdict = self.dedupe.add(
                    row_id, notes["key"][index], notes["prompt_sig"][index], notes["completion_sig"][index]
                )
                if verdict is not None:
                    self.dropped[f"{verdict[0]}_duplicate"][source] += 1
                    continue
            kept.append(index)
        return kept


def _long_rows(config: LongQAConfig, log: ProblemLog, tokenizer, store: DocumentStore | None) -> Iterator[dict]:
    """Every non-short input, in a fixed order: document QA rows, LongAlpaca rows, synthetic rows."""
    if store is not None:
        yield from iter_document_rows(store, config.qa, log, template=config.template)
    for spec in config.longalpaca:
        yield from iter_longalpaca_rows(spec, log)
    if config.synthetic:
        corpus = None
        if config.synthetic_corpus:
            corpus = Path(config.synthetic_corpus).read_text(encoding="utf-8")
        yield from synthetic_rows(
            config.synthetic,
            tokenizer,
            lengths=config.lengths_for_synthetic(),
            corpus=corpus,
            prompt_template=config.prompt_template,
            seed=config.seed,
        )


def _sample(rows: Iterable[dict], size: int | None, rng: random.Random) -> Iterator[dict]:
    """All rows (`size=None`), or a uniform sample of `size` of them in random order (reservoir sampling, so a
    large short-instruction file is never held whole)."""
    if size is None:
        yield from rows
        return
    reservoir: list[dict] = []
    for seen, row in enumerate(rows):
        if seen < size:
            reservoir.append(row)
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                reservoir[slot] = row
    rng.shuffle(reservoir)
    yield from reservoir


def load_tokenizer(name_or_path: str | None):
    """The tokenizer the lengths are counted in (a folder or a Hub id), or None to count words."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    from ..convert import trust_remote_code_for

    try:
        try:  # a LlamaLongLoRA folder names this package's own code: no y/N question from transformers
            trust = trust_remote_code_for(name_or_path)
        except ValueError:  # another checkpoint's code: transformers asks, as it would without this package
            trust = None
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot load the tokenizer {name_or_path!r}: {error}") from error
    if not getattr(tokenizer, "is_fast", False):
        logger.warning(f"{name_or_path} is a slow tokenizer; token counting will be much slower than with a fast one")
    return tokenizer


def _documents_too_long(store: DocumentStore, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """The documents that alone exceed max_length (their rows are dropped by the length filter)."""
    too_long = []
    ids = [doc_id for doc_id in store.paths if doc_id not in store.failed]
    for begin in range(0, len(ids), 16):
        chunk = [doc_id for doc_id in ids[begin : begin + 16]]
        texts = [store.get(doc_id) for doc_id in chunk]
        readable = [(doc_id, text) for doc_id, text in zip(chunk, texts, strict=True) if text is not None]
        counts = count_tokens(tokenizer, [text for _, text in readable], [""] * len(readable))
        too_long += [
            {"document": doc_id, "num_tokens": count}
            for (doc_id, _), count in zip(readable, counts, strict=True)
            if count > max_length
        ]
    return too_long


def shard_name(split: str, index: int, count: int) -> str:
    """The file name `datasets` gives a parquet shard (`train-00000-of-00001.parquet`), which the card's `configs`
    (`data/train-*`), the Hub viewer and `load_dataset(repo_id)` find."""
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def _write_split(
    combined,
    indices: list[int],
    num_tokens: np.ndarray,
    folder: Path,
    split: str,
    prompt_template: str,
    max_shard_bytes: int | None = None,
) -> tuple[list[Path], int]:
    """Write one split as parquet shards of about `max_shard_bytes` of Arrow data each (what `datasets`'
    `push_to_hub` would make of it, 500 MB by default), in batches, adding `prompt`, `messages` and `num_tokens`.
    Returns the shards and the split's size as Arrow data (`num_bytes` in a card's dataset_info)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limit = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    schema = output_features().arrow_schema
    # the shard count is known only at the end: shards are written under temporary names, then renamed
    partial: list[Path] = []
    writer, written, total = None, 0, 0
    bar = progress_bar("longqa", total=len(indices), desc=f"writing {split}", unit="row")
    try:
        for begin in range(0, len(indices), WRITE_BATCH_ROWS):
            chunk = indices[begin : begin + WRITE_BATCH_ROWS]
            rows = combined[chunk]
            instructions, completions = rows["instruction"], rows["completion"]
            table = pa.table(
                {
                    "prompt": [apply_prompt_template(prompt_template, text) for text in instructions],
                    "completion": completions,
                    "messages": [
                        [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
                        for text, answer in zip(instructions, completions, strict=True)
                    ],
                    "source": rows["source"],
                    "task": rows["task"],
                    "num_tokens": [int(num_tokens[index]) for index in chunk],
                },
                schema=schema,
            )
            if writer is not None and written >= limit:
                writer.close()
                writer = None
            if writer is None:
                partial.append(folder / f".{split}-{len(partial):05d}.parquet.partial")
                writer, written = pq.ParquetWriter(str(partial[-1]), schema), 0
            writer.write_table(table)
            written += table.nbytes
            total += table.nbytes
            bar.update(len(chunk))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    shards = [folder / shard_name(split, index, len(partial)) for index in range(len(partial))]
    for source, target in zip(partial, shards, strict=True):
        source.rename(target)
    return shards, total


def _inferred_license(config: LongQAConfig) -> str:
    if config.license:
        return config.license
    if config.longalpaca:
        return LONGALPACA_LICENSE
    if config.documents or config.short:
        return "other"  # the user's own data: we cannot know its terms
    return "apache-2.0"  # synthetic rows only: generated by this project's code


def _hub_ids(specs: Iterable[str | None]) -> list[str]:
    """The inputs that are Hub datasets (not local paths), for the card's `source_datasets`."""
    from .sources import _HUB_ID

    return [spec for spec in specs if spec and not Path(spec).expanduser().exists() and _HUB_ID.fullmatch(spec)]


def build_longqa(
    config: LongQAConfig, echo: Callable[[str], None] | None = None, repo_id: str | None = None
) -> BuildResult:
    r"""
    Build a LongQA dataset as `config` says and write it to `config.output`.

    Writes `OUTPUT/data/{train,validation}-00000-of-00001.parquet` (more shards, named the same way, for a split
    over `MAX_SHARD_BYTES`), `OUTPUT/stats.json`, `OUTPUT/README.md` (the
    dataset card) and `OUTPUT/length_histogram.png` (when matplotlib is installed), and with `save_arrow`
    `OUTPUT/arrow/` too.

    Args:
        config (`LongQAConfig`): What to build.
        echo (`Callable[[str], None]`, *optional*): Where progress lines go; this package's logger (stderr,
            `[longlora-hub] ...`) by default. The progress bars of reading and writing rows go to stderr either way
            (off with `HF_HUB_DISABLE_PROGRESS_BARS=1`).
        repo_id (`str`, *optional*): The Hub repository it will be pushed to, for the card's usage snippet.

    Raises:
        `ValueError`: Inconsistent options (`LongQAInputError`, a `ValueError`, for bad input with
            `on_error="fail"`).
        `FileExistsError`: The output folder exists and is not empty.
    """
    config.validate()
    output = check_output_folder(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        result = _build(config, output, staging / "out", staging / "work", _reporter(echo), repo_id)
        check_output_folder(output)  # in case something appeared there during the build
        if output.exists():
            output.rmdir()
        (staging / "out").rename(output)
        result.output = output
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reporter(echo: Callable[[str], None] | None) -> Callable[..., None]:
    """`say(message, warning=False)`: to this package's logger, or to `echo` as `[longqa] message` lines."""
    if echo is None:
        return lambda message, warning=False: (logger.warning if warning else logger.info)(message)
    return lambda message, warning=False: echo(f"[longqa] {'warning: ' if warning else ''}{message}")


def _build(
    config: LongQAConfig, output: Path, out: Path, work: Path, say: Callable[..., None], repo_id: str | None
) -> BuildResult:
    from datasets import DatasetDict, concatenate_datasets, load_dataset

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    out.mkdir()
    work.mkdir()
    (out / DATA_DIR).mkdir()
    log = ProblemLog(config.on_error)
    tokenizer = load_tokenizer(config.tokenizer)
    store = DocumentStore(config.documents, log) if config.documents else None

    say("reading the long inputs")
    writer = _RowWriter(work / "long.arrow")
    collected: Counter[str] = Counter()
    with progress_bar("longqa", desc="reading long inputs", unit="row") as bar:  # no total: the inputs are streamed
        for row in _long_rows(config, log, tokenizer, store):
            writer.write(row)
            collected[row["source"]] += 1
            bar.update()
    long_raw = writer.close()
    timings["read_long_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    long_notes = _annotations(long_raw, config, tokenizer, work, "long")
    selection = _Selection(config)
    kept_long = selection.select(long_raw.data.column("source").to_pylist(), long_notes)
    timings["process_long_s"] = time.perf_counter() - clock

    mix: dict[str, Any] = {"short_ratio": config.short_ratio, "long_rows": len(kept_long)}
    kept_short: list[int] = []
    short_raw = None
    short_notes = None
    if config.short:
        clock = time.perf_counter()
        wanted = None if config.short_ratio is None else short_rows_for_ratio(len(kept_long), config.short_ratio)
        say(f"reading the short rows ({'all' if wanted is None else wanted} wanted)")
        sample_size = None if wanted is None else wanted + max(16, int(wanted * SHORT_SLACK))
        writer = _RowWriter(work / "short.arrow")
        rng = random.Random(f"longqa-short:{config.seed}")
        available = Counter()
        with progress_bar("longqa", desc="reading short rows", unit="row") as bar:
            for row in _sample(_counted(iter_short_rows(config.short, log), available, bar), sample_size, rng):
                writer.write(row)
        short_raw = writer.close()
        collected["short"] += available["rows"]
        short_notes = _annotations(short_raw, config, tokenizer, work, "short")
        kept_short = selection.select(short_raw.data.column("source").to_pylist(), short_notes)
        if wanted is not None:
            unused = len(kept_short) - wanted
            if unused > 0:
                selection.dropped["short_unused"]["short"] += unused
            kept_short = kept_short[:wanted]
            mix["short_wanted"] = wanted
            if len(kept_short) < wanted:
                say(
                    f"the short ratio {config.short_ratio} needs {wanted} short rows, only {len(kept_short)} are "
                    "available",
                    warning=True,
                )
        mix["short_rows"] = len(kept_short)
        timings["short_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    parts = [long_raw] + ([short_raw] if short_raw is not None else [])
    combined = concatenate_datasets(parts) if len(parts) > 1 else long_raw
    offset = len(long_raw)
    selected = kept_long + [offset + index for index in kept_short]
    num_tokens = long_notes["num_tokens"]
    if short_notes is not None:
        num_tokens = np.concatenate([num_tokens, short_notes["num_tokens"]])
    if not selected:
        raise ValueError(
            "No row is left to write: every row was dropped (see the problems and the length filter above). "
            f"Problems: {log.to_dict()['by_kind']}; dropped: "
            f"{ {reason: dict(counts) for reason, counts in selection.dropped.items() if counts} }."
        )
    train, validation = split_indices(len(selected), config.validation_size, config.seed)
    splits = {"train": [selected[i] for i in train], "validation": [selected[i] for i in validation]}
    say(f"writing {len(train)} train and {len(validation)} validation rows")
    # the sizes `datasets` records in a card's dataset_info (without them it ignores the card's split sizes)
    sizes: dict[str, Any] = {"splits": {}, "download_size": 0}
    for split, indices in splits.items():
        if indices:
            shards, arrow_bytes = _write_split(
                combined, indices, num_tokens, out / DATA_DIR, split, config.prompt_template
            )
            sizes["splits"][split] = arrow_bytes
            sizes["download_size"] += sum(path.stat().st_size for path in shards)
    timings["write_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sources = combined.data.column("source").to_pylist()
    tasks = combined.data.column("task").to_pylist()

    def stats_of(indices: list[int]) -> dict[str, Any]:
        return row_stats(
            [sources[i] for i in indices], [tasks[i] for i in indices], [int(num_tokens[i]) for i in indices]
        )

    stats = {
        "version": _version(),
        "built_at": built_at(),
        "config": {
            **asdict(config),
            "license": _inferred_license(config),
            "license_inferred": not config.license,
            "source_datasets": _hub_ids([*config.longalpaca, config.short]),
            "synthetic_lengths": config.lengths_for_synthetic() if config.synthetic else None,
            "repo_id": repo_id,
        },
        "splits": {"train": len(train), "validation": len(validation)},
        "bytes": sizes,
        "collected": dict(sorted(collected.items())),
        "rows": stats_of(selected),
        "split_rows": {split: stats_of(indices)["all"] for split, indices in splits.items()},
        "dropped": {reason: dict(sorted(counts.items())) for reason, counts in selection.dropped.items()},
        "mix": mix,
        "problems": log.to_dict(),
        "documents_too_long": (
            _documents_too_long(store, tokenizer, config.max_length)
            if store is not None and tokenizer is not None and config.max_length
            else []
        ),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lengths = {split: [int(num_tokens[i]) for i in indices] for split, indices in splits.items()}
    has_histogram = save_length_histogram(lengths, out / HISTOGRAM_FILE, config.max_length)
    template = Path(config.card_template).read_text(encoding="utf-8") if config.card_template else None
    card = render_card(stats, output_features(), repo_id=repo_id, template=template, has_histogram=has_histogram)
    (out / "README.md").write_text(card, encoding="utf-8")
    if config.save_arrow:
        files = {split: str(out / DATA_DIR / f"{split}-*.parquet") for split, indices in splits.items() if indices}
        loaded = load_dataset("parquet", data_files=files, cache_dir=str(work / "cache"))
        DatasetDict(loaded).save_to_disk(str(out / "arrow"))
    timings["stats_card_s"] = time.perf_counter() - clock
    return BuildResult(output=output, stats=stats, timings=timings)


def _counted(rows: Iterable[dict], counter: Counter, bar: Any = None) -> Iterator[dict]:
    for row in rows:
        counter["rows"] += 1
        if bar is not None:
            bar.update()  # rows read, not rows kept: the sample is drawn from all of them
        yield row


def _version() -> str:
    from .. import __version__

    return __version__


def format_summary(stats: dict[str, Any], output: Path | str) -> str:
    """A short human-readable report of a build: rows per split, source and task, what was dropped, problems."""
    lines = [f"LongQA dataset written to {output}"]
    lines.append("  splits: " + ", ".join(f"{name} {count}" for name, count in stats["splits"].items()))
    for source, summary in stats["rows"]["by_source"].items():
        lines.append(
            f"  {source}: {summary['rows']} rows, {summary['tokens']} tokens (mean {summary['mean_tokens']}, max "
            f"{summary['max_tokens']})"
        )
    tasks = ", ".join(f"{task} {summary['rows']}" for task, summary in stats["rows"]["by_task"].items())
    lines.append(f"  tasks: {tasks}")
    mix = stats["mix"]
    if "short_rows" in mix:
        share = mix["short_rows"] / max(1, mix["short_rows"] + mix["long_rows"])
        lines.append(f"  short rows: {mix['short_rows']} ({share:.1%} of the output)")
    for reason, by_source in stats["dropped"].items():
        if by_source:
            lines.append(f"  dropped ({reason}): " + ", ".join(f"{s} {n}" for s, n in by_source.items()))
    for document in stats.get("documents_too_long", []):
        lines.append(f"  document longer than max_length: {document['document']} ({document['num_tokens']} tokens)")
    problems = stats["problems"]
    if problems["total"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in problems["by_kind"].items())
        lines.append(f"  skipped bad input: {problems['total']} ({kinds}); first ones:")
        lines += [f"    {example['where']}: {example['reason']}" for example in problems["examples"]]
    else:
        lines.append("  bad input: none")
    return "\n".join(lines)


# the LongQA push raises the shared Hub error; the old name stays importable
LongQAPushError = HubPushError


def check_hub_access(token: str | None = None, endpoint: str | None = None) -> str:
    """The shared token check, with the LongQA builder's way out when there is no token."""
    return _check_hub_access(token, endpoint, no_token_hint=", or build without --push-to-hub")


def _push_files(output: Path, stats: dict[str, Any]) -> list[str]:
    """The parquet shards of a build, as paths in the repository (`data/train-00000-of-00001.parquet`, ...), checked
    against the splits `stats.json` records."""
    shards = sorted(path.relative_to(output).as_posix() for path in (output / DATA_DIR).glob("*.parquet"))
    missing = [
        split
        for split, count in stats["splits"].items()
        if count and not any(name.startswith(f"{DATA_DIR}/{split}-") for name in shards)
    ]
    if missing:
        raise FileNotFoundError(
            f"{output / DATA_DIR} has no parquet file for the split(s) {', '.join(missing)} that stats.json records; "
            "the build is incomplete: build it again."
        )
    return shards


def push_longqa(
    output: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    r"""
    Push a built LongQA folder to the Hub in ONE commit: the parquet shards exactly as the build wrote them (no
    re-encoding: `data/train-00000-of-00001.parquet`, ..., the names `datasets` gives its shards), the card
    (README.md, whose `configs` map each split to `data/{split}-*`, so the Hub viewer and `load_dataset(repo_id)`
    find them), `stats.json` and the length histogram.

    The repository mirrors the build: parquet files under `data/` that this build does not have (an earlier build's
    other splits or shard counts), and a histogram it did not draw, are deleted in the same commit; other files are
    kept.
    An unchanged build makes no commit. `load_dataset(repo_id)` then gives back the rows of the parquet files in
    `output`.

    Args:
        output (`str` or `Path`): A folder written by `build_longqa`.
        repo_id (`str`): The dataset repository (created if needed).
        private (`bool`, *optional*, defaults to `False`): Create the repository private.
        token (`str`, *optional*): Defaults to the logged-in token.
        endpoint (`str`, *optional*): The Hub server; defaults to `HF_ENDPOINT` / huggingface.co.
        commit_message (`str`, *optional*): Defaults to "LongQA dataset (longlora-hub)".

    Returns:
        `str`: The dataset's URL.

    Raises:
        `FileNotFoundError`: `output` is not a complete LongQA build.
        `HubPushError`: No token, a refused token, no write access or an unreachable Hub, with what to do.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    output = Path(output)
    stats_path = output / "stats.json"
    if not stats_path.is_file() or not (output / DATA_DIR).is_dir():
        raise FileNotFoundError(f"{output} is not a LongQA build (no stats.json or data/); build it first.")
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    shards = _push_files(output, stats)
    endpoint = endpoint or constants.ENDPOINT
    token = check_hub_access(token, endpoint)
    card = (output / "README.md").read_bytes()
    has_histogram = (output / HISTOGRAM_FILE).is_file()
    if stats["config"].get("repo_id") != repo_id and not stats["config"].get("card_template"):
        # built without knowing this repository: render the default card again so its usage snippet names it
        card = render_card(stats, output_features(), repo_id=repo_id, has_histogram=has_histogram).encode()
    operations: list[Any] = [CommitOperationAdd(name, str(output / name)) for name in shards]
    operations += [
        CommitOperationAdd("README.md", card),
        # without the builder's local folders, like the card
        CommitOperationAdd("stats.json", (json.dumps(public_stats(stats), indent=2) + "\n").encode()),
    ]
    if has_histogram:
        operations.append(CommitOperationAdd(HISTOGRAM_FILE, str(output / HISTOGRAM_FILE)))
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        remote = api.list_repo_files(repo_id, repo_type="dataset")
        uploaded = {operation.path_in_repo for operation in operations}
        stale = sorted(
            name
            for name in remote
            if name not in uploaded
            and ((name.startswith(f"{DATA_DIR}/") and name.endswith(".parquet")) or name == HISTOGRAM_FILE)
        )
        operations += [CommitOperationDelete(name) for name in stale]
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "LongQA dataset (longlora-hub)",
            repo_type="dataset",
        )
    except hub_errors() as error:
        raise hub_failure(error, endpoint, f"push to {repo_id}") from error
    return f"{endpoint.rstrip('/')}/datasets/{repo_id}"


__all__ = [
    "BuildResult",
    "LongQAConfig",
    "LongQAPushError",
    "apply_prompt_template",
    "build_longqa",
    "check_hub_access",
    "check_output_folder",
    "format_summary",
    "load_tokenizer",
    "output_features",
    "push_longqa",
    "shard_name",
]
