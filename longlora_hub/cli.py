"""The `longlora-hub` command line. Heavy imports (torch, transformers) happen inside the commands so that
`longlora-hub --help` answers at once."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="longlora-hub", prog_name="longlora-hub")
@click.option(
    "--verbose",
    "-v",
    count=True,
    help="More messages on stderr: -v adds longlora-hub's debug messages and transformers' and huggingface_hub's "
    "info messages, -vv their debug messages too.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Only warnings and errors on stderr (transformers' and huggingface_hub's errors only), and no progress "
    "bars. Results still go to stdout.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """LongLoRA for the Hugging Face ecosystem: extend Llama checkpoints to long contexts.

    Results (tables, answers, paths) go to stdout, messages and progress bars to stderr. -v and -q go before the
    command (`longlora-hub -q eval ppl ...`): after it, -q is the command's own option where it has one (generate's
    --question).
    """
    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other; pass one of them.")
    from .log import cli_verbosity

    # set for this command only: put back when it ends (a test or another program calling `main` keeps its settings)
    ctx.with_resource(cli_verbosity(verbose, quiet))


@main.command()
@click.argument("base")
@click.argument("output", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--context-length",
    "-n",
    type=click.IntRange(min=1),
    required=True,
    help="Context to extend to, in tokens (e.g. 32768).",
)
@click.option(
    "--group-size-ratio",
    type=float,
    default=0.25,
    show_default=True,
    help="S²-Attn group size as a fraction of the training sequence length, in (0, 1].",
)
@click.option("--group-size", type=int, default=None, help="Absolute, even S²-Attn group size; overrides the ratio.")
@click.option(
    "--rope-type",
    type=click.Choice(["linear", "yarn", "dynamic"]),
    default="linear",
    show_default=True,
    help="RoPE scaling: linear (Position Interpolation, as in LongLoRA), yarn or dynamic (NTK).",
)
@click.option("--ceil", is_flag=True, help="Round the RoPE factor up to an integer, like the LongLoRA reference.")
def convert(
    base: str,
    output: str,
    context_length: int,
    group_size_ratio: float,
    group_size: int | None,
    rope_type: str,
    ceil: bool,
) -> None:
    """Convert the Llama checkpoint BASE (a folder, a Hub id, or builtin:tiny-llama-pretrained, the tiny base this
    package ships) into a LlamaLongLoRA checkpoint in OUTPUT.

    Only config.json is rewritten (RoPE scaling for the new context, S²-Attn settings, remote code); the weights
    and tokenizer are copied as they are, never loaded.
    """
    import json
    from pathlib import Path

    from .convert import convert_checkpoint, sigterm_as_exit
    from .remote_code.s2_attention import s2_group_size
    from .rope import describe, read_rope

    try:
        with sigterm_as_exit():  # `kill` or a scheduler's cancel then removes the half-written output too
            folder = convert_checkpoint(
                base,
                output,
                context_length,
                group_size_ratio=group_size_ratio,
                group_size=group_size,
                rope_type=rope_type,
                ceil=ceil,
            )
    except (ValueError, OSError) as error:  # FileNotFoundError / FileExistsError are OSErrors
        raise click.ClickException(str(error)) from error

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    rope = read_rope(config)
    if config.get("s2_group_size"):
        groups = f"{config['s2_group_size']} tokens"
    else:
        ratio = config["s2_group_size_ratio"]
        at_context = s2_group_size(context_length, None, ratio)
        groups = f"{ratio:g} x sequence length ({at_context} tokens at {context_length})"
    click.echo(f"Converted {base} -> {folder}")
    click.echo(
        f"  context:    {context_length} tokens (pretrained at {rope['original_max_position_embeddings']}, "
        f"max_position_embeddings={config['max_position_embeddings']})"
    )
    click.echo(f"  RoPE:       {describe(rope)}")
    click.echo(f"  S² groups:  {groups}")
    click.echo(f"Load it with AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).")


@main.command(
    "train",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def train(ctx: click.Context) -> None:
    """Train with the LongLoRA recipe (recipes/sft.py, shipped in the package).

    \b
    longlora-hub train --config smollm2-135m/32k_extend [--key value ...]
    longlora-hub train --config my_recipe.yaml --max_steps 10
    longlora-hub train --list    the shipped configs' names, and where the accelerate launch configs are
    longlora-hub train --help    every recipe key (the YAML's keys are the same)

    Under accelerate: accelerate launch [--config_file PATH] -m longlora_hub.train --config NAME ...
    """
    if ctx.args == ["--list"]:
        from .recipes import listing

        click.echo(listing())
        return
    from .recipes.sft import run

    run(ctx.args)


def _add_command_groups() -> None:
    from .cli_eval import eval_group
    from .cli_longqa import longqa_group
    from .cli_publish import merge_command, push_command
    from .generate import generate_command

    main.add_command(eval_group)
    main.add_command(longqa_group)
    main.add_command(merge_command)
    main.add_command(push_command)
    main.add_command(generate_command)


_add_command_groups()

if __name__ == "__main__":
    main()
