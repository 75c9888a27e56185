"""The reusable parts of `recipes/sft.py`: argument dataclasses, model loading with on-the-fly conversion,
dataset preparation per stage, and the checks that run before any training step.

Configuration flows one way: YAML (`--config`) -> these dataclasses and TRL's `SFTConfig` -> CLI overrides.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import types
import typing
import warnings
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainerCallback

from .builtin import PRETRAINED_TINY
from .convert import trust_remote_code_for
from .data import DEFAULT_TEMPLATE, load_raw_dataset, pack_documents, to_prompt_completion
from .log import get_logger, set_verbosity
from .remote_code.configuration_llama_longlora import check_s2_settings
from .remote_code.s2_attention import s2_group_size
from .trainable import LORA_TARGETS, TRAINABLE_MODES, lora_config, trainable_mode

logger = get_logger(__name__)

STAGES = ("extend", "longqa")
BUILTIN_MODELS = ("builtin:tiny-llama", "builtin:tiny-llama-3m", "builtin:tiny-llama-pretrained")
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
# what `prepare_base` made `output_dir/base` from, so that a later run reuses it only for the same model and settings.
# Its own file rather than a key of the base's `longlora_hub.json`: merged models copy that record, and this one
# holds local paths
CONVERSION_RECORD = "longlora_hub_conversion.json"
# the folders the Trainer saves checkpoints in (transformers' PREFIX_CHECKPOINT_DIR)
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# what a trainer leaves in output_dir, all made from output_dir/base: while any is there, base must not change
RUN_RESULTS = (
    "checkpoint-*",
    "adapter_config.json",
    "adapter_model.*",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "trainer_state.json",
    "training_args.bin",
)
# former recipe keys, accepted for one release as aliases of the names TRL's `ScriptArguments` uses (the same keys
# as in TRL's own scripts), with a FutureWarning; giving both with different values is an error
RENAMED_KEYS = {"dataset_split": "dataset_train_split", "streaming": "dataset_streaming"}


# Not subclasses of TRL's `ModelConfig` and `ScriptArguments`, though the keys they share have TRL's names: those
# classes would bring keys this recipe does not read (`use_peft`, `lora_task_type`, `load_in_8bit`, `load_in_4bit`,
# `bnb_4bit_quant_type`, `use_dora`, `lora_target_parameters`, `dataset_test_split`, ...; `trainable` decides PEFT
# and quantization here), listed as valid and silently ignored, and defaults that are not the paper's (`lora_r` 16,
# `lora_dropout` 0.05, `dtype` float32).
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
    # not read from the YAML or the command line itself: TRL's SFTConfig already has `trust_remote_code` (the key a
    # recipe sets) and a second field of that name would clash in the parser; check_arguments copies SFTConfig's value
    trust_remote_code: bool = field(
        default=False,
        init=False,
        metadata={
            "help": "Run the code of a checkpoint that is not this package's LlamaLongLoRA (see "
            "longlora_hub.convert.trust_remote_code_for); set from SFTConfig's trust_remote_code."
        },
    )


@dataclass
class LongLoRAArguments:
    stage: str = field(default="extend", metadata={"help": "extend (long plain text) or longqa (supervised QA)."})
    trainable: str = field(
        default="longlora",
        metadata={
            "help": "longlora (LoRA + embeddings + norms: the paper's, which it calls LoRA+), lora, full, or qlora "
            "(GPU: longlora on a 4-bit base). lora_plus, the former name of longlora, is accepted with a warning."
        },
    )
    # the LoRA keys have the names of TRL's ModelConfig; their defaults are the paper's
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "Projections that get LoRA."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "More modules trained in full and saved in the adapter (PEFT's modules_to_save), e.g. [lm_head]; "
            "added to what trainable implies (embed_tokens and the norms for longlora and qlora)."
        },
    )
    s2_attention: bool = field(default=True, metadata={"help": "Train with S²-Attn (full attention if false)."})
    s2_group_size_ratio: float = field(default=0.25, metadata={"help": "S² group size / sequence length."})
    s2_group_size: int | None = field(default=None, metadata={"help": "Absolute even S² group size (tokens)."})
    s2_shift: str = field(
        default="segments",
        metadata={"help": "segments (leak-free), roll (the paper's) or none (no shift: the ablation)."},
    )
    context_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Split each row's tokens over this many processes (S²-aware context parallelism: each layer "
            "exchanges a halo of G/2 tokens' keys and values with the next process); data parallel over the rest."
        },
    )

    def __post_init__(self):
        if isinstance(self.trainable, str):  # another type is named by check_arguments
            self.trainable = trainable_mode(self.trainable, stacklevel=3)


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
    # TRL's ScriptArguments names; unset (None) so that a clash with a former name is seen, then their default
    dataset_train_split: str | None = field(default=None, metadata={"help": "Split to train on; train when unset."})
    dataset_streaming: bool | None = field(
        default=None, metadata={"help": "Stream the data (corpora that do not fit on disk); false when unset."}
    )
    dataset_split: str | None = field(
        default=None, metadata={"help": "Former name of dataset_train_split, accepted until the next release."}
    )
    streaming: bool | None = field(
        default=None, metadata={"help": "Former name of dataset_streaming, accepted until the next release."}
    )
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

    def __post_init__(self):
        _resolve_renamed_keys(self, {"dataset_train_split": "train", "dataset_streaming": False})


def _resolve_renamed_keys(arguments, defaults: dict) -> None:
    """Move the values given under a former key (`RENAMED_KEYS`) to its new one, with a FutureWarning naming the new
    key; refuse both keys with different values; then give an unset new key its default. The former key is left
    unset, so that the dataclass holds each setting once."""
    for old, new in RENAMED_KEYS.items():
        given, current = getattr(arguments, old), getattr(arguments, new)
        if given is not None:
            if current is not None and current != given:
                raise ValueError(
                    f"{old}={given!r} and {new}={current!r} disagree: {old} is the former name of {new}. Keep "
                    f"{new} alone."
                )
            shown = json.dumps(given) if isinstance(given, bool) else given  # as YAML writes it: true, not True
            warnings.warn(
                f"{old} is now called {new} (the name TRL's scripts use); write {new}: {shown}. The name {old} will "
                "stop working in the next release.",
                FutureWarning,
                stacklevel=4,
            )
            setattr(arguments, new, given)
            setattr(arguments, old, None)
        if getattr(arguments, new) is None and new in defaults:
            setattr(arguments, new, defaults[new])


def check_arguments(model_args: ModelArguments, ll_args: LongLoRAArguments, data_args, training_args) -> None:
    """Every configuration error, before any model or data is loaded, each naming the fix; also resolves
    `training_args.resume_from_checkpoint` to the checkpoint folder to resume from, checked (see
    [`resume_checkpoint`])."""
    # `trust_remote_code: true` in a recipe lands in SFTConfig's field of that name (see ModelArguments)
    model_args.trust_remote_code = bool(getattr(training_args, "trust_remote_code", False))
    # an empty value on the command line (`--dataset_name ""`) means "not set", e.g. to switch to data_files
    data_args.dataset_name = data_args.dataset_name or None
    data_args.data_files = data_args.data_files or None
    _check_field_types(model_args, ll_args, data_args)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required: a Llama checkpoint folder, a Hub id or builtin:tiny-llama.")
    if ll_args.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {ll_args.stage!r}.")
    if ll_args.trainable not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {ll_args.trainable!r}.")
    if ll_args.trainable == "full" and ll_args.lora_modules_to_save:
        raise ValueError(
            f"lora_modules_to_save ({', '.join(ll_args.lora_modules_to_save)}) adds modules trained in full to a LoRA "
            "adapter; trainable: full trains every module already. Remove lora_modules_to_save, or pick a LoRA mode."
        )
    if model_args.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {model_args.dtype!r}.")
    if ll_args.trainable == "qlora":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "trainable: qlora needs a CUDA GPU and bitsandbytes (pip install 'longlora-hub[gpu]'); use longlora "
                "on this machine."
            )
    check_s2_settings(ll_args.s2_shift, ll_args.s2_group_size_ratio, ll_args.s2_group_size)
    if ll_args.lora_r < 1:
        raise ValueError(f"lora_r must be at least 1, got {ll_args.lora_r}; the paper uses 8.")
    length = training_args.max_length
    if length is None:
        raise ValueError(
            "max_length must be set: it is the training sequence length (the extend stage's row length), e.g. "
            "max_length: 8192."
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(
            f"max_length must be a whole number of tokens, at least 2, got {length!r}: it is the training sequence "
            "length (the extend stage's row length); set it to the context to train at, e.g. max_length: 8192."
        )
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
    _check_context_parallel(ll_args, training_args, length)
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
    training_args.resume_from_checkpoint = resume_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )


def _check_context_parallel(ll_args: LongLoRAArguments, training_args, length: int) -> None:
    """`context_parallel_size` against the launch, `max_length` and the S² group (see
    `longlora_hub.remote_code.s2_context_parallel`)."""
    import os

    size = ll_args.context_parallel_size
    if size < 1:
        raise ValueError(f"context_parallel_size must be at least 1, got {size}; 1 trains every row on one process.")
    if size == 1:
        return
    if not ll_args.s2_attention:
        raise ValueError(
            "context_parallel_size > 1 splits rows at S²-Attn's groups, but s2_attention is false (full attention "
            "needs every key on every process): set s2_attention: true, or context_parallel_size: 1."
        )
    if length % size:
        raise ValueError(
            f"max_length={length} must be a multiple of context_parallel_size={size}, so that every process holds "
            f"as many tokens of a row: use max_length: {length - length % size or size}."
        )
    group = ll_args.s2_group_size or s2_group_size(length, None, ll_args.s2_group_size_ratio)
    if group // 2 > length // size:
        raise ValueError(
            f"context_parallel_size={size} leaves {length // size} tokens of a row per process, fewer than half an "
            f"S² group ({group} tokens): use a context_parallel_size of at most {2 * length // group}."
        )
    if ll_args.stage == "longqa":  # rows are padded to the batch's longest: keep that length a multiple of P
        if training_args.pad_to_multiple_of is None:
            training_args.pad_to_multiple_of = size
        elif training_args.pad_to_multiple_of % size:
            raise ValueError(
                f"pad_to_multiple_of={training_args.pad_to_multiple_of} must be a multiple of "
                f"context_parallel_size={size}: padded rows must split evenly over the processes."
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % size:
        raise ValueError(
            f"context_parallel_size={size} must divide the number of processes, {world}: launch a multiple of {size} "
            f"processes (accelerate launch --num_processes {size * max(1, world // size)})."
        )


def enable_context_parallel(model, size: int):
    r"""
    Split every row's tokens over `size` processes during S² training: the processes are grouped in blocks of
    `size` consecutive ranks, and the model (LlamaLongLoRA, under PEFT or not) is given its group.

    Returns:
        The `ContextParallel` of this process's group, or `None` when `size` is 1.
    """
    if size == 1:
        return None
    import torch.distributed as dist

    from .remote_code.s2_context_parallel import ContextParallel

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):  # every process creates every group, in the same order
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    # a collective that every process of the group joins, before the first halo exchange: NCCL requires the first
    # operation on a communicator to be one all its ranks call, and a batch of point-to-point ops need not be (the
    # last rank of a row sends nothing without the roll)
    dist.barrier(group=mine)
    parallel = ContextParallel(mine)
    holders = [module for module in model.modules() if hasattr(module, "s2_context_parallel")]
    if not holders:
        raise ValueError(
            "context_parallel_size > 1 needs the LlamaLongLoRA architecture (its attention exchanges the halo); this "
            f"model is a {type(model).__name__}."
        )
    for module in holders:
        module.s2_context_parallel = parallel
    return parallel


def add_shard_labels(batch: dict, parallel) -> dict:
    """`batch` with `shift_labels` for this process's shard of its rows, beside the whole rows' `labels`: the
    convention of transformers' and TRL's context parallelism (labels shifted before the rows are cut, so the label of
    a shard's last token, the next shard's first token, is kept). Trainer then counts the tokens of each shard once,
    and TRL's fused LM head scores this shard's hidden states against them."""
    import torch.nn.functional as F

    labels = batch.get("shift_labels")
    if labels is None:
        labels = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]  # (B, N)
    length = labels.shape[1] // parallel.size
    batch["shift_labels"] = labels[:, parallel.rank * length : (parallel.rank + 1) * length].contiguous()  # (B, n)
    return batch


def share_batches_within_context_groups(dataloader, size: int):
    """The processes of one context-parallel group must read the same batches (each trains on its part of the same
    rows): accelerate's shard of the train dataloader is set to one shard per group instead of per process, the way
    transformers' Trainer re-shards a rank-aware sampler."""
    if size == 1:
        return dataloader
    from accelerate import PartialState
    from accelerate.data_loader import BatchSamplerShard, IterableDatasetShard

    state = PartialState()
    for shard in (getattr(dataloader, "batch_sampler", None), getattr(dataloader, "dataset", None)):
        if isinstance(shard, BatchSamplerShard | IterableDatasetShard):
            shard.num_processes = state.num_processes // size
            shard.process_index = state.process_index // size
            return dataloader
    if state.num_processes == size:  # one group: every process reads every batch already
        return dataloader
    raise RuntimeError(
        "context_parallel_size: the train dataloader was not sharded by accelerate as expected, so the processes of "
        "a context-parallel group would read different rows; report this with your accelerate version."
    )


