"""The LongQA builder: templates, every input kind, mixing, dedupe, split, token counts, length filter, stats,
bad input (file:line, skip vs fail), the output on disk, the CLI, and the training recipe reading the result.

Everything runs on the small files in tests/assets/longqa/ and a tiny tokenizer saved to a temporary folder.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from longlora_hub.cli_longqa import longqa_group
from longlora_hub.longqa import (
    LongQAConfig,
    LongQAInputError,
    LongQAPushError,
    ProblemLog,
    build_longqa,
    format_summary,
)
from longlora_hub.longqa.build import check_hub_access, check_output_folder, output_features, push_longqa
from longlora_hub.longqa.card import CARD_TEMPLATE, features_yaml, public_stats
from longlora_hub.longqa.process import (
    Deduplicator,
    count_tokens,
    estimate_jaccard,
    exact_key,
    length_bucket,
    length_buckets,
    minhash_signature,
    short_rows_for_ratio,
    split_indices,
    word_hashes,
)
from longlora_hub.longqa.sources import (
    DocumentStore,
    _JsonArrayReader,
    iter_document_rows,
    iter_json_records,
    iter_json_stream,
    iter_longalpaca_rows,
    longalpaca_task,
)
from longlora_hub.longqa.synthetic import SYNTHETIC_TASKS, synthetic_rows
from longlora_hub.longqa.templates import (
    BOOK_TEMPLATE,
    COMPARE_TEMPLATE,
    PAPER_TEMPLATE,
    fill_template,
    load_template,
    render_instruction,
    validate_template,
)
from longlora_hub.testing import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets" / "longqa"
DOCUMENTS = ASSETS / "documents"
PROMPT_TEMPLATE = "[INST]{instruction}[/INST]"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer_dir):
    """One build that mixes every input kind, broken rows included, skipped and counted."""
    output = tmp_path_factory.mktemp("mixed") / "out"
    config = LongQAConfig(
        output=str(output),
        documents=str(DOCUMENTS),
        qa=str(ASSETS / "qa.jsonl"),
        longalpaca=[str(ASSETS / name) for name in ("longalpaca.json", "longalpaca_broken.json", "longalpaca.jsonl")],
        short=str(ASSETS / "alpaca_short.json"),
        short_ratio=0.25,
        synthetic=12,
        synthetic_lengths=[512, 1024],
        tokenizer=tokenizer_dir,
        max_length=1350,
        on_error="skip",
        validation_size=0.1,
        save_arrow=True,
    )
    lines = []
    result = build_longqa(config, echo=lines.append)
    return result, lines


def _rows(output: Path) -> dict[str, list[dict]]:
    """The rows of each split, from its parquet shards in order."""
    rows: dict[str, list[dict]] = {}
    for path in sorted((output / "data").glob("*.parquet")):
        rows.setdefault(path.name.split("-")[0], []).extend(pq.read_table(path).to_pylist())
    return rows


# ---------------------------------------------------------------------------------------------- templates


def test_paper_templates_exact_text():
    assert PAPER_TEMPLATE == (
        "Below is a paper. Memorize the paper and answer my question after the paper.\n The paper begins. \n"
        "{document}\n Now the paper ends. \n{question}"
    )
    assert render_instruction(["DOC"], "Q?") == (
        "Below is a paper. Memorize the paper and answer my question after the paper.\n The paper begins. \nDOC\n"
        " Now the paper ends. \nQ?"
    )
    two = render_instruction(["ONE", "TWO"], "Compare them.")
    assert two == fill_template(COMPARE_TEMPLATE, document_1="ONE", document_2="TWO", question="Compare them.")
    assert two.startswith("There are two papers.") and two.index("ONE") < two.index("TWO") < two.index("Compare")
    book = render_instruction(["TEXT"], "Who?", kind="book", title="Moby Dick")
    assert book == fill_template(BOOK_TEMPLATE, title="Moby Dick", document="TEXT", question="Who?")
    assert book.startswith("Below is some paragraphs in the book, Moby Dick.")
    with pytest.raises(ValueError, match="takes 2"):
        render_instruction(["ONE"], "Q", kind="compare")


def test_placeholders_filled_in_one_pass_and_other_braces_kept():
    # a document that contains "{question}" must not receive the question
    text = fill_template("{document} | {question} | {other}", document="see {question}", question="Q")
    assert text == "see {question} | Q | {other}"
    template = load_template(ASSETS / "template.txt")
    assert render_instruction(["D"], "Q") != render_instruction(["D"], "Q", template=template)
    assert render_instruction(["D"], "Q", template=template) == (
        "Read the text below and answer the question. Keep {braces} that are not placeholders.\n<<<\nD\n>>>\n"
        "Question: Q"
    )
    with pytest.raises(ValueError, match="question"):
        validate_template("{document} only")
    with pytest.raises(ValueError, match="document"):
        validate_template("{question} only")


# ------------------------------------------------------------------------------------------------ sources


def test_documents_and_qa_rows_with_problems_counted():
    log = ProblemLog("skip")
    rows = list(iter_document_rows(DocumentStore(DOCUMENTS, log), ASSETS / "qa.jsonl", log))
    lines = [int(row["where"].rsplit(":", 1)[1]) for row in rows]
    assert lines == [1, 2, 3, 4, 5, 10, 11, 12]
    assert [row["task"] for row in rows[:5]] == ["qa", "review", "summary", "compare", "qa"]
    attention = (DOCUMENTS / "attention.txt").read_text().strip()
    assert rows[0]["instruction"] == render_instruction(
        [attention], "What happens to perplexity with and without the shift?"
    )
    assert rows[3]["instruction"].startswith("There are two papers.")
    assert rows[4]["instruction"].startswith("Below is some paragraphs in the book, The Northern Light.")
    assert "{question}" in rows[7]["instruction"] and "{like this}" in rows[7]["instruction"]

    found = {(p.kind, p.where.replace(str(ASSETS) + "/", "")) for p in log.examples}
    assert found == {
        ("missing_document", "qa.jsonl:6"),
        ("empty_answer", "qa.jsonl:7"),
        ("malformed_json", "qa.jsonl:8"),
        ("not_utf8", "documents/latin1.txt:3"),
        ("unreadable_document", "qa.jsonl:9"),
        ("bad_row", "qa.jsonl:13"),
    }
    assert log.total == 6 and log.to_dict()["by_source"]["documents"]["missing_document"] == 1


def test_fail_stops_at_the_first_bad_line_with_file_and_line():
    log = ProblemLog("fail")
    with pytest.raises(LongQAInputError, match=r"qa\.jsonl:6: document 'ghost' is not in .*--on-error skip"):
        list(iter_document_rows(DocumentStore(DOCUMENTS, log), ASSETS / "qa.jsonl", log))
    with pytest.raises(LongQAInputError, match=r"longalpaca\.jsonl:2: invalid JSON"):
        list(iter_longalpaca_rows(ASSETS / "longalpaca.jsonl", ProblemLog("fail")))


def test_user_template_for_document_rows(tmp_path):
    log = ProblemLog("skip")
    rows = list(iter_document_rows(DocumentStore(DOCUMENTS, log), ASSETS / "qa.jsonl", log, ASSETS / "template.txt"))
    assert (
        rows[0]["instruction"].startswith("Read the text below") and "Question: What happens" in rows[0]["instruction"]
    )
    # the compare row cannot be placed by a one-document template: reported, not dropped silently
    assert any(p.kind == "bad_row" and p.where.endswith("qa.jsonl:4") for p in log.examples)


def test_longalpaca_json_array_streamed_with_line_numbers():
    log = ProblemLog("skip")
    rows = list(iter_longalpaca_rows(ASSETS / "longalpaca.json", log))
    want = json.loads((ASSETS / "longalpaca.json").read_text(encoding="utf-8"))
    assert [row["completion"] for row in rows] == [row["output"] for row in want]
    assert rows[5]["instruction"] == "Translate the sentence into French.\nThe café opens at six."  # input joined
    assert [row["task"] for row in rows] == ["qa", "summary", "review", "compare", "qa", "short", "short"]
    assert [row["where"].rsplit(":", 1)[1] for row in rows] == ["2", "7", "11", "15", "19", "23", "28"]
    assert log.total == 0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1 << 20])
def test_json_array_reader_any_chunk_size(chunk_size):
    data = (ASSETS / "longalpaca.json").read_bytes()
    got = [json.loads(text) for _, text, _ in _JsonArrayReader(io.BytesIO(data), chunk_size=chunk_size)]
    assert got == json.loads(data)


def test_malformed_records_reported_and_skipped(tmp_path):
    log = ProblemLog("skip")
    broken = list(iter_longalpaca_rows(ASSETS / "longalpaca_broken.json", log))
    assert [row["where"].rsplit(":", 1)[1] for row in broken] == ["2", "5"]  # the element after the bad one survives
    jsonl = list(iter_longalpaca_rows(ASSETS / "longalpaca.jsonl", log))
    assert [row["where"].rsplit(":", 1)[1] for row in jsonl] == ["1", "3", "7"]
    reasons = {p.where.rsplit("/", 1)[1]: (p.kind, p.reason) for p in log.examples}
    assert reasons == {
        "longalpaca_broken.json:3": ("malformed_json", "invalid JSON: Expecting value (column 45)"),
        "longalpaca.jsonl:2": ("malformed_json", "invalid JSON: Expecting ',' delimiter (column 1)"),
        "longalpaca.jsonl:4": ("missing_field", "no 'output' field"),
        "longalpaca.jsonl:5": ("not_utf8", "not UTF-8 (byte 0xE9 at byte offset 20)"),
        "longalpaca.jsonl:6": ("missing_field", "field 'output' must be a string, got int"),
    }
    # a truncated array and a non-UTF-8 element of an array
    truncated = tmp_path / "cut.json"
    truncated.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "out')
    bad_bytes = tmp_path / "latin.json"
    bad_bytes.write_bytes(b'[{"instruction": "caf\xe9", "output": "x"},\n {"instruction": "ok", "output": "y"}]')
    log = ProblemLog("skip")
    assert [r for _, r in iter_json_records(truncated, log, "longalpaca")] == [{"instruction": "a", "output": "b"}]
    assert [r for _, r in iter_json_records(bad_bytes, log, "longalpaca")] == [{"instruction": "ok", "output": "y"}]
    assert [(p.kind, p.where.rsplit("/", 1)[1]) for p in log.examples] == [
        ("malformed_json", "cut.json:3"),
        ("not_utf8", "latin.json:1"),
    ]


class _HttpFile:
    """Like a remote file of HfFileSystem: read(n) only, no peek, no line iteration."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_any_binary_stream_is_read_like_a_file():
    array = (ASSETS / "longalpaca.json").read_bytes()
    lines = (ASSETS / "longalpaca.jsonl").read_bytes()
    log = ProblemLog("skip")
    assert [r for _, r in iter_json_stream(_HttpFile(array), "x.json", log, "longalpaca")] == json.loads(array)
    got = [where for where, _ in iter_json_stream(_HttpFile(lines), "x.jsonl", log, "longalpaca", jsonl=True)]
    assert got == ["x.jsonl:1", "x.jsonl:3", "x.jsonl:4", "x.jsonl:6", "x.jsonl:7"]
    assert [p.where for p in log.examples] == ["x.jsonl:2", "x.jsonl:5"]


