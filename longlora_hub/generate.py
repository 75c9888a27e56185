"""`longlora-hub generate`: ask a long-context model a question about a long document, as the LongLoRA reference's
inference script does.

The document (`--material`: text, Markdown or PDF, read by the LongQA builder's readers) and the question become one
instruction with the LongQA / LongAlpaca wording (`longlora_hub.longqa.templates`), so a model answers in the format
it was fine-tuned on. The instruction goes into the tokenizer's chat template when it has one, else into the
`[INST]{instruction}[/INST]` template of the `longqa` training stage. Generation uses full attention (the model in
eval mode: S²-Attn applies only in training mode) and the KV cache; it is greedy unless a temperature is given, and
streams the answer to stdout as it is produced.

Everything that can be checked before the model's weights load is: the document, the model's config and code, the
tokenizer, the prompt, and whether prompt and answer fit the model's context.

Only click (and this package's logging) is imported at module level: torch and transformers load inside the
functions, so that `longlora-hub --help` answers at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .builtin import SHIPPED_MODEL as BUILTIN_MODEL  # the shipped tiny base, for trying the command without a download
from .builtin import model_location
from .log import get_logger

TEMPLATES = ("auto", "chat", "inst")
DEFAULT_MAX_NEW_TOKENS = 512

logger = get_logger(__name__)


@dataclass
class Prompt:
    r"""
    A prompt ready to generate from.

    Args:
        text (`str`):
            The prompt as text (with the chat template's markup, or `[INST]...[/INST]`).
        input_ids (`list[int]`):
            Its token ids, exactly what the model is given.
        template (`str`):
            `"chat"` (the tokenizer's chat template) or `"inst"` (the LongQA `[INST]` template).
    """

    text: str
    input_ids: list[int]
    template: str


@dataclass
class Generation:
    r"""
    What [`generate`] produced.

    Args:
        token_ids (`list[int]`):
            The new tokens, without the prompt (the end-of-sequence token included when the model stopped on it).
        text (`str`):
            Those tokens decoded, special tokens left out.
    """

    token_ids: list[int]
    text: str


def read_material(path: str | Path) -> str:
    r"""
    The text of a document to ask about: a UTF-8 text or Markdown file, or a PDF (with the optional `pypdf`), read as
    the LongQA builder reads its documents (Windows line ends made `\n`, surrounding blank space removed).

    Args:
        path (`str` or `Path`):
            A `.txt`, `.md` or `.pdf` file.

    Returns:
        `str`: The document's text.

    Raises:
        `FileNotFoundError`: If there is no file at `path`.
        `IsADirectoryError`: If `path` is a folder.
        `ValueError`: If the file type is not one of those, the text is not UTF-8, the PDF cannot be read, or the
            document has no text.
        `ImportError`: If the file is a PDF and `pypdf` is not installed.
    """
    from .longqa.sources import DOCUMENT_SUFFIXES, read_document

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"No file at {path}; --material takes a document file ({', '.join(DOCUMENT_SUFFIXES)})."
        )
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; --material takes one document file, not a folder.")
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        kind = f"a {suffix} file" if suffix else "a file without a suffix"
        raise ValueError(
            f"{path} is {kind}; --material reads text (.txt), Markdown (.md) and PDF (.pdf) documents. Convert it to "
            "one of those first (for plain text, save it as .txt)."
        )
    return read_document(path)


def build_prompt(tokenizer: Any, material: str, question: str, template: str = "auto") -> Prompt:
    r"""
    The prompt for a question about a document, formatted as the `longqa` training stage formats its rows.

    The document and the question become one instruction with the LongAlpaca paper wording
    ([`~longlora_hub.longqa.templates.render_instruction`]). With the chat template, that instruction is the user
    message and the prompt ends with the assistant's turn (`add_generation_prompt=True`); the template's own special
    tokens are kept and none are added. With the `[INST]` template the prompt is `[INST]{instruction}[/INST]`,
    tokenized with the tokenizer's special tokens (a Llama tokenizer's BOS), as TRL tokenizes training prompts.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer.
        material (`str`):
            The document's text (see [`read_material`]).
        question (`str`):
            The question or request (answer, summarise, review...).
        template (`str`, *optional*, defaults to `"auto"`):
            `"chat"`, `"inst"`, or `"auto"`: the chat template when the tokenizer has one, else `"inst"`.

    Returns:
        `Prompt`: The prompt's text, token ids and the template used.

    Raises:
        `ValueError`: If the document or the question is empty, `template` is unknown, or `"chat"` is asked of a
            tokenizer that has no chat template.
    """
    from .data import DEFAULT_TEMPLATE
    from .longqa.build import apply_prompt_template
    from .longqa.templates import render_instruction

    if template not in TEMPLATES:
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}.")
    if not material.strip():
        raise ValueError("The material is empty; pass a document with text.")
    if not question.strip():
        raise ValueError("The question is empty; pass what to ask about the material with --question.")
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat" if has_chat_template else "inst"
    instruction = render_instruction([material], question)
    if template == "chat":
        if not has_chat_template:
            raise ValueError(
                "The tokenizer has no chat template; use --template inst (the [INST] template of LongQA training) or "
                "--template auto."
            )
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        text = apply_prompt_template(DEFAULT_TEMPLATE, instruction)
        input_ids = tokenizer(text, verbose=False)["input_ids"]
    return Prompt(text=text, input_ids=list(input_ids), template=template)


def context_length(config: Any) -> int | None:
    """The most tokens (prompt and answer) the model's RoPE is configured for, or `None` when it has no fixed limit
    (dynamic NTK); the same limit `longlora-hub eval` checks lengths against."""
    from .evaluation.loading import max_length

    return max_length(config)


def check_context(config: Any, prompt_tokens: int, max_new_tokens: int, model_name: str = "MODEL") -> None:
    r"""
    Refuse, before generating, a prompt and answer that do not fit the model's context.

    The context is `max_position_embeddings`, which in a Position-Interpolation checkpoint (`longlora-hub convert`)
    already includes the interpolation factor; dynamic NTK has no fixed limit and is not checked.

    Args:
        config (`PreTrainedConfig`):
            The model's config.
        prompt_tokens (`int`):
            The prompt's length in tokens.
        max_new_tokens (`int`):
            The most tokens the answer may have.
        model_name (`str`, *optional*, defaults to `"MODEL"`):
            The checkpoint's folder or Hub id, for the message (and the `longlora-hub convert` command it suggests).

    Raises:
        `ValueError`: If `prompt_tokens + max_new_tokens` is above the context; the message gives both numbers, the
            context, and the ways out (shorter material, fewer new tokens, a model extended further).
    """
    from .rope import describe, read_rope

    limit = context_length(config)
    total = prompt_tokens + max_new_tokens
    if limit is None or total <= limit:
        return
    rope = describe(read_rope(config))
    extend = (
        f"use a model extended further: `longlora-hub convert {model_name} OUTPUT --context-length "
        f"{1 << (total - 1).bit_length()}` (Position Interpolation; fine-tune it with LongLoRA afterwards)"
    )
    fixes: list[str] = []
    if prompt_tokens < limit:
        fixes.append(f"lower --max-new-tokens to at most {limit - prompt_tokens}")
        if max_new_tokens < limit:
            fixes.append(f"shorten the material by {total - limit} tokens")
    elif max_new_tokens < limit:
        fixes.append(f"shorten the material by at least {total - limit} tokens (the prompt alone does not fit)")
    else:
        fixes.append(f"shorten the material and lower --max-new-tokens, to {limit} tokens together")
    advice = f"{', '.join(fixes)}, or {extend}."
    raise ValueError(
        f"The prompt is {prompt_tokens} tokens and --max-new-tokens {max_new_tokens} allows {max_new_tokens} more: "
        f"{total} tokens, beyond the {limit}-token context of {model_name} (max_position_embeddings={limit}, {rope}). "
        f"{advice[0].upper()}{advice[1:]}"
    )


def generate(
    model: Any,
    tokenizer: Any,
    prompt: Prompt | list[int],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: bool = False,
    model_name: str | None = None,
) -> Generation:
    r"""
    Generate an answer with full attention and the KV cache.

    The model is put in eval mode (a LlamaLongLoRA model uses S²-Attn only in training mode). Decoding is greedy
    unless `temperature > 0`, whatever the model's `generation_config` says; sampling uses exactly `temperature`
    and `top_p` (no top-k). The end-of-sequence tokens and other settings of the model's `generation_config` apply.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The causal LM.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, to decode (and stream) the answer.
        prompt (`Prompt` or `list[int]`):
            From [`build_prompt`], or token ids.
        max_new_tokens (`int`, *optional*, defaults to `512`):
            The most tokens to generate.
        temperature (`float`, *optional*, defaults to `0.0`):
            `0` for greedy decoding, above `0` to sample.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling's probability mass, in (0, 1]; only when sampling.
        seed (`int`, *optional*):
            Seeds torch's generators before sampling, for a reproducible answer.
        stream (`bool`, *optional*, defaults to `False`):
            Print the answer to stdout as it is generated (transformers' `TextStreamer`, prompt left out).
        model_name (`str`, *optional*):
            The checkpoint's folder or Hub id, for the context error; defaults to the model's `name_or_path`.

    Returns:
        `Generation`: The new token ids and their text.

    Raises:
        `ValueError`: If the prompt is empty, the settings are out of range, or prompt and answer do not fit the
            model's context (see [`check_context`]).
    """
    import torch
    from transformers import TextStreamer

    from .evaluation.loading import model_device

    input_ids = list(prompt.input_ids if isinstance(prompt, Prompt) else prompt)
    if not input_ids:
        raise ValueError("The prompt has no tokens.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or above (sampling), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    model_name = model_name or getattr(model.config, "_name_or_path", None) or "MODEL"
    check_context(model.config, len(input_ids), max_new_tokens, model_name)

    sampling = temperature > 0
    config = copy.deepcopy(model.generation_config)
    # greedy stays greedy: the sampling settings a checkpoint ships (Llama-2-chat: do_sample, 0.6, 0.9) are dropped
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,  # 0: no top-k filter (transformers would otherwise apply 50)
        use_cache=True,  # some checkpoints save use_cache=False from training
    )
    if config.pad_token_id is None:
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if isinstance(config.pad_token_id, list):
            config.pad_token_id = config.pad_token_id[0]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None

    model.eval()
    ids = torch.tensor([input_ids], dtype=torch.long, device=model_device(model))  # (1, N)
    if sampling and seed is not None:
        torch.manual_seed(seed)  # every device's generator
    with torch.inference_mode():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer
        )
    new_ids = output[0, len(input_ids) :].tolist()
    return Generation(token_ids=new_ids, text=tokenizer.decode(new_ids, skip_special_tokens=True))


@click.command("generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option(
    "--material",
    "-m",
    required=True,
    help="The long document to ask about: a text (.txt), Markdown (.md) or PDF (.pdf, needs pypdf) file.",
)
@click.option("--question", "-q", required=True, help="What to ask about the material (or a request: summarise...).")
@click.option(
    "--adapter",
    default=None,
    help="A PEFT adapter folder (a LongLoRA training run's output) to apply on MODEL; MODEL may also be the adapter "
    "folder itself, whose base_model_name_or_path is then loaded.",
)
@click.option(
    "--template",
    type=click.Choice(TEMPLATES),
    default="auto",
    show_default=True,
    help="How the prompt is written. chat: the tokenizer's chat template, the material and question as the user "
    "message; inst: [INST]{instruction}[/INST], the LongQA training template (what a model fine-tuned by the longqa "
    "recipe without use_chat_template expects); auto: chat when the tokenizer has a chat template, else inst.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    help="The most tokens to generate; prompt and answer must fit the model's context.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0: greedy decoding; above 0: sampling at this temperature (the LongLoRA reference used 0.6).",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Nucleus sampling: sample from the smallest set of tokens whose probability reaches this (e.g. 0.9); needs "
    "--temperature above 0. Default: 1 (no cut).",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling, for a reproducible answer.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL.")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Run the Python code MODEL ships even when it is not this package's LlamaLongLoRA code (only for code you "
    "trust: it runs with your rights). LlamaLongLoRA checkpoints written by this version and stock models need no "
    "flag.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help='auto: the GPUs when CUDA is there (device_map="auto": a model too large for one GPU is split over all of '
    "them, and CPU memory after that), else the CPU; or one device: cpu, cuda, cuda:1, mps.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="auto: the checkpoint's own dtype (its config's dtype, as transformers' dtype=\"auto\").",
)
@click.option(
    "--attn-implementation",
    default=None,
    help="sdpa, eager, flash_attention_2, flex_attention; transformers' default when unset.",
)
def generate_command(
    model: str,
    material: str,
    question: str,
    adapter: str | None,
    template: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int | None,
    revision: str | None,
    trust_remote_code: bool,
    device: str,
    dtype: str,
    attn_implementation: str | None,
) -> None:
    """Answer a question about a long document with MODEL, streaming the answer to stdout.

    MODEL is a merged or LlamaLongLoRA checkpoint, a stock model, or a base with --adapter (a folder or a Hub id;
    builtin:tiny-llama-pretrained is the tiny base this package ships). Generation uses full attention and the KV
    cache, greedy unless --temperature is above 0. What was loaded and the prompt's length go to stderr (not with
    `longlora-hub -q generate ...`), so stdout holds the answer alone.

    \b
    longlora-hub generate ./llama-2-7b-longlora-32k --material paper.pdf --question "What is the main idea?"
    """
    if top_p is not None and temperature == 0:
        raise click.UsageError("--top-p applies only when sampling; pass --temperature above 0 as well (e.g. 0.6).")
    import torch

    from .evaluation.loading import load_config, load_model, load_tokenizer, resolve_device, resolve_source

    try:
        document = read_material(material)  # before anything loads: a wrong file costs no download
        device = resolve_device(device)
        source = resolve_source(model_location(model), adapter, revision, trust_remote_code=trust_remote_code)
        config = load_config(source)
        tokenizer = load_tokenizer(source)
        prompt = build_prompt(tokenizer, document, question, template)
        check_context(config, len(prompt.input_ids), max_new_tokens, source.base)  # the checkpoint to convert
        limit = context_length(config)
        logger.info(
            f"{model}{f' + {adapter}' if adapter else ''}: a {len(prompt.input_ids)}-token prompt ({prompt.template} "
            f"template) and up to {max_new_tokens} new tokens, context {limit or 'unlimited (dynamic NTK)'}; "
            f"{'sampling at temperature ' + format(temperature, 'g') if temperature > 0 else 'greedy'}, on "
            f"{'the GPUs (device_map=auto)' if device == 'auto' else device}."
        )
        loaded = load_model(source, device, dtype, attn_implementation, tokenizer=tokenizer)
        generate(
            loaded.model,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stream=True,
            model_name=source.base,
        )
    except torch.OutOfMemoryError as error:
        raise click.ClickException(
            f"Out of memory generating from a {len(prompt.input_ids)}-token prompt on {device} ({error}). Pass shorter "
            "material, --dtype bfloat16, --attn-implementation sdpa or flash_attention_2, or a device with more "
            "memory."
        ) from error
    except (ValueError, OSError, ImportError) as error:  # FileNotFoundError is an OSError
        raise click.ClickException(str(error)) from error


__all__ = [
    "BUILTIN_MODEL",
    "DEFAULT_MAX_NEW_TOKENS",
    "TEMPLATES",
    "Generation",
    "Prompt",
    "build_prompt",
    "check_context",
    "context_length",
    "generate",
    "generate_command",
    "read_material",
]
