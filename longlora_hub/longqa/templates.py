"""Instruction templates that put long documents in front of a question, as in LongAlpaca-12k.

LongAlpaca's long rows wrap a paper (or two, or a book excerpt) between fixed begin/end sentences and ask the
question after it. `PAPER_TEMPLATE` is the paper's single-paper wording exactly; `COMPARE_TEMPLATE` and
`BOOK_TEMPLATE` follow the two-paper and book rows of the published data (whose spacing varies slightly from row to
row, so these fix one spelling).

Templates use the placeholders `{document}` (single document), `{document_1}` / `{document_2}` (two documents),
`{title}` (book or document title) and `{question}`. Only those names are replaced: any other brace in a user's
template file (or in a document) stays as written, so users need not escape braces.
"""

from __future__ import annotations

import re
from pathlib import Path

PAPER_TEMPLATE = (
    "Below is a paper. Memorize the paper and answer my question after the paper.\n"
    " The paper begins. \n{document}\n Now the paper ends. \n{question}"
)
COMPARE_TEMPLATE = (
    "There are two papers. Memorize them and answer my question after the paper.\n"
    " The first paper begins. \n{document_1}\n Now the first paper ends. \n"
    " The second paper begins. \n{document_2}\n Now the second paper ends. \n{question}"
)
BOOK_TEMPLATE = (
    "Below is some paragraphs in the book, {title}. Memorize the content and answer my question after the book.\n"
    "{document}\n Now the material ends. \n{question}"
)
TEMPLATES = {"paper": PAPER_TEMPLATE, "compare": COMPARE_TEMPLATE, "book": BOOK_TEMPLATE}
TASKS = ("qa", "summary", "review", "compare")
PLACEHOLDERS = ("document", "document_1", "document_2", "title", "question")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


def template_fields(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return set(_PLACEHOLDER.findall(template))


def fill_template(template: str, **values: str) -> str:
    r"""
    Replace the known placeholders of `template` in one pass.

    One pass (rather than `str.replace` per name) matters: a document that itself contains `{question}` must not
    have the question substituted into it.

    Args:
        template (`str`): Text with `{document}`, `{document_1}`, `{document_2}`, `{title}`, `{question}`.
        **values (`str`): The value of every placeholder the template uses.

    Raises:
        `KeyError`: A placeholder of the template has no value.
    """
    missing = template_fields(template) - values.keys()
    if missing:
        raise KeyError(f"no value for the template placeholder(s) {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def validate_template(template: str, where: str = "template") -> str:
    """Check that a user template can place a question and at least one document; return it unchanged."""
    fields = template_fields(template)
    if "question" not in fields:
        raise ValueError(f"{where} has no {{question}} placeholder; it would drop the question.")
    if not fields & {"document", "document_1"}:
        raise ValueError(f"{where} has neither {{document}} nor {{document_1}}; it would drop the document.")
    if "document_2" in fields and "document_1" not in fields:
        raise ValueError(f"{where} uses {{document_2}} without {{document_1}}.")
    return template


def load_template(path: str | Path) -> str:
    r"""
    Read a user's template file (UTF-8 text) and check its placeholders.

    A trailing newline is removed, since editors add one that the user did not mean as part of the question.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: the template file is not UTF-8 ({error.reason} at byte {error.start}).") from error
    return validate_template(text.removesuffix("\n"), where=str(path))


def pick_template(num_documents: int, kind: str | None = None) -> str:
    """The paper's template for a row: `compare` for two documents, `book` when asked, else `paper`."""
    if kind is None:
        kind = "compare" if num_documents == 2 else "paper"
    if kind not in TEMPLATES:
        raise ValueError(f"unknown template {kind!r}; choose one of {sorted(TEMPLATES)}")
    if (kind == "compare") != (num_documents == 2):
        raise ValueError(
            f"the {kind!r} template takes {2 if kind == 'compare' else 1} document(s), got {num_documents}"
        )
    return TEMPLATES[kind]


def render_instruction(
    documents: list[str],
    question: str,
    template: str | None = None,
    kind: str | None = None,
    title: str = "",
) -> str:
    r"""
    Build the instruction of one long-document row.

    Args:
        documents (`list[str]`): The document texts, one or two.
        question (`str`): The question or request (answer, summarise, review, compare).
        template (`str`, *optional*): A user template; defaults to the paper's template for the row
            (see `pick_template`).
        kind (`str`, *optional*): `"paper"`, `"book"` or `"compare"`, to choose among the paper's templates.
        title (`str`, *optional*, defaults to `""`): Fills `{title}` (the book template names the book).

    Returns:
        `str`: The instruction text.
    """
    if not 1 <= len(documents) <= 2:
        raise ValueError(f"a row takes one or two documents, got {len(documents)}")
    if template is None:
        template = pick_template(len(documents), kind)
    fields = template_fields(template)
    values = {"question": question, "title": title}
    if len(documents) == 2:
        if not {"document_1", "document_2"} <= fields:
            raise ValueError("the template has no {document_1} and {document_2} placeholders for a two-document row")
        values.update(document_1=documents[0], document_2=documents[1])
    else:
        if "document" in fields:
            values["document"] = documents[0]
        elif "document_2" not in fields:
            values["document_1"] = documents[0]
        else:
            raise ValueError("the template places two documents ({document_1}, {document_2}) but the row has one")
    return fill_template(template, **values)


__all__ = [
    "BOOK_TEMPLATE",
    "COMPARE_TEMPLATE",
    "PAPER_TEMPLATE",
    "TASKS",
    "TEMPLATES",
    "fill_template",
    "load_template",
    "pick_template",
    "render_instruction",
    "template_fields",
    "validate_template",
]
