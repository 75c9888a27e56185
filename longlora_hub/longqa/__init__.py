"""LongQA: build LongAlpaca-style long-context instruction data (LongLoRA's supervised stage) from your documents,
the published LongAlpaca files, short instructions and synthetic retrieval tasks; write it as a `DatasetDict`
in parquet with a dataset card, and push it to the Hub.

- `templates`: the paper's instruction templates and user templates.
- `sources`: streamed readers (documents + QA, LongAlpaca JSON/JSONL, Alpaca) with `file:line` error reports.
- `synthetic`: passkey, key-value and which-document retrieval rows of controlled length and depth.
- `process`: token counts, length buckets, exact and MinHash near-duplicate removal, the seeded split, stats.
- `card`: the dataset card and the length histogram.
- `build`: `build_longqa` (everything above, end to end) and `push_longqa`.

The command line is `longlora-hub longqa build` (`longlora_hub/cli_longqa.py`).
"""

from .build import BuildResult, LongQAConfig, LongQAPushError, build_longqa, format_summary, push_longqa
from .sources import LongQAInputError, ProblemLog
from .synthetic import synthetic_rows
from .templates import BOOK_TEMPLATE, COMPARE_TEMPLATE, PAPER_TEMPLATE, render_instruction

__all__ = [
    "BOOK_TEMPLATE",
    "COMPARE_TEMPLATE",
    "PAPER_TEMPLATE",
    "BuildResult",
    "LongQAConfig",
    "LongQAInputError",
    "LongQAPushError",
    "ProblemLog",
    "build_longqa",
    "format_summary",
    "push_longqa",
    "render_instruction",
    "synthetic_rows",
]
