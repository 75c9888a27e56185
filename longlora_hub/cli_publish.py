"""`longlora-hub merge` and `longlora-hub push`: from a trained adapter to a merged model and to Hub repositories."""

from __future__ import annotations

from typing import Any

import click

from .log import get_logger

logger = get_logger(__name__)


class ShardSize(click.ParamType):
    """A shard size: a number of bytes or a size such as 5GB, 500MB or 2GiB, read as huggingface_hub and
    transformers read `max_shard_size` (see `longlora_hub.shards.parse_size`). A bad value is click's usage error,
    naming the option."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from .shards import parse_size  # imports torch: only when a merge runs, so `--help` stays instant

        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


SHARD_SIZE = ShardSize()


def parse_size(text: str) -> int:
    """'5GB', '500MiB' or a number of bytes, as transformers' `max_shard_size` accepts them; raises click's
    `BadParameter` for anything else."""
    return SHARD_SIZE.convert(text, None, None)


@click.command("merge")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--base", default=None, help="Base checkpoint (folder or Hub id); default: the adapter's base model.")
@click.option(
    "--architecture",
    type=click.Choice(["llama_longlora", "llama"]),
    default="llama_longlora",
    show_default=True,
    help="llama_longlora keeps the remote code (S² training can continue); llama writes a stock Llama that any "
    "engine loads without trust_remote_code.",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="dtype of the merged weights; default: the base's.",
)
@click.option(
    "--max-shard-size",
    type=SHARD_SIZE,
    default=None,
    help="Largest output shard: bytes, or e.g. 500MB, 5GB, 2GiB (KB/MB/GB are powers of 10); default: 5GB, like "
    "huggingface_hub and the Hub.",
)
def merge_command(
    adapter: str, output: str, base: str | None, architecture: str, dtype: str | None, max_shard_size: int | None
) -> None:
    """Merge the LoRA ADAPTER (with its trained embeddings and norms) into its base and write OUTPUT.

    Streamed tensor by tensor: memory stays around the adapter plus one tensor, whatever the model's size.
    """
    from .convert import sigterm_as_exit
    from .merge import merge_adapter

    # without the flag the Python API's default applies: one default shard size, defined once (shards.py)
    sizing = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    try:
        with sigterm_as_exit():  # `kill` or a scheduler's cancel then removes the half-written output too
            folder = merge_adapter(adapter, output, base=base, architecture=architecture, dtype=dtype, **sizing)
    except (ValueError, OSError) as error:  # MergeError is a ValueError; FileNotFoundError an OSError
        raise click.ClickException(str(error)) from error
    click.echo(f"Merged {adapter} -> {folder} ({architecture})")
    if architecture == "llama":
        click.echo(f"Load it with AutoModelForCausalLM.from_pretrained({str(folder)!r}).")
    else:
        click.echo(f"Load it with AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).")


@click.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--commit-message", default=None, help="Commit message; default: one naming what is pushed.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--token", default=None, help="Hub token with write access; default: HF_TOKEN or `hf auth login`.")
@click.option(
    "--checkpoint",
    default=None,
    help="Push a trainer checkpoint instead of the final model: 'last' or a checkpoint-N subfolder name.",
)
@click.option(
    "--include-training-state",
    is_flag=True,
    help="Also push optimizer/scheduler/RNG states and training_args.bin (to resume elsewhere; pickles).",
)
@click.option(
    "--base-model",
    default=None,
    help="Hub id of the base model, for the card and the uploaded adapter_config.json, when FOLDER does not record it.",
)
@click.option(
    "--keep-remote",
    is_flag=True,
    help="Keep files the push manages that are gone from FOLDER on the Hub (by default they are deleted in the same "
    "commit, so the repository mirrors the folder).",
)
def push_command(
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    token: str | None,
    checkpoint: str | None,
    include_training_state: bool,
    base_model: str | None,
    keep_remote: bool,
) -> None:
    """Push FOLDER (a LongLoRA adapter, a LlamaLongLoRA or merged model, or a trainer output) to the Hub model
    repository REPO_ID in one commit, with a model card written from the folder's records."""
    from .push import PushError, plan_push, push_folder

    try:
        plan = plan_push(
            folder, repo_id, checkpoint=checkpoint, include_training_state=include_training_state, base_model=base_model
        )
        # what is about to happen goes to stderr (hidden by -q); stdout holds what was pushed where
        logger.info(f"pushing {plan.folder} ({plan.kind}) to {repo_id}: {len(plan.files)} files")
        if plan.skipped:
            logger.info(f"left out: {', '.join(plan.skipped)}")
        for warning in plan.warnings:
            logger.warning(warning)
        if plan.base_model is None:
            logger.warning("the base model's Hub id is unknown: the card names none (pass --base-model to set it)")
        result = push_folder(
            folder,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            token=token,
            keep_remote=keep_remote,
            plan=plan,
        )
    except (PushError, OSError) as error:
        raise click.ClickException(str(error)) from error
    if result.deleted:
        click.echo(f"  deleted on the Hub (no longer in the folder): {', '.join(result.deleted)}")
    if result.kept_remote:
        click.echo(f"  kept on the Hub (--keep-remote), though gone from the folder: {', '.join(result.kept_remote)}")
    if not result.changed:
        click.echo(f"Nothing changed: {result.url} already holds this folder (commit {result.commit_sha}).")
        return
    if result.pull_request_url:
        click.echo(f"Opened {result.pull_request_url}")
    else:
        click.echo(f"Pushed to {result.url} (commit {result.commit_sha})")
    if result.kind == "llama_longlora":
        click.echo(
            f"Load it with AutoModelForCausalLM.from_pretrained({repo_id!r}, trust_remote_code=True, "
            f"revision={result.commit_sha!r})."
        )


__all__ = ["SHARD_SIZE", "ShardSize", "merge_command", "parse_size", "push_command"]