def test_hub_json_files_streamed_with_the_same_reader(monkeypatch):
    import huggingface_hub

    files = {"README.md": b"", "LongAlpaca-12k.json": (ASSETS / "longalpaca.json").read_bytes()}
    opened = []

    def open_file(self, path, mode="rb", block_size=None):
        opened.append(path)
        return _HttpFile(files[path.rsplit("/", 1)[1]])

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, repo_type=None: list(files))
    monkeypatch.setattr(huggingface_hub.HfFileSystem, "open", open_file)
    rows = list(iter_longalpaca_rows("someone/longalpaca", ProblemLog()))
    assert opened == ["datasets/someone/longalpaca/LongAlpaca-12k.json"]
    assert len(rows) == 7 and rows[0]["where"] == "someone/longalpaca/LongAlpaca-12k.json:2"

    def offline(self, repo_id, repo_type=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    with pytest.raises(LongQAInputError, match="could not stream the Hub dataset 'someone/longalpaca'"):
        list(iter_longalpaca_rows("someone/longalpaca", ProblemLog()))
    with pytest.raises(FileNotFoundError, match="neither a file"):
        list(iter_longalpaca_rows("no/such/file.json", ProblemLog()))


def test_hub_longalpaca_streamed_from_a_real_server(hub):
    """The same, with the real clients against the local Hub server: the file is streamed through HfFileSystem
    (ranged reads), row for row as from the local file."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("me/longalpaca", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=ASSETS / "longalpaca.json",
        path_in_repo="LongAlpaca-12k.json",
        repo_id="me/longalpaca",
        repo_type="dataset",
    )
    remote = list(iter_longalpaca_rows("me/longalpaca", ProblemLog()))
    local = list(iter_longalpaca_rows(str(ASSETS / "longalpaca.json"), ProblemLog()))
    assert len(remote) == len(local) == 7
    assert [{k: v for k, v in row.items() if k != "where"} for row in remote] == [
        {k: v for k, v in row.items() if k != "where"} for row in local
    ]
    assert remote[0]["where"] == "me/longalpaca/LongAlpaca-12k.json:2"
    assert hub.server.calls("GET", r"/datasets/me/longalpaca/resolve/")


def test_longalpaca_task_inference():
    assert longalpaca_task(render_instruction(["D"], "What is new here?")) == "qa"
    assert longalpaca_task(render_instruction(["D"], "Please summarize the paper.")) == "summary"
    assert longalpaca_task(render_instruction(["D"], "Write a review of this paper.")) == "review"
    assert longalpaca_task(render_instruction(["A", "B"], "Which is better?")) == "compare"
    assert longalpaca_task("Name a colour.") == "short"


def _pdf_with_text(text: str) -> bytes:
    """A minimal one-page PDF whose page shows `text` (Helvetica), with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_documents_read_and_damaged_ones_counted(tmp_path):
    pytest.importorskip("pypdf")
    (tmp_path / "paper.pdf").write_bytes(_pdf_with_text("The pass key is 4821."))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    log = ProblemLog("skip")
    store = DocumentStore(tmp_path, log)
    assert "The pass key is 4821." in store.get(store.resolve("paper.pdf"))
    assert store.get(store.resolve("broken.pdf")) is None
    assert log.counts[("documents", "unreadable_pdf")] == 1
    with pytest.raises(LongQAInputError, match="broken.pdf"):
        DocumentStore(tmp_path, ProblemLog("fail")).get("broken")


def test_pdf_needs_pypdf(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if the optional dependency were not installed
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.raises(ImportError, match=r"pypdf.*longlora-hub\[pdf\]"):
        DocumentStore(tmp_path, ProblemLog())


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_lengths_depths_and_determinism(tokenizer):
    rows = list(synthetic_rows(30, tokenizer, lengths=(512, 1024), prompt_template=PROMPT_TEMPLATE, seed=3))
    assert [row["task"] for row in rows[:3]] == list(SYNTHETIC_TASKS)
    for row in rows:
        measured = count_tokens(
            tokenizer, [PROMPT_TEMPLATE.replace("{instruction}", row["instruction"])], [row["completion"]]
        )
        assert measured == [row["num_tokens"]]
        assert row["target_tokens"] - 40 <= row["num_tokens"] <= row["target_tokens"]
    # the asked-for fact is in the text, at about the requested depth
    passkeys = [row for row in rows if row["task"] == "passkey"]
    for row in passkeys:
        key = row["completion"].split()[-1].rstrip(".")
        assert f"The pass key is {key}." in row["instruction"]
    depths = [row["depth"] for row in passkeys if row["target_tokens"] == 1024]
    assert depths == sorted(depths) and depths[0] == 0.0 and depths[-1] == 1.0
    assert all(
        abs(row["depth"] - want) < 0.12 for row, want in zip(passkeys[::2], (0, 0.25, 0.5, 0.75, 1.0), strict=True)
    )
    which = [row for row in rows if row["task"] == "which_document"]
    for row in which:
        number = row["completion"].split()[1]
        fact = row["completion"].split(" says that ")[1]
        assert row["instruction"].index(f"Document {number}:") < row["instruction"].index(fact)
    again = list(synthetic_rows(30, tokenizer, lengths=(512, 1024), prompt_template=PROMPT_TEMPLATE, seed=3))
    assert again == rows
    other = list(synthetic_rows(3, tokenizer, lengths=(512,), seed=4, corpus="One fact. Two facts here! Three?"))
    assert "Two facts here!" in other[0]["instruction"] and other[0]["completion"] != rows[0]["completion"]


# ------------------------------------------------------------------------------------------------ processing


def test_token_counts_match_the_training_stage(tokenizer):
    prompts, completions = ["[INST]hello there[/INST]", "[INST]x[/INST]"], [" The pass key is 42.", "y"]
    want = [len(tokenizer(p + c)["input_ids"]) + 1 for p, c in zip(prompts, completions, strict=True)]
    assert count_tokens(tokenizer, prompts, completions) == want
    assert count_tokens(None, ["a b c"], ["d e"]) == [5]


def test_length_buckets():
    assert [length_bucket(n) for n in (1, 1024, 1025, 16384, 16385, 200_000)] == [
        "0-1k",
        "0-1k",
        "1k-2k",
        "8k-16k",
        "16k-32k",
        ">128k",
    ]
    counts = length_buckets([10, 3000, 3000, 500_000])
    assert counts["0-1k"] == 1 and counts["2k-4k"] == 2 and counts[">128k"] == 1 and sum(counts.values()) == 4


def test_minhash_words_and_determinism():
    # the same word hashes alike wherever it is, whatever its case and punctuation
    hashes = word_hashes("Paper, paper! PAPER attention")
    assert hashes[0] == hashes[1] == hashes[2] != hashes[3]
    text = (DOCUMENTS / "attention.txt").read_text()
    signature = minhash_signature(text)
    code = (
        "import sys; from longlora_hub.longqa.process import minhash_signature; "
        "print(minhash_signature(open(sys.argv[1]).read()).tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(DOCUMENTS / "attention.txt")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(out.stdout) == signature.tolist()  # same in another process, whatever the hash seed
    assert estimate_jaccard(signature, minhash_signature(text.replace("quarter", "fourth", 1))) > 0.9
    assert estimate_jaccard(signature, minhash_signature((DOCUMENTS / "lora.md").read_text())) < 0.1


def test_dedupe_exact_near_and_same_document_other_question():
    document = (DOCUMENTS / "attention.txt").read_text()

    def row(question, answer):
        prompt = render_instruction([document], question)
        return exact_key(prompt, answer), minhash_signature(prompt), minhash_signature(answer)

    dedupe = Deduplicator(0.8)
    answer = "Without the shift perplexity rises from 8.1 to 8.9; with it, only to 8.3."
    assert dedupe.add(0, *row("What happens to perplexity with and without the shift?", answer)) is None
    assert dedupe.add(1, *row("What happens to perplexity with and without the shift?", answer)) == ("exact", 0)
    near = row("What happens to the perplexity with and without the shift?", answer.replace(";", " -"))
    assert dedupe.add(2, *near) == ("near", 0)
    # same paper, another question and answer: not a duplicate, even though the prompts are nearly the same
    other = row("What does the shift connect?", "It connects neighbouring groups of tokens across the sequence.")
    assert dedupe.add(3, *other) is None
    assert Deduplicator(None).add(4, *near) is None  # exact-only mode keeps near duplicates


def test_split_is_seeded():
    train, validation = split_indices(100, 0.1, seed=0)
    assert len(validation) == 10 and sorted(train + validation) == list(range(100))
    assert split_indices(100, 0.1, seed=0) == (train, validation)
    assert set(split_indices(100, 0.1, seed=1)[1]) != set(validation)
    assert split_indices(5, 0.01, seed=0)[1] and split_indices(1, 0.5, seed=0) == ([0], [])
    assert split_indices(10, 0.0, seed=0)[1] == []


def test_short_ratio_arithmetic():
    assert short_rows_for_ratio(9000, 0.25) == 3000
    assert short_rows_for_ratio(26, 0.25) == 9 and short_rows_for_ratio(10, 0) == 0


# ------------------------------------------------------------------------------------------------ the build


def test_mixed_build_rows_mix_and_stats(mixed):
    result, lines = mixed
    stats = result.stats
    rows = _rows(result.output)
    everything = rows["train"] + rows["validation"]
    assert stats["splits"] == {"train": len(rows["train"]), "validation": len(rows["validation"])}
    assert len(rows["validation"]) == round(0.1 * len(everything))
    assert json.loads((result.output / "stats.json").read_text()) == stats

    # every input kind is there, with the expected tasks
    sources = Counter(row["source"] for row in everything)
    assert set(sources) == {"documents", "longalpaca", "short", "synthetic"}
    assert sources["synthetic"] == 12
    assert {row["task"] for row in everything} >= {"qa", "summary", "review", "compare", "short", "passkey"}
    assert {source: summary["rows"] for source, summary in stats["rows"]["by_source"].items()} == dict(sources)
    assert sum(stats["rows"]["length_buckets"].values()) == len(everything)

    # mixing: short rows are 25% of the output (up to rounding)
    long_rows = len(everything) - sources["short"]
    assert sources["short"] == short_rows_for_ratio(long_rows, 0.25) == stats["mix"]["short_rows"]
    assert abs(sources["short"] / len(everything) - 0.25) <= 1 / len(everything)
    assert stats["dropped"]["short_unused"] == {"short": 20 - sources["short"]}

    # dedupe: the repeated QA rows and the LongAlpaca rows present in two files
    assert stats["dropped"]["exact_duplicate"] == {"documents": 1, "longalpaca": 2}
    assert stats["dropped"]["near_duplicate"] == {"documents": 1}
    # length filter: the two document rows over 1350 tokens (the review and the two-paper comparison)
    assert stats["dropped"]["too_long"] == {"documents": 2}
    assert max(row["num_tokens"] for row in everything) <= 1350

    # problems: counted by source and kind, and reported with file:line
    assert stats["problems"]["by_source"] == {
        "documents": {
            "bad_row": 1,
            "empty_answer": 1,
            "malformed_json": 1,
            "missing_document": 1,
            "not_utf8": 1,
            "unreadable_document": 1,
        },
        "longalpaca": {"malformed_json": 2, "missing_field": 2, "not_utf8": 1},
    }
    assert any(example["where"].endswith("qa.jsonl:6") for example in stats["problems"]["examples"])
    summary = format_summary(stats, result.output)  # what the CLI prints
    assert "skipped bad input: 11" in summary and "qa.jsonl:6: document 'ghost'" in summary
    assert "dropped (too_long): documents 2" in summary and any("writing" in line for line in lines)


def test_mixed_build_columns_and_token_counts(mixed, tokenizer):
    result, _ = mixed
    rows = _rows(result.output)["train"]
    assert list(rows[0]) == ["prompt", "completion", "messages", "source", "task", "num_tokens"]
    for row in rows:
        assert row["prompt"].startswith("[INST]") and row["prompt"].endswith("[/INST]")
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"][len("[INST]") : -len("[/INST]")]}
        assert assistant == {"role": "assistant", "content": row["completion"]}
        assert row["num_tokens"] == len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1


def test_output_loads_every_way_alike(mixed):
    from datasets import load_dataset, load_from_disk

    result, _ = mixed
    by_dir = load_dataset("parquet", data_dir=str(result.output / "data"))
    by_card = load_dataset(str(result.output))  # the README's `configs` map the splits
    from_disk = load_from_disk(str(result.output / "arrow"))
    assert set(by_dir) == set(by_card) == set(from_disk) == {"train", "validation"}
    for split in by_dir:
        assert by_dir[split].features == output_features()
        assert by_dir[split].to_list() == by_card[split].to_list() == from_disk[split].to_list()
        assert by_dir[split].to_list() == result.load()[split].to_list() == _rows(result.output)[split]


def test_card_and_histogram(mixed):
    result, _ = mixed
    card = (result.output / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "validation", "path": "data/validation-*"},
            ],
        }
    ]
    assert metadata["license"] == "cc-by-nc-4.0"  # LongAlpaca rows: its license, inferred
    assert metadata["dataset_info"]["features"] == features_yaml(output_features())
    # the sizes datasets needs to take the card's splits (without num_bytes it ignores them, with a warning)
    info = metadata["dataset_info"]
    assert [(split["name"], split["num_examples"]) for split in info["splits"]] == list(result.stats["splits"].items())
    assert all(split["num_bytes"] > 0 for split in info["splits"])
    assert info["download_size"] == sum(path.stat().st_size for path in (result.output / "data").glob("*.parquet"))
    assert info["dataset_size"] == sum(split["num_bytes"] for split in info["splits"])
    assert {
        "name": "messages",
        "list": [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}],
    } in (metadata["dataset_info"]["features"])
    assert "| documents | qa |" in body
    assert "`qa.jsonl:6`: document 'ghost'" in body and str(ROOT) not in card  # no local folders in a public card
    if importlib.util.find_spec("matplotlib") is None:  # an optional dependency: the card says so instead
        assert "No histogram: matplotlib was not installed" in body
        assert not (result.output / "length_histogram.png").exists()
    else:
        assert "![Length histogram](length_histogram.png)" in body
        assert (result.output / "length_histogram.png").read_bytes()[:4] == b"\x89PNG"
    published = json.dumps(public_stats(result.stats))  # the stats.json a push uploads
    assert str(ROOT) not in published and str(result.output.parent) not in published
    assert json.loads(published)["rows"] == result.stats["rows"]


