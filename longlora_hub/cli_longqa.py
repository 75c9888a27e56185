"""`longlora-hub longqa ...`: build LongQA / LongAlpaca-style data and push it to the Hub.

Only click is imported here; datasets, transformers and the builder load inside the commands, so that
`longlora-hub --help` stays instant.
"""

from __future__ import annotations

import click


@click.group("longqa", context_settings={"help_option_names": ["-h", "--help"]})
def longqa_group() -> None:
    """Build long-context instruction data for LongLoRA's supervised stage (LongQA / LongAlpaca format)."""


@longqa_group.command("build")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="New or empty output folder.")
@click.option(
    "--longalpaca",
    multiple=True,
    metavar="FILE_OR_REPO",
    help="LongAlpaca-format JSON/JSONL file, folder or Hub id (e.g. Yukang/LongAlpaca-12k), streamed. Repeatable.",
)
@click.option("--documents", type=click.Path(exists=True, file_okay=False), help="Folder of .txt/.md (.pdf) documents.")
@click.option("--qa", type=click.Path(exists=True, dir_okay=False), help="QA rows (JSONL) over --documents.")
@click.option(
    "--template",
    type=click.Path(exists=True, dir_okay=False),
    help="Your own template file for the --documents rows ({document}, {document_1}, {document_2}, {title}, "
    "{question}); the paper's templates by default.",
)
@click.option("--short", metavar="FILE_OR_REPO", help="Short Alpaca-format instruction data to mix in.")
@click.option(
    "--short-ratio",
    type=click.FloatRange(0, 1, max_open=True),
    help="Fraction of the output that is short rows (0.25 = the paper's 9k:3k). Default: all --short rows.",
)
@click.option("--synthetic", type=click.IntRange(min=0), default=0, show_default=True, help="Synthetic retrieval rows.")
@click.option(
    "--synthetic-length",
    "synthetic_lengths",
    type=click.IntRange(min=1),
    multiple=True,
    help="Target length of synthetic rows, in tokens. Repeatable. Default: max-length/2 and max-length (or 1024, "
    "2048).",
)
@click.option(
    "--synthetic-corpus", type=click.Path(exists=True, dir_okay=False), help="Text file to fill synthetic rows with."
)
@click.option("--tokenizer", metavar="NAME_OR_PATH", help="Tokenizer to count tokens with (a folder or a Hub id).")
@click.option("--max-length", type=click.IntRange(min=1), help="Drop rows longer than this many tokens (e.g. 16384).")
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="Bad input (malformed line, missing document, empty answer, non-UTF-8): stop at the first one, or skip "
    "it; skipped input is counted and listed in the summary, stats.json and the card.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds split, short sample, synthetic rows.")
@click.option(
    "--validation-size",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.02,
    show_default=True,
    help="Validation fraction (at least one row when > 0).",
)
@click.option("--no-dedupe", is_flag=True, help="Keep exact and near-duplicate rows.")
@click.option(
    "--near-dup-threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.8,
    show_default=True,
    help="MinHash similarity of both prompt and completion above which rows are near-duplicates.",
)
@click.option(
    "--prompt-template",
    default="[INST]{instruction}[/INST]",
    show_default=True,
    help="Wraps the instruction in the prompt column, like the training recipe.",
)
@click.option("--num-proc", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--license", "license_", help="License for the card (default: inferred from the sources).")
@click.option("--name", "pretty_name", default="LongQA", show_default=True, help="Title of the dataset card.")
@click.option(
    "--card-template",
    type=click.Path(exists=True, dir_okay=False),
    help="Dataset card template (default: the text of datasets/longqa/README.md).",
)
@click.option("--arrow", "save_arrow", is_flag=True, help="Also write OUTPUT/arrow/ for datasets.load_from_disk.")
@click.option("--push-to-hub", "repo_id", metavar="REPO_ID", help="Push the result to this Hub dataset repository.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
def build_command(repo_id: str | None, private: bool, **options) -> None:
    """Build a LongQA dataset (parquet splits, stats.json, dataset card, length histogram) into OUTPUT.

    Inputs can be mixed: --documents with --qa, --longalpaca, --short (with --short-ratio), --synthetic N.
    OUTPUT must not exist or be empty: nothing is ever overwritten.
    """
    from .longqa.build import (
        LongQAConfig,
        LongQAPushError,
        build_longqa,
        check_hub_access,
        check_output_folder,
        format_summary,
        push_longqa,
    )

    if private and not repo_id:
        raise click.UsageError("--private only applies with --push-to-hub.")
    options["license"] = options.pop("license_")
    options["longalpaca"] = list(options["longalpaca"])
    options["synthetic_lengths"] = list(options["synthetic_lengths"]) or None
    options["dedupe"] = not options.pop("no_dedupe")
    config = LongQAConfig(**options)
    try:
        config.validate()
        check_output_folder(config.output)
        # check the token and the Hub before the build, not after an hour of it
        token = check_hub_access() if repo_id else None
        result = build_longqa(config, repo_id=repo_id)  # its progress: logged and drawn on stderr
    except (ValueError, OSError, ImportError, LongQAPushError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(format_summary(result.stats, result.output))
    if repo_id:
        try:
            url = push_longqa(result.output, repo_id, private=private, token=token)
        except LongQAPushError as error:
            raise click.ClickException(
                f"{error}\nThe build itself is complete in {result.output}; push it later with "
                f"`longlora-hub longqa push {result.output} {repo_id}`."
            ) from error
        click.echo(f"pushed to {url}")


@longqa_group.command("push")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
def push_command(output: str, repo_id: str, private: bool) -> None:
    """Push the LongQA build in OUTPUT to the Hub dataset repository REPO_ID in one commit: its parquet shards as
    written, the card (whose `configs` map the splits), stats.json and the histogram."""
    from .longqa.build import LongQAPushError, push_longqa

    try:
        url = push_longqa(output, repo_id, private=private)
    except (LongQAPushError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"pushed to {url}")


__all__ = ["longqa_group"]
