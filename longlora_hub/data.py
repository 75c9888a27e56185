"""Training data for the two LongLoRA stages.

- `extend` (context extension): long plain text, documents joined with EOS and packed into rows of exactly the
  target length, like the paper. With `keep_documents_apart`, each row also lists the lengths of its documents in
  `seq_lengths`, the column TRL's own packing writes: TRL's padding-free collator turns it into `position_ids`
  that restart at every document, so S²-Attn (and full attention) keep documents apart inside a row.
- `longqa` (supervised): prompt-completion rows in TRL's format; LongAlpaca-style `instruction`/`output` rows are
  turned into `[INST]{instruction}[/INST]` prompts (or the tokenizer's chat template). The loss is on the
  completion only (TRL's `completion_only_loss`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("builtin:documents", "builtin:passkey", "builtin:corpus", "builtin:corpus-long")
REMOTE_PREFIX = "hf://"
TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_TEMPLATE = "[INST]{instruction}[/INST]"


def load_raw_dataset(
    dataset_name: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    streaming: bool = False,
    dataset_config: str | None = None,
    num_builtin_rows: int = 64,
):
    r"""
    Load the raw rows of a training set.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset name, or one of `BUILTIN_DATASETS` (synthetic data that needs no download).
        data_files (`list[str]` or `str`, *optional*):
            Local `.txt`/`.md` (one document per file), `.json`/`.jsonl` or `.parquet` files, or files in a Hub
            repository as `hf://datasets/USER/REPO/PATH` (globs allowed in both); one file may be given as a string.
            Local JSON files are checked row by row first (see [`check_json_rows`]).
        split (`str`, *optional*, defaults to `"train"`): The split to read.
        streaming (`bool`, *optional*, defaults to `False`): Stream instead of downloading/preparing it all.
        dataset_config (`str`, *optional*): The Hub dataset's configuration name.
        num_builtin_rows (`int`, *optional*, defaults to `64`): How many rows a builtin dataset has.
    """
    from datasets import Dataset, load_dataset

    if (dataset_name is None) == (data_files is None):
        raise ValueError("Give exactly one of dataset_name (a Hub dataset or builtin:...) and data_files.")
    if dataset_name is not None and dataset_name.startswith(BUILTIN_PREFIX):
        from .synthetic import long_documents, passkey_examples

        if dataset_name == "builtin:documents":
            rows = [{"text": text} for text in long_documents(num_builtin_rows)]
        elif dataset_name == "builtin:passkey":
            rows = passkey_examples(num_builtin_rows)
        elif dataset_name == "builtin:corpus":
            from .corpus import corpus_documents

            rows = [{"text": text} for text in corpus_documents(num_builtin_rows)]
        elif dataset_name == "builtin:corpus-long":
            from .corpus import long_corpus_documents

            rows = [{"text": text} for text in long_corpus_documents(num_builtin_rows)]
        else:
            raise ValueError(f"Unknown builtin dataset {dataset_name!r}; the builtin datasets are {BUILTIN_DATASETS}.")
        dataset = Dataset.from_list(rows)
        return dataset.to_iterable_dataset() if streaming else dataset
    if dataset_name is not None:
        try:
            return load_dataset(dataset_name, dataset_config, split=split, streaming=streaming)
        except Exception as error:
            raise ValueError(
                f"Could not load the dataset {dataset_name!r} ({type(error).__name__}: {error}). Check the name, your "
                "network and token, or pass local files with data_files."
            ) from error
    if isinstance(data_files, str):
        data_files = [data_files]  # iterating a lone string would give its characters, each taken for a file
    # files in a Hub repository (`hf://datasets/user/repo/path`, globs allowed) are left for datasets to resolve
    remote = [pattern for pattern in data_files if pattern.startswith(REMOTE_PREFIX)]
    local = _expand(pattern for pattern in data_files if not pattern.startswith(REMOTE_PREFIX))
    files = [*map(str, local), *remote]
    kinds = {TEXT_SUFFIXES.get(PurePosixPath(path).suffix.lower()) for path in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data_files must all be of one kind among {sorted(TEXT_SUFFIXES)}; got {sorted(files)}.")
    kind = kinds.pop()
    if kind == "json":
        # datasets reports a broken row as "An error occurred while generating the dataset" (or a bare
        # StopIteration for an empty file) without naming the file, and takes a `null` row for a row of nulls
        for path in local:
            check_json_rows(path)
    extra = {"sample_by": "document"} if kind == "text" else {}
    try:
        return load_dataset(kind, data_files=files, split="train", streaming=streaming, **extra)
    except Exception as error:
        if not remote:
            raise
        raise ValueError(
            f"Could not read the Hub data files {remote} ({type(error).__name__}: {error}). Write them as "
            "hf://datasets/USER/REPO/PATH (globs allowed), and check the repository, your network and token."
        ) from error


def _expand(patterns: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        matches = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else [path]
        missing = [match for match in matches if not match.is_file()]
        if not matches or missing:
            raise FileNotFoundError(f"No data file at {pattern}; check data_files in your config.")
        files.extend(matches)
    return files


def check_json_rows(path: str | Path) -> int:
    r"""
    Check that a local JSON data file holds rows that `datasets` can load: one JSON object per line (JSON Lines,
    blank lines allowed), or one JSON document that is a list of objects or an object of columns (what `datasets`
    falls back to when the first line is not a whole JSON value). One pass over the file, about 0.2 s per 100 MB: far
    less than `datasets` takes to convert it, and every error comes before a model is converted or loaded.

    Args:
        path (`str` or `Path`): A `.json` or `.jsonl` file.

    Returns:
        `int`: How many rows the file holds (lines, list items, or the length of the first column).

    Raises:
        `ValueError`: If a line or the document is not valid JSON (naming the file and line), a row is not an
            object, or the file holds no rows; each message names the fix.
    """
    path = Path(path)
    rows = 0
    with path.open("rb") as file:  # bytes: json detects UTF-8/16/32 and a BOM itself
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
                if rows == 0:  # perhaps one document spread over many lines, e.g. a pretty-printed list
                    return _check_json_document(path)
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({_json_error(error)}). Fix or remove that line: each "
                    'line of a JSON Lines file is one object, such as {"text": "..."}.'
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {number}: a JSON {_json_kind(row)}, not an object. Each line of a JSON Lines file "
                    'is one row, an object such as {"text": "..."}: wrap the value in an object or remove the line.'
                )
            rows += 1
    if not rows:
        raise ValueError(
            f"{path} holds no rows (it is empty); remove it from data_files or fill it with one JSON object per line."
        )
    return rows


def _check_json_document(path: Path) -> int:
    """The rows of a JSON file that holds one document: a list of objects, or an object whose values are columns."""
    try:
        document = json.loads(path.read_bytes())
    except ValueError as error:
        where = f", line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise ValueError(
            f"{path}{where}: not valid JSON ({_json_error(error)}). Fix the file: either one object per line (JSON "
            "Lines), or one list of objects."
        ) from None
    if isinstance(document, dict):
        columns = [value for value in document.values() if isinstance(value, list)]
        if columns:
            return len(columns[0])
        raise ValueError(
            f"{path} holds one JSON object whose values are not lists, so no rows; write one object per line "
            "(JSON Lines) or a list of objects."
        )
    if not isinstance(document, list):
        raise ValueError(
            f"{path} holds a JSON {_json_kind(document)}, not rows; write one object per line or a list of objects."
        )
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: item {index} of the list is a JSON {_json_kind(row)}, not an object; every item is one row, "
                'an object such as {"text": "..."}.'
            )
    if not document:
        raise ValueError(f"{path} holds an empty list, so no rows; remove it from data_files or add rows.")
    return len(document)


def _json_error(error: ValueError) -> str:
    """What is wrong and at which column, from a `JSONDecodeError` (or the text of a decoding error)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg.removesuffix(' at')} at column {error.colno}"
    return f"not UTF-8 text: {error}"


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    names = {bool: "boolean", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "number")