def _check_field_types(*arguments) -> None:
    """Check each field of these dataclasses against its type. A YAML value reaches them as YAML typed it: TrlParser
    makes it the argparse default, which argparse converts only from a string, so `lora_r: 8.5` would stay a float
    and `s2_group_size_ratio: [0.25]` a list, to fail far from the config. A lone string where a list of strings is
    expected (`data_files: docs.jsonl`) becomes a one-item list, as the same flag gives on the command line."""
    wanted = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    for instance in arguments:
        hints = typing.get_type_hints(type(instance))
        for spec in fields(instance):
            name, value, hint = spec.name, getattr(instance, spec.name), hints[spec.name]
            options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            if value is None and (type(None) in options or spec.default is None):
                continue
            expected = next(option for option in options if option is not type(None))
            if expected not in wanted and typing.get_origin(expected) is not list:
                continue  # a type this check does not know is left to argparse and to what reads the field
            if typing.get_origin(expected) is list:
                if isinstance(value, str):
                    setattr(instance, name, [value])
                elif not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                    raise ValueError(
                        f"{name} must be a name or a list of names, got {value!r}; write e.g. {name}: [a, b] or "
                        f"{name}: a."
                    )
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(instance, name, float(value))
                continue
            if expected is int and isinstance(value, float) and value.is_integer():
                setattr(instance, name, int(value))  # `lora_r: 8.0`, as a sweep tool may write it
                continue
            if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
                continue
            if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], list):
                fix = f"write {name}: {value[0]} (one value, no brackets)"
            elif expected is int and isinstance(value, float):
                fix = f"write a whole number, e.g. {name}: {round(value)}"
            elif expected is str and isinstance(value, int | float):
                fix = f'quote it: {name}: "{value}"'
            elif expected is bool and isinstance(value, str):
                fix = f"write {name}: true or {name}: false, without quotes"
            else:
                fix = f"see `python recipes/sft.py --help` for what {name} takes"
            raise ValueError(f"{name} must be {wanted[expected]}, got {value!r} ({type(value).__name__}); {fix}.")