def test_card_template_file_matches_the_default():
    assert (ROOT / "datasets" / "longqa" / "README.md").read_text(encoding="utf-8") == CARD_TEMPLATE
    assert not (ROOT / "datasets" / "__init__.py").exists()  # it would shadow the datasets library


def test_training_recipe_reads_the_output(mixed, tokenizer):
    from longlora_hub.data import load_raw_dataset, to_prompt_completion
    from longlora_hub.training import drop_too_long

    result, _ = mixed
    dataset = load_raw_dataset(data_files=[str(result.output / "data" / "train-00000-of-00001.parquet")])
    assert to_prompt_completion(dataset) is dataset
    assert len(drop_too_long(dataset, tokenizer, 1350)) == len(dataset)  # the same length rule as the build


def test_split_determinism_across_builds(tmp_path, tokenizer_dir):
    def build(name, seed):
        config = LongQAConfig(
            output=str(tmp_path / name),
            synthetic=30,
            synthetic_lengths=[512],
            tokenizer=tokenizer_dir,
            seed=seed,
            validation_size=0.2,
        )
        build_longqa(config, echo=lambda line: None)
        return _rows(tmp_path / name)

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first == again
    assert {row["prompt"] for row in first["validation"]} != {row["prompt"] for row in other["validation"]}


