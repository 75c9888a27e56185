"""The reusable parts of `recipes/sft.py`: argument dataclasses, model loading with on-the-fly conversion,
dataset preparation per stage, and the checks that run before any training step.

Configuration flows one way: YAML (`--config`) -> these dataclasses and TRL's `SFTConfig` -> CLI overrides.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from .data import DEFAULT_TEMPLATE, load_raw_dataset, pack_documents, to_prompt_completion
from .remote_code.configuration_llama_longlora import S2_SHIFTS
from .remote_code.s2_attention import s2_group_size
from .trainable import LORA_TARGETS, TRAINABLE_MODES, lora_config

STAGES = ("extend", "longqa")
BUILTIN_MODELS = ("builtin:tiny-llama", "builtin:tiny-llama-3m", "builtin:tiny-llama-pretrained")
# the pretrained tiny base shipped with the package (see its README.md for how it was made)
PRETRAINED_TINY = Path(__file__).resolve().parent / "assets" / "tiny-llama-pretrained"
# the 3.4M-parameter Llama the shipped base was pretrained from: 4 layers of 256, 4 heads of 64, context 256, with
# the corpus tokenizer (512 tokens, digits split); random weights
TINY_3M_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "A stock Llama checkpoint (converted on the fly), a LlamaLongLoRA one, a Hub id, or "
            "builtin:tiny-llama (built in code, for CPU tests), builtin:tiny-llama-pretrained (the shipped pretrained "
            "tiny base)."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    context_length: int | None = field(
        default=None,
        metadata={
            "help": "Target context. Above the checkpoint's context, Position Interpolation extends it (factors "
            "compose with an existing linear scaling). Defaults to max_length."
        },
    )
    rope_type: str = field(default="linear", metadata={"help": "linear (PI, the paper), yarn or dynamic."})
    rope_ceil: bool = field(default=False, metadata={"help": "Round the PI factor up, like the reference."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "eager, sdpa, flex_attention (GPU) or flash_attention_2 (GPU)."}
    )
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: one of {DTYPES}."})


@dataclass
class LongLoRAArguments:
    stage: str = field(default="extend", metadata={"help": "extend (long plain text) or longqa (supervised QA)."})
    trainable: str = field(
        default="lora_plus",
        metadata={"help": "lora_plus (LoRA + embeddings + norms, the paper), lora, full, or qlora (GPU)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Projections that get LoRA."}
    )
    s2_attention: bool = field(default=True, metadata={"help": "Train with S²-Attn (full attention if false)."})
    s2_group_size_ratio: float = field(default=0.25, metadata={"help": "S² group size / sequence length."})
    s2_group_size: int | None = field(default=None, metadata={"help": "Absolute even S² group size (tokens)."})
    s2_shift: str = field(
        default="segments",
        metadata={"help": "segments (leak-free), roll (the paper's) or none (no shift: the ablation)."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name, or builtin:documents / builtin:passkey / builtin:corpus / builtin:corpus-long "
            "(generated, no download)."
        },
    )
    data_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local .txt/.md (one document per file), .json/.jsonl or .parquet files, or Hub files as "
            "hf://datasets/USER/REPO/PATH; globs allowed."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (corpora that do not fit on disk)."})
    builtin_rows: int = field(default=64, metadata={"help": "How many rows (documents) a builtin: dataset has."})
    text_field: str = field(default="text", metadata={"help": "extend stage: column holding the documents."})
    keep_documents_apart: bool = field(
        default=False,
        metadata={
            "help": "extend stage: rows carry their documents' lengths (seq_lengths) and go through TRL's padding-free "
            "collator, so positions restart at each document and attention stays inside it."
        },
    )
    prompt_template: str = field(
        default=DEFAULT_TEMPLATE, metadata={"help": "longqa stage: template for instruction/output rows."}
    )
    use_chat_template: bool = field(
        default=False, metadata={"help": "longqa stage: use the tokenizer's chat template instead."}
    )


def check_arguments(model_args: ModelArguments, ll_args: LongLoRAArguments, data_args, training_args) -> None:
    """Every configuration error, before any model or data is loaded, each naming the fix."""
    # an empty value on the command line (`--dataset_name ""`) means "not set", e.g. to switch to data_files
    data_args.dataset_name = data_args.dataset_name or None
    data_args.data_files = data_args.data_files or None
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required: a Llama checkpoint folder, a Hub id or builtin:tiny-llama.")
    if ll_args.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {ll_args.stage!r}.")
    if ll_args.trainable not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {ll_args.trainable!r}.")
    if model_args.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {model_args.dtype!r}.")
    if ll_args.trainable == "qlora":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "trainable: qlora needs a CUDA GPU and bitsandbytes (pip install 'longlora-hub[gpu]'); use lora_plus "
                "on this machine."
            )
    if ll_args.s2_shift not in S2_SHIFTS:
        raise ValueError(f"s2_shift must be one of {S2_SHIFTS}, got {ll_args.s2_shift!r}.")
    if not 0 < ll_args.s2_group_size_ratio <= 1:
        raise ValueError(f"s2_group_size_ratio must be in (0, 1], got {ll_args.s2_group_size_ratio}.")
    length = training_args.max_length
    if length is None or length < 2:
        raise ValueError("max_length must be set: it is the training sequence length (the extend stage's row length).")
    group = ll_args.s2_group_size
    if group is not None and (group < 2 or group % 2 or group > length):
        raise ValueError(
            f"s2_group_size={group} does not fit max_length={length}: use an even size between 2 and {length}, or "
            "leave it unset to use s2_group_size_ratio."
        )
    if ll_args.s2_attention and group is None and int(length * ll_args.s2_group_size_ratio) < 2:
        raise ValueError(
            f"s2_group_size_ratio={ll_args.s2_group_size_ratio} gives groups under 2 tokens at max_length={length}."
        )
    if model_args.context_length is not None and model_args.context_length < length:
        raise ValueError(
            f"max_length={length} is above context_length={model_args.context_length}: the model would see positions "
            "it was not extended to. Raise context_length or lower max_length."
        )
    if ll_args.stage == "longqa" and data_args.keep_documents_apart:
        raise ValueError("keep_documents_apart applies to the extend stage only.")
    if data_args.keep_documents_apart and ll_args.s2_attention and ll_args.s2_shift == "roll":
        raise ValueError(
            "keep_documents_apart packs several documents per row, which s2_shift: roll (the paper's cyclic roll) "
            "would mix; use s2_shift: segments (the default)."
        )
    if ll_args.stage == "extend" and training_args.padding_free:
        raise ValueError(
            "padding_free: the extend stage packs its own rows of max_length tokens; set keep_documents_apart: true "
            "instead, which turns on TRL's padding-free collator with the documents' boundaries."
        )


def _builtin_base(name: str, folder: Path) -> Path:
    """Save a model built in code (and its tokenizer) so that it loads like any checkpoint."""
    from .corpus import build_corpus_tokenizer
    from .testing import build_tiny_tokenizer, tiny_llama

    if name not in BUILTIN_MODELS:
        raise ValueError(f"Unknown builtin model {name!r}; the builtin models are {BUILTIN_MODELS}.")
    if name == "builtin:tiny-llama-pretrained":
        if not (PRETRAINED_TINY / "config.json").exists():
            raise ValueError(f"The shipped tiny base is missing from {PRETRAINED_TINY}; reinstall longlora-hub.")
        return PRETRAINED_TINY
    if not (folder / "config.json").exists():
        if name == "builtin:tiny-llama-3m":
            tokenizer = build_corpus_tokenizer()
            model = tiny_llama(vocab_size=len(tokenizer), **TINY_3M_SHAPE)
        else:
            tokenizer = build_tiny_tokenizer()
            model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def prepare_base(model_args: ModelArguments, ll_args: LongLoRAArguments, output_dir: str, length: int) -> Path:
    """The LlamaLongLoRA checkpoint to train: the given one if it already covers the context, otherwise a
    conversion into `output_dir/base` (config + remote code, weights symlinked, tokenizer copied) that the
    adapter then names as its base. Only the main process writes; call it under `main_process_first`."""
    from .convert import convert_checkpoint, is_local, resolve_checkpoint

    source = model_args.model_name_or_path
    if source.startswith("builtin:"):
        source = str(_builtin_base(source, Path(output_dir) / "builtin-base"))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=model_args.model_revision, trust_remote_code=True)
    except OSError as error:
        raise ValueError(
            f"Cannot read the model {source!r} ({error}). Pass a checkpoint folder or a Hub id you can access."
        ) from error
    if config.model_type not in ("llama", "llama_longlora"):
        raise ValueError(
            f"model_name_or_path is a {config.model_type!r} model; LongLoRA recipes train Llama-family checkpoints."
        )
    target = model_args.context_length or length
    if config.model_type == "llama_longlora" and target <= config.max_position_embeddings:
        return Path(source)
    base = Path(output_dir) / "base"
    if (base / "config.json").exists():
        existing = json.loads((base / "config.json").read_text())  # a resumed or repeated run
        if existing.get("max_position_embeddings", 0) >= target:
            return base
        raise ValueError(
            f"{base} holds a conversion to {existing.get('max_position_embeddings')} tokens, not {target}; remove it "
            "or use another output_dir."
        )
    # a Hub id: only what loading needs (one weight format, no `original/` folder), into the Hugging Face cache
    local = resolve_checkpoint(source, revision=model_args.model_revision)
    return convert_checkpoint(
        local,
        base,
        # a stock Llama trained within its own context still needs the LlamaLongLoRA class for S²
        target if target > config.max_position_embeddings else None,
        group_size_ratio=ll_args.s2_group_size_ratio,
        group_size=ll_args.s2_group_size,
        rope_type=model_args.rope_type,
        ceil=model_args.rope_ceil,
        link_weights=True,
        base_model=None if is_local(source) else source,
    )


def write_run_record(output_dir: str | Path, base: Path, model_args, ll_args, data_args, training_args) -> Path:
    """Record in `output_dir/longlora_hub.json` what the saved model is and how it was trained, for the model card
    `longlora-hub push` writes: the base's Hub id (a local `base` folder records it itself), the stage, data,
    context, S² settings and the main hyperparameters. Deterministic: no timestamps, so re-pushing an unchanged
    run changes nothing on the Hub."""
    from .convert import PROVENANCE_FILE, read_provenance

    source = model_args.model_name_or_path
    hub_source = None if source.startswith("builtin:") or Path(source).expanduser().exists() else source
    dataset = data_args.dataset_name
    record = {
        "kind": "full" if ll_args.trainable == "full" else "adapter",
        "base_model": read_provenance(base).get("base_model") or hub_source,
        "base_revision": model_args.model_revision if hub_source else None,
        "stage": ll_args.stage,
        "datasets": [dataset] if dataset and not dataset.startswith("builtin:") else [],
        "data": dataset or [Path(path).name for path in data_args.data_files or []],
        "context_length": model_args.context_length or training_args.max_length,
        "trainable": ll_args.trainable,
        "s2": {
            "enabled": ll_args.s2_attention,
            "group_size_ratio": ll_args.s2_group_size_ratio,
            "group_size": ll_args.s2_group_size,
            "shift": ll_args.s2_shift,
        },
        "training": {
            "max_length": training_args.max_length,
            "learning_rate": training_args.learning_rate,
            "per_device_train_batch_size": training_args.per_device_train_batch_size,
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "max_steps": training_args.max_steps,
            "num_train_epochs": training_args.num_train_epochs,
            "warmup_steps": training_args.warmup_steps,
            "weight_decay": training_args.weight_decay,
            "lr_scheduler_type": str(
                getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
            ),
            "bf16": training_args.bf16,
            "fp16": training_args.fp16,
            "attn_implementation": model_args.attn_implementation,
        },
    }
    path = Path(output_dir) / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def load_model_and_tokenizer(
    base: Path,
    model_args: ModelArguments,
    ll_args: LongLoRAArguments,
    data_args: DataArguments | None = None,
    length: int | None = None,
):
    """The LlamaLongLoRA model (with the run's S² settings) and its tokenizer; no vocabulary change. With
    `data_args.keep_documents_apart`, an S² group size given as a ratio is resolved against one row of `length`
    tokens (see [`data_collator`])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    kwargs = {}
    if ll_args.trainable == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    group_size = ll_args.s2_group_size
    if data_args is not None and data_args.keep_documents_apart and group_size is None:
        # a padding-free batch reaches the model as one row of B x `length` tokens, where the ratio would give groups
        # B times larger than a row gets alone: fix G to what one row of `length` tokens gets
        group_size = s2_group_size(length, None, ll_args.s2_group_size_ratio)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        trust_remote_code=True,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        s2_attention=ll_args.s2_attention,
        s2_group_size_ratio=ll_args.s2_group_size_ratio,
        s2_group_size=group_size,
        s2_shift=ll_args.s2_shift,
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)
    if tokenizer.pad_token is None:
        # pad with EOS rather than adding a token: a new row in the embedding breaks merging and other tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build_dataset(data_args: DataArguments, ll_args: LongLoRAArguments, tokenizer, length: int):
    raw = load_raw_dataset(
        data_args.dataset_name,
        data_args.data_files,
        split=data_args.dataset_split,
        streaming=data_args.streaming,
        dataset_config=data_args.dataset_config,
        num_builtin_rows=data_args.builtin_rows,
    )
    if ll_args.stage == "extend":
        return pack_documents(raw, tokenizer, length, data_args.text_field, data_args.keep_documents_apart)
    dataset = to_prompt_completion(raw, data_args.prompt_template, data_args.use_chat_template)
    if {"prompt", "completion", "messages"} <= set(dataset.column_names or []):
        # the LongQA builder writes both formats; TRL would pick one by set order, which varies with the hash seed
        dataset = dataset.remove_columns("messages")
    return drop_too_long(dataset, tokenizer, length)