def resume_checkpoint(resume: str | bool | None, output_dir: str | Path) -> str | None:
    r"""
    The checkpoint a run resumes from, checked before any model is loaded.

    Args:
        resume (`str`, `bool` or `None`):
            `resume_from_checkpoint` as parsed: a checkpoint folder, `True` (or the string `"true"`, which is what
            `--resume_from_checkpoint true` gives: `SFTConfig` types the field as a path) for the last checkpoint in
            `output_dir`, or `False`/`None`/`"false"` for a new run. A folder really named `true` is `./true`.
        output_dir (`str` or `Path`): The run's folder, where `True` looks for `checkpoint-N` folders.

    Returns:
        `str` or `None`: The checkpoint folder, or `None` for a new run.

    Raises:
        `ValueError`: If there is no such checkpoint, or a file the Trainer reads on resume (trainer state, weights,
            optimizer, scheduler, RNG states) is empty, truncated or not valid JSON; the message names the last
            intact checkpoint of the run, if any.
    """
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false"):
        resume = resume.strip().lower() == "true"
    if resume is None or resume is False or resume == "":
        return None
    if resume is True:
        found = _checkpoints(Path(output_dir))
        if not found:
            raise ValueError(
                f"resume_from_checkpoint is true, but {output_dir} holds no checkpoint-N folder to resume from; drop "
                "resume_from_checkpoint to start a new run, or pass the checkpoint folder itself."
            )
        folder = found[-1]
    else:
        folder = Path(resume).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"resume_from_checkpoint: no checkpoint folder at {resume}; pass a checkpoint-N folder an earlier run "
                "saved (output_dir/checkpoint-N), or true for the last one in output_dir."
            )
    problem = _checkpoint_problem(folder)
    if problem is None:
        return str(folder)
    step = _checkpoint_step(folder)
    earlier = [other for other in _checkpoints(folder.parent) if step is None or _checkpoint_step(other) < step]
    intact = next((other for other in reversed(earlier) if _checkpoint_problem(other) is None), None)
    if intact is not None:
        fix = f"resume from {intact}, the last intact checkpoint (--resume_from_checkpoint {intact})"
    else:
        fix = "no earlier checkpoint of this run is intact: start a new run without resume_from_checkpoint"
    raise ValueError(f"Cannot resume from {folder}: {problem}; {fix}.")