def test_documents_longer_than_max_length_reported(tmp_path, tokenizer_dir):
    config = LongQAConfig(
        output=str(tmp_path / "out"),
        documents=str(DOCUMENTS),
        qa=str(ASSETS / "qa.jsonl"),
        tokenizer=tokenizer_dir,
        max_length=600,
        on_error="skip",
        validation_size=0,
    )
    result = build_longqa(config, echo=lambda line: None)
    stats = result.stats
    assert "- `attention`: " in (result.output / "README.md").read_text()
    # the documents alone (without template and question) above 600 tokens; their rows are dropped as too long
    assert {d["document"] for d in stats["documents_too_long"]} == {"attention", "lora"}
    assert stats["rows"]["all"]["rows"] == 1 and stats["dropped"]["too_long"]["documents"] == 7


def test_a_build_logs_its_steps_and_shows_progress_bars_huggingface_hub_turns_off(tmp_path, tokenizer_dir, capsys):
    """Reading and writing rows show bars (datasets' token count too); with huggingface_hub's bars off, datasets'
    are off as well, and the steps go to this package's logger on stderr, or to `echo` when one is given."""
    from datasets.utils import are_progress_bars_disabled
    from huggingface_hub.utils import disable_progress_bars

    def build(name, **kwargs):
        config = LongQAConfig(
            output=str(tmp_path / name), synthetic=12, synthetic_lengths=[512], tokenizer=tokenizer_dir
        )
        return build_longqa(config, **kwargs)

    build("shown")
    said = capsys.readouterr()
    assert said.out == "" and "[longlora-hub] reading the long inputs" in said.err
    assert "[longlora-hub] writing 11 train and 1 validation rows" in said.err
    for bar in ("reading long inputs: 12row", "writing train: 100%|", "Counting tokens (long)"):
        assert bar in said.err, bar
    with disable_progress_bars():
        build("hidden")
    hidden = capsys.readouterr().err
    assert "%|" not in hidden and "row/s" not in hidden and "Counting tokens" not in hidden
    assert "[longlora-hub] reading the long inputs" in hidden and not are_progress_bars_disabled()
    lines = []
    with disable_progress_bars():
        build("echoed", echo=lines.append)
    assert capsys.readouterr().err == "" and lines[0] == "[longqa] reading the long inputs"


