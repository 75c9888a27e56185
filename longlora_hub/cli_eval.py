"""`longlora-hub eval`: perplexity (`ppl`) and passkey retrieval (`passkey`) of long-context models.

Only click is imported here; torch, transformers and the evaluation code load inside the commands, so that
`longlora-hub --help` answers at once. The logic lives in `longlora_hub.evaluation`; these commands parse options,
turn the library's `ValueError` / `OSError` into error messages (exit code 1), and write the results. Whatever can be
checked before the evaluation is (the output files, the device, the model's config and its code), so that a run of
hours never ends in an error that was known at its start, and its results are written before the optional plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _split(values: tuple[str, ...] | str | None) -> list[str]:
    if not values:
        return []
    values = (values,) if isinstance(values, str) else values
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _int_list(ctx: click.Context, param: click.Parameter, values: Any) -> list[int] | None:
    """A repeatable option that also takes comma lists: `--seq-len 4096,8192 --seq-len 16384`."""
    items = _split(values)
    if not items:
        return None
    try:
        numbers = [int(item) for item in items]
    except ValueError:
        raise click.BadParameter(f"expected whole numbers of tokens, e.g. 4096,8192; got {values!r}") from None
    if any(number < 2 for number in numbers):
        raise click.BadParameter(f"lengths are at least 2 tokens, got {numbers}")
    return list(dict.fromkeys(numbers))  # in the order given, once each


def _depth_list(ctx: click.Context, param: click.Parameter, values: Any) -> list[float] | None:
    items = _split(values)
    if not items:
        return None
    try:
        depths = [float(item) for item in items]
    except ValueError:
        raise click.BadParameter(f"expected fractions such as 0,0.25,0.5,0.75,1; got {values!r}") from None
    if any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise click.BadParameter(f"depths are fractions of the prompt in [0, 1], got {depths}")
    return list(dict.fromkeys(depths))


def _model_options(command: Callable) -> Callable:
    """The options `ppl` and `passkey` share: what to load, where, and where the results go."""
    options = [
        click.option(
            "--adapter",
            default=None,
            help="A PEFT adapter folder to apply on MODEL (MODEL may also be the adapter folder itself: its "
            "base_model_name_or_path is then loaded).",
        ),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL."),
        click.option(
            "--trust-remote-code",
            is_flag=True,
            help="Run the Python code MODEL ships even when it is not this package's LlamaLongLoRA code (only for "
            "code you trust: it runs with your rights). LlamaLongLoRA checkpoints written by this version and stock "
            "models need no flag.",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help='auto: the GPUs when CUDA is there (device_map="auto": a model too large for one GPU is split over '
            "all of them, and CPU memory after that), else the CPU; or one device: cpu, cuda, cuda:1, mps.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="auto: the checkpoint's own dtype (its config's dtype, as transformers' dtype=\"auto\"), so a "
            "bfloat16 checkpoint is evaluated in bfloat16 on any device.",
        ),
        click.option(
            "--attn-implementation",
            default=None,
            help="sdpa, eager, flash_attention_2, flex_attention; transformers' default when unset.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Windows (ppl) or prompts (passkey) per forward pass.",
        ),
        click.option(
            "--output",
            "-o",
            type=click.Path(dir_okay=False, writable=True),
            default=None,
            help="Write the results as JSON here (model, adapter, revision, protocol, lengths, numbers, versions).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


def _check_writable(path: str, option: str) -> Path:
    """Refuse, before any evaluation, a results file that could not be written at its end."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise click.ClickException(f"{option} {path} is a folder; pass a file name, e.g. {target / 'results.json'}.")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing folder: the missing ones are created when writing
    if not folder.is_dir():
        raise click.ClickException(
            f"{option} {path} cannot be written: {folder} is a file, not a folder; pass another path."
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise click.ClickException(f"{option} {path} cannot be written (no permission in {folder}); pass another path.")
    return target


def _check_plot(path: str, output: str | None) -> None:
    """`--plot` needs matplotlib and a file type it writes; checked before the evaluation, not after it."""
    target = _check_writable(path, "--plot")
    if output and target.resolve() == Path(output).expanduser().resolve():
        raise click.ClickException(f"--plot and --output are both {path}; pass two different files.")
    from .evaluation.report import figure_class

    try:
        Figure = figure_class("--plot")
    except ImportError as error:
        raise click.ClickException(f"{error} Or leave out --plot.") from None
    formats = Figure().canvas.get_supported_filetypes()
    if target.suffix.lower().removeprefix(".") not in formats:
        raise click.ClickException(
            f"--plot {path} is not an image file matplotlib writes; end it in .png (or one of "
            f"{', '.join('.' + name for name in sorted(formats))})."
        )


def _write_results(result: dict[str, Any], output: str | None, plot: str | None = None) -> None:
    """The JSON first, then the heatmap: a plot that fails cannot cost the results."""
    from .evaluation.report import plot_passkey_heatmap, save_result

    if output:
        try:
            click.echo(f"Results written to {save_result(result, output)}")
        except OSError as error:
            raise click.ClickException(
                f"Could not write the results to {output} ({error}); the table above holds them."
            ) from error
    if plot:
        try:
            click.echo(f"Heatmap written to {plot_passkey_heatmap(result, plot)}")
        except (ImportError, OSError, ValueError) as error:
            kept = f" (the results are in {output})" if output else " (the table above holds the results)"
            raise click.ClickException(f"Could not write the heatmap to {plot}: {error}{kept}.") from error


@click.group("eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Evaluate a long-context model: perplexity on long documents, passkey retrieval."""


@eval_group.command("ppl")
@click.argument("model")
@click.option(
    "--data",
    required=True,
    help="Evaluation data: a uint16 .bin of token ids (the reference's PG19 / proof-pile format), a .txt, .jsonl or "
    ".parquet file, a dataset folder, or a Hub dataset name.",
)
@click.option(
    "--seq-len",
    "seq_lens",
    multiple=True,
    required=True,
    callback=_int_list,
    metavar="N[,N...]",
    help="Context length(s) to evaluate, in tokens; repeat the option or give a comma list (4096,8192).",
)
@click.option("--stride", type=click.IntRange(min=1), default=256, show_default=True, help="Tokens between windows.")
@click.option(
    "--protocol",
    type=click.Choice(["longlora", "press"]),
    default="longlora",
    show_default=True,
    help="longlora: every window scored in full, ppl = exp(mean window loss), as the LongLoRA reference. press: "
    "each token scored once by the first window that reaches it, ppl = exp(total NLL / tokens).",
)
@click.option(
    "--s2",
    is_flag=True,
    help="Evaluate with the S²-Attn pattern instead of full attention (the paper's ablation; LlamaLongLoRA models "
    "only: the model runs in training mode with dropout 0 and no gradients, since S² applies only in training mode).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Positions per LM-head chunk: the loss never holds seq_len x vocab logits.",
)
@click.option("--text-field", default="text", show_default=True, help="Column holding the text of JSONL/parquet rows.")
@click.option("--split", default="test", show_default=True, help="Split of a dataset folder or Hub dataset.")
@click.option("--data-config", default=None, help="Configuration name of a Hub dataset.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Use only the first N tokens of the data.")
@_model_options
def ppl(
    model: str,
    data: str,
    seq_lens: list[int],
    stride: int,
    protocol: str,
    s2: bool,
    chunk_size: int,
    text_field: str,
    split: str,
    data_config: str | None,
    max_tokens: int | None,
    adapter: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    attn_implementation: str | None,
    batch_size: int,
    output: str | None,
    trust_remote_code: bool,
) -> None:
    """Perplexity of MODEL on long documents at one or more context lengths.

    MODEL is a LlamaLongLoRA checkpoint, a merged or stock Llama, or a base with --adapter (a folder or a Hub id;
    builtin:tiny-llama-pretrained is the tiny base this package ships).
    Evaluation uses full attention unless --s2 is given.
    """
    from .evaluation.loading import (
        check_reachable,
        load_config,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_source,
    )
    from .evaluation.perplexity import evaluate_perplexity, load_tokens, plan_windows
    from .evaluation.report import make_result, markdown_table

    if output:
        _check_writable(output, "--output")
    try:
        device = resolve_device(device)
        source = resolve_source(model, adapter, revision, trust_remote_code=trust_remote_code)
        config = load_config(source)  # no weights yet: length errors come at once
        check_reachable(config, seq_lens, model)
        # token ids need no tokenizer, so a checkpoint without tokenizer files can still be evaluated on them
        tokenizer = None if data.lower().endswith(".bin") else load_tokenizer(source)
        tokens = load_tokens(data, tokenizer, text_field, split, data_config, max_tokens)
        for seq_len in seq_lens:
            plan_windows(len(tokens), seq_len, stride, protocol)  # data too short, stride too long for press
        loaded = load_model(source, device, dtype, attn_implementation, tokenizer=tokenizer)
        results = [
            evaluate_perplexity(
                loaded.model,
                tokens,
                seq_len,
                stride=stride,
                protocol=protocol,
                batch_size=batch_size,
                chunk_size=chunk_size,
                s2=s2,
            )
            for seq_len in seq_lens
        ]
    except (ValueError, OSError) as error:  # FileNotFoundError is an OSError
        raise _fail(error) from error
    settings = {
        "data": data,
        # a dataset folder or Hub dataset: what `load_dataset` was given, for the model card's model-index
        **({"split": split, "data_config": data_config} if not Path(data).expanduser().is_file() else {}),
        "data_tokens": len(tokens),
        "lengths": seq_lens,
        "stride": stride,
        "s2": s2,
        "attention": "S²-Attn (training-mode forward, dropout 0)" if s2 else "full",
        "chunk_size": chunk_size,
        "batch_size": batch_size,
    }
    result = make_result("perplexity", protocol, loaded.info, settings, results)
    click.echo(markdown_table(result))
    _write_results(result, output)


@eval_group.command("passkey")
@click.argument("model")
@click.option(
    "--lengths",
    multiple=True,
    required=True,
    callback=_int_list,
    metavar="N[,N...]",
    help="Prompt lengths in tokens of the model's tokenizer: a comma list (1024,2048,4096) or a repeated option.",
)
@click.option(
    "--depths",
    multiple=True,
    callback=_depth_list,
    metavar="D[,D...]",
    help="Needle depths as fractions of the prompt (0,0.25,0.5,0.75,1); default: a random depth per trial, seeded.",
)
@click.option(
    "--trials", type=click.IntRange(min=1), default=10, show_default=True, help="Keys per length (and depth)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the keys and the random depths.")
@click.option(
    "--depth-bins",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Rows of the per-depth table and heatmap when depths are random.",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False, writable=True), default=None, help="Save a length x depth heatmap (PNG)."
)
@_model_options
def passkey(
    model: str,
    lengths: list[int],
    depths: list[float] | None,
    trials: int,
    seed: int,
    depth_bins: int,
    plot: str | None,
    adapter: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    attn_implementation: str | None,
    batch_size: int,
    output: str | None,
    trust_remote_code: bool,
) -> None:
    """Passkey retrieval accuracy of MODEL by prompt length and needle depth.

    The LongLoRA reference protocol: a pass key hidden in repeated filler text, greedy decoding, exact match of the
    answer's tokens. MODEL is a LlamaLongLoRA checkpoint, a merged or stock Llama, or a base with --adapter
    (builtin:tiny-llama-pretrained is the tiny base this package ships).
    """
    from .evaluation.loading import (
        check_reachable,
        load_config,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_source,
    )
    from .evaluation.passkey import build_passkey_prompt, run_passkey
    from .evaluation.report import make_result, markdown_table

    if output:
        _check_writable(output, "--output")
    if plot:
        _check_plot(plot, output)
    try:
        device = resolve_device(device)
        source = resolve_source(model, adapter, revision, trust_remote_code=trust_remote_code)
        check_reachable(load_config(source), lengths, model, option="--lengths")
        tokenizer = load_tokenizer(source)
        for length in lengths:  # a length too short for the prompt's fixed parts fails before the model loads
            build_passkey_prompt(tokenizer, length, 0.5, 1)
        loaded = load_model(source, device, dtype, attn_implementation, tokenizer=tokenizer)
        numbers = run_passkey(
            loaded.model,
            tokenizer,
            lengths,
            depths,
            trials=trials,
            seed=seed,
            batch_size=batch_size,
            depth_bins=depth_bins,
        )
    except (ValueError, OSError) as error:
        raise _fail(error) from error
    settings = {key: numbers.pop(key) for key in ("lengths", "depths", "depth_bins", "trials", "seed")}
    settings["batch_size"] = batch_size
    result = make_result("passkey", "passkey", loaded.info, settings, numbers)
    click.echo(markdown_table(result))
    _write_results(result, output, plot)


__all__ = ["eval_group"]