def _checkpoint_step(folder: Path) -> int | None:
    found = CHECKPOINT_NAME.match(folder.name)
    return int(found.group(1)) if found else None


def _checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of a run, by step."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and _checkpoint_step(path) is not None]
    return sorted(found, key=_checkpoint_step)


def _checkpoint_problem(folder: Path) -> str | None:
    """What keeps the Trainer from resuming from `folder`, found without loading anything: a missing trainer state,
    missing weights, or a file it reads that is empty, cut short (a save interrupted by a crash or a full disk) or
    not valid JSON. Bytes damaged inside a file are left for the loaders to find."""
    if not (folder / "trainer_state.json").is_file():
        return "it has no trainer_state.json (its save did not finish)"
    weights = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "model.safetensors.index.json")
    found = any((folder / name).is_file() for name in weights) or any(folder.glob("pytorch_model*.bin"))
    if not found and not any(path.is_dir() for path in folder.iterdir()):  # FSDP and DeepSpeed save in subfolders
        return "it holds no model or adapter weights (its save did not finish)"
    for path in sorted(folder.iterdir()):
        # training_args.bin is not read on resume: the run's own arguments apply
        if not path.is_file() or path.name == "training_args.bin":
            continue
        problem = _saved_file_problem(path)
        if problem:
            return f"{path.name} is {problem}"
    return None