def test_output_folder_never_overwritten(tmp_path, tokenizer_dir):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        build_longqa(LongQAConfig(output=str(taken), synthetic=3, tokenizer=tokenizer_dir))
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_output_folder(tmp_path / "file")
    # a failing build leaves nothing behind, not even its staging folder
    with pytest.raises(LongQAInputError):
        build_longqa(LongQAConfig(output=str(tmp_path / "new"), longalpaca=[str(ASSETS / "longalpaca.jsonl")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]


def test_inconsistent_options_refused(tmp_path):
    for options, message in [
        ({}, "Nothing to build"),
        ({"documents": str(DOCUMENTS)}, "go together"),
        ({"synthetic": 3, "short_ratio": 0.2}, "needs --short"),
        ({"synthetic": 3, "max_length": 100}, "give --tokenizer"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_longqa(LongQAConfig(output=str(tmp_path / "x"), **options))


# ------------------------------------------------------------------------------------------------ CLI and Hub


def test_cli_build_end_to_end(tmp_path, tokenizer_dir):
    output = tmp_path / "out"
    runner = CliRunner()
    args = ["build", "--output", str(output), "--synthetic", "20", "--tokenizer", tokenizer_dir]
    result = runner.invoke(longqa_group, args)
    assert result.exit_code == 0, result.output
    assert "synthetic: 20 rows" in result.output and "bad input: none" in result.output
    rows = _rows(output)
    assert len(rows["train"]) + len(rows["validation"]) == 20
    assert {row["task"] for row in rows["train"]} == set(SYNTHETIC_TASKS)
    assert {"README.md", "data", "stats.json"} <= {p.name for p in output.iterdir()}

    again = runner.invoke(longqa_group, args)
    assert again.exit_code == 1 and "not empty" in again.output
    private = runner.invoke(longqa_group, ["build", "--output", str(tmp_path / "p"), "--synthetic", "2", "--private"])
    assert private.exit_code == 2 and "--private only applies with --push-to-hub" in private.output
    failing = runner.invoke(
        longqa_group, ["build", "-o", str(tmp_path / "f"), "--longalpaca", str(ASSETS / "longalpaca.jsonl")]
    )
    assert failing.exit_code == 1 and "longalpaca.jsonl:2: invalid JSON" in failing.output


def test_build_script_is_a_thin_wrapper():
    result = subprocess.run(
        [sys.executable, str(ROOT / "datasets" / "longqa" / "build.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--longalpaca" in result.stdout and "--push-to-hub" in result.stdout


def test_push_guards(tmp_path, monkeypatch, tokenizer_dir):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(LongQAPushError, match="No Hugging Face token"):
        check_hub_access()
    with pytest.raises(LongQAPushError, match="Cannot reach the Hub at http://127.0.0.1:9"):
        check_hub_access(token="hf_not_a_real_token", endpoint="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="not a LongQA build"):
        push_longqa(tmp_path, "someone/longqa", token="hf_x", endpoint="http://127.0.0.1:9")
    # the CLI checks the token before building: nothing is built
    args = ["build", "-o", str(tmp_path / "out"), "--synthetic", "3", "--tokenizer", tokenizer_dir]
    result = CliRunner().invoke(longqa_group, [*args, "--push-to-hub", "someone/longqa"])
    assert result.exit_code == 1 and "No Hugging Face token" in result.output
    assert not (tmp_path / "out").exists()


def test_push_round_trip(tmp_path, tokenizer_dir, hub):
    """Against the local Hub-compatible server (tests/hub_server.py): build with --synthetic and --push-to-hub
    --private, then `load_dataset(repo_id)` gives back exactly the rows and features of the local parquet files for
    both splits; the push is ONE commit holding the parquet files exactly as written (no re-encoding), the card (the
    local `configs`, the usage snippet naming the repo), stats.json and the histogram; a second push of another
    build updates it in one more commit, an unchanged one makes none; a read-only token gets the 403 message."""
    from datasets import load_dataset

    output = tmp_path / "out"
    args = ["build", "-o", str(output), "--synthetic", "20", "--tokenizer", tokenizer_dir, "--seed", "1"]
    result = CliRunner().invoke(longqa_group, [*args, "--push-to-hub", "me/longqa", "--private"])
    assert result.exit_code == 0, result.output
    repo = hub.server.repo("me/longqa", repo_type="dataset")
    assert repo.private
    assert [commit.message for commit in repo.commits] == ["initial commit", "LongQA dataset (longlora-hub)"]
    files = repo.files("main")
    shards = ["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet"]
    assert set(files) == {".gitattributes", "README.md", "stats.json", "length_histogram.png", *shards}
    for name in shards:
        assert files[name] == (output / name).read_bytes()  # the build's own files, not a re-encoded copy
    card = files["README.md"].decode()
    assert "configs:" in card and "me/longqa" in card
    assert json.loads(files["stats.json"]) == json.loads(
        json.dumps(public_stats(json.loads((output / "stats.json").read_text())))
    )
    pulled = load_dataset("me/longqa")
    local = _rows(output)
    assert set(pulled) == set(local) == {"train", "validation"}
    for split, rows in local.items():
        assert pulled[split].to_list() == rows
    assert pulled["train"].features == output_features()

    # another build pushed to the same repository replaces its rows, in one commit
    other = tmp_path / "other"
    assert CliRunner().invoke(longqa_group, ["build", "-o", str(other), "--synthetic", "12", "--tokenizer",
                                             tokenizer_dir, "--seed", "2"]).exit_code == 0  # fmt: skip
    assert push_longqa(other, "me/longqa").endswith("/datasets/me/longqa")
    assert len(hub.server.repo("me/longqa", repo_type="dataset").commits) == 3
    again = load_dataset("me/longqa", download_mode="force_redownload")
    assert sum(len(split) for split in again.values()) == 12
    push_longqa(other, "me/longqa")  # unchanged: nothing to commit
    assert len(hub.server.repo("me/longqa", repo_type="dataset").commits) == 3
    with pytest.raises(LongQAPushError, match=r"\(403\)"):
        push_longqa(other, "me/longqa", token=hub.read_token)


def test_shards_are_named_like_datasets_and_the_hub_mirrors_the_build(tmp_path, tokenizer_dir, hub, monkeypatch):
    """A split over the shard size is written as several `train-0000i-of-0000n.parquet` files; a push uploads them
    as they are and deletes, in the same commit, the shards an earlier build had and this one does not."""
    from datasets import load_dataset
    from longlora_hub.longqa import build

    def synthetic_build(name: str, rows: int) -> Path:
        config = LongQAConfig(output=str(tmp_path / name), synthetic=rows, tokenizer=tokenizer_dir,
                              synthetic_lengths=[512], validation_size=0.1)  # fmt: skip
        return build_longqa(config, echo=lambda line: None).output

    monkeypatch.setattr(build, "WRITE_BATCH_ROWS", 4)
    monkeypatch.setattr(build, "MAX_SHARD_BYTES", 1)  # every batch of 4 rows in a shard of its own
    sharded = synthetic_build("sharded", 20)
    names = sorted(path.name for path in (sharded / "data").iterdir())
    assert names == [f"train-0000{i}-of-00005.parquet" for i in range(5)] + ["validation-00000-of-00001.parquet"]
    push_longqa(sharded, "me/sharded")
    repo = hub.server.repo("me/sharded", repo_type="dataset")
    assert len(repo.commits) == 2
    assert {name for name in repo.files("main") if name.startswith("data/")} == {f"data/{name}" for name in names}
    pulled = load_dataset("me/sharded")
    for split, rows in _rows(sharded).items():
        assert pulled[split].to_list() == rows

    monkeypatch.setattr(build, "MAX_SHARD_BYTES", 10**9)
    single = synthetic_build("single", 10)
    push_longqa(single, "me/sharded")
    repo = hub.server.repo("me/sharded", repo_type="dataset")
    assert len(repo.commits) == 3
    assert {name for name in repo.files("main") if name.startswith("data/")} == {
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    }
    pulled = load_dataset("me/sharded", download_mode="force_redownload")
    assert pulled["train"].to_list() == pq.read_table(single / "data" / "train-00000-of-00001.parquet").to_pylist()


def test_histogram_leaves_the_callers_matplotlib_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    from longlora_hub.longqa.card import save_length_histogram

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert save_length_histogram({"train": [10, 200, 3000], "validation": [50]}, tmp_path / "h.png", 4096)
        assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