def data_collator(data_args: DataArguments, tokenizer, training_args):
    r"""
    The collator for `SFTTrainer`: `None` (TRL's default) unless documents are kept apart.

    With `keep_documents_apart`, TRL's `DataCollatorForLanguageModeling` in padding-free mode: it reads each row's
    `seq_lengths`, flattens the batch into one row, builds `position_ids` that restart at every document (which
    S²-Attn and transformers' packed-sequence masks both read), drops the attention mask and sets the label of each
    document's first token to -100, so no token is predicted across a boundary. It is passed in rather than set with
    `padding_free: true` because `SFTTrainer` refuses that together with `max_length` on rows it does not pack itself;
    the rows here are already exactly `max_length` tokens.

    Args:
        data_args ([`DataArguments`]): The run's data settings.
        tokenizer (`PreTrainedTokenizerBase`): Its pad token pads the flattened row (only with `pad_to_multiple_of`).
        training_args (`SFTConfig`): Gives `pad_to_multiple_of`.
    """
    if not data_args.keep_documents_apart:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=training_args.pad_to_multiple_of
    )


def drop_too_long(dataset, tokenizer, length: int):
    """Truncating a QA example would cut its answer (the only scored part): drop the examples that do not fit,
    say how many, and refuse when none fit."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset) or not isinstance(dataset[0]["prompt"], str):
        return dataset  # streamed or conversational rows: TRL truncates; the numbers are not known up front
    sizes = [
        len(ids) + 1  # + EOS
        for ids in tokenizer(
            [p + c for p, c in zip(list(dataset["prompt"]), list(dataset["completion"]), strict=True)],
            add_special_tokens=True,
        )["input_ids"]
    ]
    keep = [index for index, size in enumerate(sizes) if size <= length]
    if not keep:
        raise ValueError(
            f"All {len(sizes)} examples are longer than max_length={length} (the shortest has {min(sizes)} tokens); "
            "raise max_length (and context_length), or filter the data."
        )
    if len(keep) < len(sizes):
        print(f"[longlora-hub] dropped {len(sizes) - len(keep)} of {len(sizes)} examples longer than {length} tokens")
        dataset = dataset.select(keep)
    return dataset


def peft_config(ll_args: LongLoRAArguments):
    return lora_config(
        ll_args.trainable, ll_args.lora_r, ll_args.lora_alpha, ll_args.lora_dropout, ll_args.lora_target_modules
    )


class TokensPerSecondCallback(TrainerCallback):
    """Adds `tokens_per_second` (input tokens of this process since the last log) to every log line."""

    def __init__(self):
        self.last_time = None
        self.last_tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if logs is not None and self.last_time is not None and tokens > self.last_tokens:
            elapsed = now - self.last_time
            if elapsed > 0 and not math.isclose(elapsed, 0):
                logs["tokens_per_second"] = round((tokens - self.last_tokens) / elapsed, 1)
        self.last_time, self.last_tokens = now, tokens


__all__ = [
    "DataArguments",
    "LongLoRAArguments",
    "ModelArguments",
    "TokensPerSecondCallback",
    "build_dataset",
    "check_arguments",
    "data_collator",
    "load_model_and_tokenizer",
    "peft_config",
    "prepare_base",
    "write_run_record",
]