def _saved_file_problem(path: Path) -> str | None:
    """How a file the Trainer saved is damaged, from its structure alone, or `None`."""
    size = path.stat().st_size
    if size == 0 and path.suffix in (".json", ".safetensors", ".pt", ".pth", ".bin"):
        return "empty (0 bytes)"
    if path.suffix == ".json":
        try:
            json.loads(path.read_bytes())
        except ValueError as error:
            return f"not valid JSON ({error}): cut short or overwritten"
    elif path.suffix == ".safetensors":
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
            try:
                header = json.loads(handle.read(length)) if 8 + length <= size else None
            except ValueError:
                header = None
        try:
            ends = [int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"]
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):  # no header, or one without offsets
            return "not a readable safetensors file (its header is cut short or damaged)"
        expected = 8 + length + max(ends, default=0)
        if size < expected:
            return f"cut short ({size} bytes of the {expected} its header describes)"
    elif path.suffix in (".pt", ".pth", ".bin"):
        with path.open("rb") as handle:
            is_archive = handle.read(4) == b"PK\x03\x04"  # torch.save's zip format; a legacy pickle is left alone
        if is_archive:
            try:
                zipfile.ZipFile(path).close()  # reads the central directory, written last: a cut file has none
            except zipfile.BadZipFile:
                return "cut short (its archive has no central directory)"
    return None


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
    adapter then names as its base. Only the main process writes; call it under `main_process_first`.

    `output_dir/base` records what it was made from (`CONVERSION_RECORD`: the model, its revision and the settings
    the conversion writes) and is reused only when all of those are this run's, as when resuming. Otherwise it is
    converted again when nothing depends on it (`output_dir` holds no adapter, model or checkpoint, and `base` only
    what a conversion writes: links to the weights are removed, never the weights), and refused when something does:
    rebuilding it would silently change the model that run's adapter and checkpoints name as their base."""
    from .convert import convert_checkpoint, is_local, resolve_checkpoint

    source = model_args.model_name_or_path
    if source.startswith("builtin:"):
        # a folder per builtin model: switching models in one output_dir must not find the other one's weights
        source = str(_builtin_base(source, Path(output_dir) / "builtin-base" / source.removeprefix("builtin:")))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source,
            revision=model_args.model_revision,
            trust_remote_code=trust_remote_code_for(
                source, model_args.model_revision, model_args.trust_remote_code, "trust_remote_code: true"
            ),
        )
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
    # a stock Llama trained within its own context still needs the LlamaLongLoRA class for S²
    context = target if target > config.max_position_embeddings else None
    wanted = conversion_record(model_args, ll_args, context)
    if base.exists() or base.is_symlink():
        if read_conversion_record(base) == wanted:
            return base  # a resumed or repeated run
        _remove_stale_base(base, wanted, Path(output_dir))
    # a Hub id: only what loading needs (one weight format, no `original/` folder), into the Hugging Face cache
    local = resolve_checkpoint(source, revision=model_args.model_revision)
    converted = convert_checkpoint(
        local,
        base,
        context,
        group_size_ratio=ll_args.s2_group_size_ratio,
        group_size=ll_args.s2_group_size,
        rope_type=model_args.rope_type,
        ceil=model_args.rope_ceil,
        link_weights=True,
        base_model=None if is_local(source) else source,
    )
    (converted / CONVERSION_RECORD).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
    return converted