def _packed_rows(
    texts: Iterable[str], tokenizer, seq_len: int, keep_documents_apart: bool, batch_size: int = 256
) -> Iterator[dict[str, list[int]]]:
    """Rows of exactly `seq_len` tokens from documents joined with EOS; the last partial row is dropped. With
    `keep_documents_apart`, `seq_lengths` holds the lengths of the documents in the row (summing to `seq_len`)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token; set one (documents are joined with it).")
    ids: list[int] = []
    lengths: list[int] = []  # the documents (or what a row boundary left of them) that make up `ids`

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        for document in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            document = [*document, eos]
            ids.extend(document)
            lengths.append(len(document))
            while len(ids) >= seq_len:
                row = {"input_ids": ids[:seq_len]}
                row_lengths, lengths = _split_lengths(lengths, seq_len)
                if keep_documents_apart:
                    row["seq_lengths"] = row_lengths
                yield row
                ids = ids[seq_len:]


def _split_lengths(lengths: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """The document lengths of the next row and those left after it. A document cut by the row boundary continues
    in the next row as a sequence of its own (from position 0): rows stay independent of each other."""
    index, total = 0, 0  # the caller holds at least `seq_len` tokens, so the loop stops inside `lengths`
    while total + lengths[index] < seq_len:
        total += lengths[index]
        index += 1
    rest = total + lengths[index] - seq_len
    return [*lengths[:index], seq_len - total], ([rest] if rest else []) + lengths[index + 1 :]


def pack_documents(dataset, tokenizer, seq_len: int, text_field: str = "text", keep_documents_apart: bool = False):
    r"""
    Pack a dataset of documents into rows of exactly `seq_len` tokens for the context-extension stage.

    Args:
        dataset (`Dataset` or `IterableDataset`): Rows with a `text_field` column.
        tokenizer (`PreTrainedTokenizerBase`): Its EOS joins the documents.
        seq_len (`int`): The row length, the target context of the stage.
        text_field (`str`, *optional*, defaults to `"text"`): The column holding the documents.
        keep_documents_apart (`bool`, *optional*, defaults to `False`): Add `seq_lengths`, the lengths of the
            documents in each row, for TRL's padding-free collator (see `training.data_collator`): positions then
            restart at every document, so no token attends across a document boundary.

    Returns:
        A dataset of the same kind (map-style or streaming) with `input_ids` (and `seq_lengths`).
    """
    from datasets import Dataset, IterableDataset

    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(
            f"The dataset has no {text_field!r} column (it has {columns}); set text_field to the column that holds "
            "the documents."
        )

    def generate():
        yield from _packed_rows((row[text_field] for row in dataset), tokenizer, seq_len, keep_documents_apart)

    if isinstance(dataset, IterableDataset):
        return IterableDataset.from_generator(generate)
    rows = list(generate())
    if not rows:
        total = sum(len(ids) + 1 for ids in tokenizer(list(dataset[text_field]), add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"The data holds {total} tokens, not enough for one row of {seq_len} tokens: add documents or lower "
            "max_length."
        )
    return Dataset.from_list(rows)


def to_prompt_completion(dataset, template: str = DEFAULT_TEMPLATE, use_chat_template: bool = False):
    r"""
    Turn LongQA/LongAlpaca rows into TRL prompt-completion rows (loss on the completion only).

    Accepts rows with `prompt`/`completion` (the LongQA builder's output; kept as they are), `messages`
    (conversational; kept), or `instruction`/`output` (+ optional `input`), formatted with `template` or, with
    `use_chat_template`, as a user/assistant exchange for the tokenizer's chat template.
    """
    columns = set(dataset.column_names or [])
    if {"prompt", "completion"} <= columns or "messages" in columns:
        return dataset
    if not {"instruction", "output"} <= columns:
        raise ValueError(
            f"The LongQA stage needs prompt/completion, messages, or instruction/output columns; the dataset has "
            f"{sorted(columns)}. Rename the columns or build the data with `longlora-hub longqa build`."
        )
    if "{instruction}" not in template:
        raise ValueError(f"prompt_template must contain '{{instruction}}', got {template!r}.")

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        instruction = row["instruction"]
        if row.get("input"):
            instruction = f"{instruction}\n{row['input']}"
        if use_chat_template:
            return {
                "prompt": [{"role": "user", "content": instruction}],
                "completion": [{"role": "assistant", "content": row["output"]}],
            }
        return {"prompt": template.format(instruction=instruction), "completion": row["output"]}

    return dataset.map(convert, remove_columns=sorted(columns))


__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_TEMPLATE",
    "check_json_rows",
    "load_raw_dataset",
    "pack_documents",
    "to_prompt_completion",
]