def conversion_record(model_args: ModelArguments, ll_args: LongLoRAArguments, context: int | None) -> dict:
    r"""
    What `prepare_base` converts `output_dir/base` from, as written to its `CONVERSION_RECORD`: two runs with the
    same record get the same base.

    Args:
        model_args ([`ModelArguments`]): The model, its revision, and the RoPE type and rounding of the extension.
        ll_args ([`LongLoRAArguments`]): The S² group settings the converted config carries.
        context (`int` or `None`): The context the base is extended to, or `None` when it keeps its own.

    Returns:
        `dict`: Keyed by the option names, so a difference reads as the option to change back.
    """
    from .convert import is_local

    source = model_args.model_name_or_path
    local = not source.startswith("builtin:") and is_local(source)
    return {
        # a folder by its absolute path, so that `./model` and `/home/me/model` are the same model
        "model_name_or_path": str(Path(source).expanduser().resolve()) if local else source,
        "model_revision": None if local or source.startswith("builtin:") else model_args.model_revision,
        "context_length": context,
        # without an extension the RoPE is left as it is: its settings change nothing
        "rope_type": model_args.rope_type if context else None,
        "rope_ceil": model_args.rope_ceil if context else None,
        "s2_group_size_ratio": ll_args.s2_group_size_ratio,
        "s2_group_size": ll_args.s2_group_size,
    }


def read_conversion_record(base: str | Path) -> dict | None:
    """The `CONVERSION_RECORD` of a base `prepare_base` made, or `None` if it has none that is readable."""
    try:
        found = json.loads((Path(base) / CONVERSION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _remove_stale_base(base: Path, wanted: dict, output_dir: Path) -> None:
    """Remove a base that `wanted` does not describe when nothing depends on it; otherwise say how to go on."""
    from fnmatch import fnmatchcase

    found = read_conversion_record(base)
    if found is None:
        what = (
            f"{base} does not record what it was converted from (an older longlora-hub made it, or its conversion "
            "was interrupted)"
        )
    else:
        changes = ", ".join(
            f"{key} {found.get(key)!r} -> {value!r}" for key, value in wanted.items() if found.get(key) != value
        )
        what = f"{base} was converted for other settings ({changes})"
    results = sorted(
        entry.name for entry in output_dir.iterdir() if any(fnmatchcase(entry.name, p) for p in RUN_RESULTS)
    )
    if results:
        shown = ", ".join(results[:4]) + (", ..." if len(results) > 4 else "")
        fix = (
            f"delete {base} to have it converted again for this run only if these are that run's settings"
            if found is None
            else "to resume that run, give its settings back"
        )
        raise ValueError(
            f"{what}, and the run in {output_dir} ({shown}) names it as its base, so it is not rebuilt under that run. "
            f"Pass another output_dir; or, {fix}; or delete {output_dir} to start over."
        )
    strays = _not_from_a_conversion(base)
    if strays:
        raise ValueError(
            f"{what}, and it holds what a conversion does not write ({', '.join(strays[:4])}), so it is not removed. "
            f"Move those out of {base}, or pass another output_dir."
        )
    logger.info(f"{what}: converting it again")
    for entry in base.iterdir():
        entry.unlink()  # a link to the source's weights goes, never the weights it points to
    base.rmdir()


def _not_from_a_conversion(base: Path) -> list[str]:
    """The entries of `base` that `convert_checkpoint(..., link_weights=True)` and `prepare_base` do not write:
    folders, weight files that are not links (a copy someone made) and files of other names."""
    from fnmatch import fnmatchcase

    from .convert import OTHER_PATTERNS, PROVENANCE_FILE, TOKENIZER_PATTERNS, WEIGHT_FORMATS, remote_code_files

    if base.is_symlink() or not base.is_dir():
        return [base.name]
    written = {"config.json", PROVENANCE_FILE, CONVERSION_RECORD, *(path.name for path in remote_code_files())}
    written.update(index for _, index in WEIGHT_FORMATS)
    patterns = (*TOKENIZER_PATTERNS, *OTHER_PATTERNS)
    strays = []
    for entry in sorted(base.iterdir()):
        if entry.name.endswith((".safetensors", ".bin")):
            ours = entry.is_symlink()
        else:
            ours = entry.is_file() and (entry.name in written or any(fnmatchcase(entry.name, p) for p in patterns))
        if not ours:
            strays.append(entry.name)
    return strays


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
        # revision None: the checkpoint is loaded from its default branch, so its code is checked there
        trust_remote_code=trust_remote_code_for(base, None, model_args.trust_remote_code, "trust_remote_code: true"),
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        s2_attention=ll_args.s2_attention,
        s2_group_size_ratio=ll_args.s2_group_size_ratio,
        s2_group_size=group_size,
        s2_shift=ll_args.s2_shift,
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        base,
        trust_remote_code=trust_remote_code_for(base, None, model_args.trust_remote_code, "trust_remote_code: true"),
    )
    if tokenizer.pad_token is None:
        # pad with EOS rather than adding a token: a new row in the embedding breaks merging and other tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_data(data_args: DataArguments):
    """The run's raw rows (local JSON files checked line by line first). The recipe reads them before converting or
    loading the model, so that a data error takes seconds, not a model load."""
    return load_raw_dataset(
        data_args.dataset_name,
        data_args.data_files,
        split=data_args.dataset_train_split,
        streaming=data_args.dataset_streaming,
        dataset_config=data_args.dataset_config,
        num_builtin_rows=data_args.builtin_rows,
    )


def build_dataset(data_args: DataArguments, ll_args: LongLoRAArguments, tokenizer, length: int, raw=None):
    r"""
    The training set of the run's stage: packed rows of `length` tokens (extend), or prompt/completion examples that
    fit in `length` tokens (longqa).

    Args:
        data_args ([`DataArguments`]): The data and how to read it.
        ll_args ([`LongLoRAArguments`]): The stage, and the S² group size the longqa examples are compared with.
        tokenizer (`PreTrainedTokenizerBase`): The model's tokenizer.
        length (`int`): `max_length`.
        raw (`Dataset` or `IterableDataset`, *optional*): What [`load_data`] returned; read here when not given.
    """
    raw = load_data(data_args) if raw is None else raw
    if ll_args.stage == "extend":
        return pack_documents(raw, tokenizer, length, data_args.text_field, data_args.keep_documents_apart)
    dataset = to_prompt_completion(raw, data_args.prompt_template, data_args.use_chat_template)
    if {"prompt", "completion", "messages"} <= set(dataset.column_names or []):
        # the LongQA builder writes both formats; TRL would pick one by set order, which varies with the hash seed
        dataset = dataset.remove_columns("messages")
    return drop_too_long(dataset, tokenizer, length, ll_args.s2_group_size if ll_args.s2_attention else None)


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


def drop_too_long(dataset, tokenizer, length: int, group_size: int | None = None):
    """Truncating a QA example would cut its answer (the only scored part): drop the examples that do not fit,
    say how many, and refuse when none fit. Warn when an absolute S² `group_size` is above every example kept: a
    batch is padded to its longest example, so each row would fit in one group and S²-Attn would save nothing."""
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
        logger.info(f"dropped {len(sizes) - len(keep)} of {len(sizes)} examples longer than {length} tokens")
        dataset = dataset.select(keep)
    longest = max(sizes[index] for index in keep)
    if group_size is not None and group_size > longest:
        logger.warning(
            f"s2_group_size={group_size} is above the longest example ({longest} tokens), so every row fits in one S² "
            "group: training is close to full attention and S²-Attn saves nothing. Lower s2_group_size, or leave it "
            "unset so that s2_group_size_ratio sizes the groups of each batch."
        )
    return dataset


def peft_config(ll_args: LongLoRAArguments):
    return lora_config(
        ll_args.trainable,
        ll_args.lora_r,
        ll_args.lora_alpha,
        ll_args.lora_dropout,
        ll_args.lora_target_modules,
        extra_modules_to_save=ll_args.lora_modules_to_save or (),
    )


def is_main_process() -> bool:
    """Whether this is the first process of the run (or the only one): `RANK`, which `accelerate launch` and
    `torchrun` set for every process, is 0 or unset. Read from the environment, so that it is known before the
    arguments (and with them the distributed state) exist."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def set_process_verbosity(training_args=None) -> None:
    r"""
    Let the main process alone print the run's messages: every process reads the same data and settings, so the
    others would only repeat them (4 nodes of 8 GPUs: 32 copies of "dropped 3 examples").

    On the main process this package's messages follow `training_args.log_level` (left as they are, INFO unless
    set otherwise, when it is `passive`, the default). On the others only errors are printed, unless
    `log_level_replica` asks for more than its default `warning`, and `FutureWarning`s (deprecations, a renamed key's
    among them: the same on every process) are not shown. Transformers' own messages follow the same two settings
    (the Trainer sets them).

    Args:
        training_args (`SFTConfig`, *optional*):
            The run's arguments; without them (before parsing), only the split between main and other processes.
    """
    if not is_main_process():
        level = logging.ERROR
        replica = getattr(training_args, "log_level_replica", "warning")
        if replica not in ("warning", "passive"):
            level = training_args.get_process_log_level()
        set_verbosity(level)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return
    if getattr(training_args, "log_level", "passive") != "passive":
        set_verbosity(training_args.get_process_log_level())


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
    "CONVERSION_RECORD",
    "DataArguments",
    "LongLoRAArguments",
    "ModelArguments",
    "RENAMED_KEYS",
    "TokensPerSecondCallback",
    "build_dataset",
    "check_arguments",
    "conversion_record",
    "add_shard_labels",
    "data_collator",
    "enable_context_parallel",
    "is_main_process",
    "load_data",
    "load_model_and_tokenizer",
    "peft_config",
    "prepare_base",
    "read_conversion_record",
    "resume_checkpoint",
    "set_process_verbosity",
    "share_batches_within_context_groups",
    "write_run_record",
]
