"""Merge a LongLoRA adapter (LoRA + trained embeddings and norms) into its base, streamed tensor by tensor.

The base's safetensors files are read one tensor at a time (`readinto`, no memory map), the LoRA delta
`scale · B @ A` is added in fp32 where the adapter has one, a trained module (`modules_to_save`: embeddings, norms)
replaces the base's tensor, and the result is cast and appended to the output shard at once. Peak memory is the
adapter plus about one tensor (the largest, in fp32), whatever the model's size: a 70B merge fits a workstation.

The output is a complete checkpoint: safetensors files planned by huggingface_hub as `save_pretrained` plans them
(`model.safetensors`, or `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`), `config.json` with
the base's RoPE (Position Interpolation in `rope_parameters` and the legacy `rope_scaling`/`rope_theta`) and its
`dtype` also as `torch_dtype` (what transformers 4.x and other engines read), the tokenizer and generation config,
and either the LlamaLongLoRA remote code (`architecture="llama_longlora"`: S² training can continue) or a stock Llama
config (`architecture="llama"`: any engine loads it without `trust_remote_code`; inference uses standard attention
either way).

A tied base (`tie_word_embeddings`, no `lm_head.weight` in its files, like SmolLM2 or Llama-3.2-1B) whose embedding or
`lm_head` the adapter changes comes out untied: PEFT applies the change to that layer alone, so the merge writes
`lm_head.weight` (read from the base's embedding, then changed only by the adapter's own `lm_head` changes) and sets
`tie_word_embeddings: false`. Otherwise the tie is kept and no `lm_head.weight` is written.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .convert import (
    OTHER_PATTERNS,
    PROVENANCE_FILE,
    SUPPORTED_MODEL_TYPES,
    TOKENIZER_PATTERNS,
    build_config,
    create_staging,
    finish_staging,
    read_config_file,
    read_json_object,
    read_license,
    read_provenance,
    remote_code_files,
    resolve_checkpoint,
)
from .log import get_logger, progress_bar
from .rope import legacy_rope_fields, read_rope
from .shards import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFETENSORS_INDEX,
    ShardWriter,
    TensorEntry,
    parse_size,
    plan_shards,
    read_header,
    read_tensor,
    write_index,
)
from .trainable import RENAMED_MODES

if TYPE_CHECKING:
    from huggingface_hub import StateDictSplit

ARCHITECTURES = ("llama_longlora", "llama")
RUN_RECORD_KEYS = (
    "base_model",
    "base_revision",
    "stage",
    "datasets",
    "data",
    "context_length",
    "trainable",
    "s2",
    "training",
)
DTYPE_CHOICES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
INPUT_EMBEDDING = "model.embed_tokens.weight"
OUTPUT_EMBEDDING = "lm_head.weight"  # absent from a tied base's files: transformers ties it to the input embedding
# config keys that only LlamaLongLoRA understands; a stock Llama config must not carry them
LONGLORA_CONFIG_KEYS = ("auto_map", "s2_attention", "s2_group_size_ratio", "s2_group_size", "s2_shift")

# What the merge does with every field of an `adapter_config.json` (PEFT 0.21's `LoraConfig` and `PeftConfig`). It is
# an allowlist: a field named nowhere here (a newer PEFT's) passes only at its default, so a setting that changes what
# the adapter computes is refused, never merged as if it were plain LoRA.
MERGE_IRRELEVANT_FIELDS = frozenset(
    {
        # bookkeeping (the base's name and revision are read, as defaults for --base)
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "runtime_config",
        # which modules carry LoRA, at what rank, and what was trained in full: the adapter's tensors say it, and
        # every one is checked against the base's tensors
        "r",
        "rank_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "ensure_weight_tying",
        # training only: dropout, and VeLoRA (a lighter backward pass; its forward is plain LoRA, its buffer is
        # skipped)
        "lora_dropout",
        "velora_config",
        # how the factors started; the trained factors are what they are (the inits that change the base weights
        # are refused through `init_lora_weights`)
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        # PEFT turns fan_in_fan_out off for every nn.Linear (and embeddings ignore it): a Llama has no Conv1D layer
        "fan_in_fan_out",
        "qalora_group_size",  # read only with use_qalora, refused below
        "megatron_core",  # read only with megatron_config, refused below
    }
)
MERGE_WITH_PEFT = "merge it with PEFT's `merge_and_unload()` instead"
# fields the merge refuses unless they are unset (absent, null, false or empty): why, and what to do instead
REFUSED_FIELDS = {
    "use_dora": ("DoRA rescales every adapted weight by a trained magnitude", MERGE_WITH_PEFT),
    "lora_bias": ("its LoRA B matrices carry biases, which a Llama projection does not have", MERGE_WITH_PEFT),
    "trainable_token_indices": (
        "it trains single rows of the embedding, which this merge does not read",
        MERGE_WITH_PEFT,
    ),
    "alora_invocation_tokens": (
        "Activated LoRA acts only from its invocation tokens on, which no merged weight can do",
        "serve the adapter unmerged (PEFT, vLLM)",
    ),
    "use_qalora": ("QALoRA's A matrix reads group-pooled inputs of a GPTQ-quantised layer", MERGE_WITH_PEFT),
    "monteclora_config": ("MonteCLoRA samples its factors around trained means", MERGE_WITH_PEFT),
    "use_bdlora": (
        "BD-LoRA stores block-diagonal factors, not the plain A and B this merge multiplies",
        MERGE_WITH_PEFT,
    ),
    "arrow_config": (
        "Arrow routes each token among several LoRA experts, which no merged weight can do",
        "serve the adapters unmerged",
    ),
    "kasa_config": ("KaSA truncates the base weights and puts a trained diagonal between A and B", MERGE_WITH_PEFT),
    "layer_replication": (
        "the adapted model repeats base layers, so it has more layers than the base",
        MERGE_WITH_PEFT,
    ),
    "target_parameters": (
        "it adapts bare parameters (MoE experts), not the Llama projections this merge reads",
        MERGE_WITH_PEFT,
    ),
    "megatron_config": (
        "it adapts Megatron's parallel layers, whose tensors are not laid out like a Hugging Face Llama's",
        "merge it in Megatron with PEFT's `merge_and_unload()`",
    ),
}
# `init_lora_weights` values that start LoRA's factors and leave the base alone
PLAIN_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# inits that change the base weights: PEFT recomputes the change whenever it loads the adapter
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga")
LORA_BIAS_MODES = ("none", "all", "lora_only")  # biases trained as well are in the adapter's tensors
# fields checked for the values a plain merge supports, one by one (in `_check_adapter_config`)
CHECKED_FIELDS = frozenset({"peft_type", "lora_alpha", "alpha_pattern", "use_rslora", "bias", "init_lora_weights"})


logger = get_logger(__name__)


class MergeError(ValueError):
    """The adapter and the base do not fit together, or an input is not what a merge needs."""


@dataclass
class LoraDelta:
    """One LoRA pair: the base weight gains `scale * B @ A` (transposed for embeddings)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of `delta()`, without computing it."""
        shape = (self.lora_b.shape[0], self.lora_a.shape[1])  # (out, r) @ (r, in) -> (out, in)
        return shape[::-1] if self.transpose else shape

    def delta(self) -> torch.Tensor:
        product = self.lora_b.float() @ self.lora_a.float()  # (out, r) @ (r, in) -> (out, in)
        return (product.T if self.transpose else product) * self.scale


@dataclass
class Adapter:
    """A PEFT LoRA adapter, keyed by the names of the base's tensors it changes."""

    folder: Path
    config: dict[str, Any]
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def targets(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup (`peft.utils.other.get_pattern_key`): the first key that, as a
    regular expression, matches the module's name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, dict | list | str) and not value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _peft_defaults() -> dict[str, Any]:
    """The defaults of the installed PEFT's `LoraConfig`, for fields this module does not know."""
    try:
        from peft import LoraConfig
    except ImportError:
        return {}
    defaults = {}
    for config_field in dataclasses.fields(LoraConfig):
        if config_field.default is not dataclasses.MISSING:
            defaults[config_field.name] = config_field.default
        elif config_field.default_factory is not dataclasses.MISSING:
            defaults[config_field.name] = config_field.default_factory()
    return defaults


def _check_adapter_config(config: dict[str, Any], config_path: Path) -> None:
    r"""
    Refuse an adapter the merge cannot reproduce exactly, from its `adapter_config.json` alone (before any tensor).

    Every field PEFT 0.21 writes is classified: bookkeeping, training-time and init-only settings
    ([`MERGE_IRRELEVANT_FIELDS`]) take any value; [`CHECKED_FIELDS`] (`peft_type`, `lora_alpha`, `alpha_pattern`,
    `use_rslora`, `bias`, `init_lora_weights`) must hold values a plain merge supports; the LoRA variants of
    [`REFUSED_FIELDS`] must be unset. Any other field, from a newer PEFT, must be unset or at the installed PEFT's
    default.

    Raises:
        `MergeError`: Naming the field, its value and what to do instead.
    """
    where = f"{config_path}:"
    if config.get("peft_type") != "LORA":
        raise MergeError(
            f"{where} peft_type={config.get('peft_type')!r}: only LoRA adapters (peft_type 'LORA') can be merged "
            "here; merge other PEFT methods with PEFT's `merge_and_unload()`."
        )
    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        raise MergeError(f"{where} lora_alpha={alpha!r} is not a number; restore it from the training run.")
    patterns = config.get("alpha_pattern")
    if not _is_unset(patterns) and (
        not isinstance(patterns, dict) or not all(_is_number(value) for value in patterns.values())
    ):
        raise MergeError(
            f"{where} alpha_pattern={patterns!r} does not map module patterns to numbers; restore it from the "
            "training run."
        )
    if config.get("use_rslora") not in (None, True, False):  # alpha / sqrt(r) when true, alpha / r otherwise
        raise MergeError(f"{where} use_rslora={config['use_rslora']!r} is not true or false; restore it.")
    if (config.get("bias") or "none") not in LORA_BIAS_MODES:
        raise MergeError(
            f"{where} bias={config['bias']!r} is none of {', '.join(LORA_BIAS_MODES)}; restore it from the training "
            "run."
        )
    init = True if config.get("init_lora_weights") is None else config["init_lora_weights"]
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise MergeError(
            f"{where} init_lora_weights={init!r} changes the base weights, and PEFT recomputes that change each time "
            "it loads the adapter, so a merge into the plain base would differ from it. Convert the adapter to plain "
            "LoRA first (save it with `save_pretrained(..., path_initial_model_for_weight_conversion=...)`, as PEFT's "
            "guide shows) and merge the converted adapter, or " + MERGE_WITH_PEFT + "."
        )
    if init == "loftq":
        raise MergeError(
            f"{where} init_lora_weights='loftq': PEFT quantises the base weights again each time it loads this "
            f"adapter, so a merge into the plain base would differ from it; {MERGE_WITH_PEFT}."
        )
    if init not in PLAIN_LORA_INITS:
        raise MergeError(
            f"{where} init_lora_weights={init!r} is an initialisation this merge does not know; {MERGE_WITH_PEFT}."
        )
    defaults: dict[str, Any] | None = None
    for key, value in config.items():
        if key in MERGE_IRRELEVANT_FIELDS or key in CHECKED_FIELDS or _is_unset(value):
            continue
        if key in REFUSED_FIELDS:
            why, instead = REFUSED_FIELDS[key]
            raise MergeError(f"{where} {key}={value!r}: {why}; {instead}.")
        defaults = _peft_defaults() if defaults is None else defaults
        if key in defaults and value == defaults[key]:
            continue
        raise MergeError(
            f"{where} {key}={value!r} is a setting this merge does not know (from a newer PEFT?), so it cannot tell "
            f"whether a plain LoRA merge reproduces the adapter; {MERGE_WITH_PEFT}, or update longlora-hub."
        )


def _adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"No adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) in {folder}; pass the folder the trainer saved."
    )


def load_adapter(folder: str | Path) -> Adapter:
    r"""
    Read a PEFT LoRA adapter folder into the changes it makes to its base's tensors.

    Raises:
        `FileNotFoundError`: No `adapter_config.json` or adapter weights in the folder.
        `MergeError`: Not a LoRA adapter, or one whose `adapter_config.json` sets anything a plain merge
            (`W + scale · B @ A`, trained tensors copied) cannot express (see [`_check_adapter_config`]).
    """
    folder = Path(folder).expanduser()
    config_path = folder / "adapter_config.json"
    hint = " (a trainer output keeps its final adapter at the top)" if any(folder.glob("checkpoint-*")) else ""
    config = read_json_object(
        config_path,
        f"No adapter_config.json in {folder}; pass a PEFT adapter folder{hint}.",
        "the training run",
        error=MergeError,
    )
    _check_adapter_config(config, config_path)
    adapter = Adapter(folder, config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _adapter_state(folder).items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if match:
            module = match.group(1) or match.group(3)
            part = match.group(2) or match.group(4)
            pairs.setdefault(module, {})[part] = tensor
        elif name.endswith(".lora_velora_embed"):
            continue  # VeLoRA's activation-compression buffer: used by the backward pass only
        elif ".lora_" in name or "lora_magnitude" in name:
            raise MergeError(f"{folder}: adapter tensor {key!r} is of a kind this merge does not know.")
        elif re.search(r"\.base_layer\.(weight|bias)$", name):
            # a tensor of a LoRA-wrapped layer: PEFT's copy of a targeted embedding or lm_head (`save_embedding_layers`,
            # on by default for them), or a bias trained with `bias="all"`/`"lora_only"`. `PeftModel` loads it over
            # the base's tensor, and the LoRA delta applies on top
            adapter.replacements[re.sub(r"\.base_layer\.(weight|bias)$", r".\1", name)] = tensor
        else:  # a module trained in full (modules_to_save): its tensor replaces the base's
            adapter.replacements[name] = tensor
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_name not in parts or b_name not in parts:
            raise MergeError(f"{folder}: the LoRA pair of {module} is incomplete; the adapter file is damaged.")
        lora_a, lora_b = parts[a_name], parts[b_name]
        rank = lora_a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        # PEFT keeps embeddings' factors transposed; fan_in_fan_out it ignores for nn.Linear, as Llama has no Conv1D
        adapter.deltas[f"{module}.weight"] = LoraDelta(lora_a, lora_b, float(scale), transpose=embedding)
    return adapter


def _base_files(folder: Path) -> list[Path]:
    """The base's safetensors files, in index order."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise MergeError(
                f"{index} is not a valid weights index ({type(error).__name__}: {error}); restore it from the original "
                "checkpoint."
            ) from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} names {len(missing)} weight files the base does not hold (e.g. {missing[0]}); pass a "
                "complete checkpoint, or restore the missing shards from the original."
            )
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")):
        raise MergeError(
            f"The base at {folder} has PyTorch .bin weights; the streamed merge reads safetensors. Convert the base "
            "once with `AutoModelForCausalLM.from_pretrained(base).save_pretrained(new_folder)` and pass --base."
        )
    raise FileNotFoundError(f"No model.safetensors or {SAFETENSORS_INDEX} in {folder}; pass a complete checkpoint.")


def _plan_shards(
    entries: list[tuple[Path, TensorEntry]], dtype: torch.dtype | None, max_shard_size: int
) -> tuple[StateDictSplit, dict[str, tuple[Path, TensorEntry, torch.dtype]]]:
    """The output files, planned by huggingface_hub from the output tensors' shapes and dtypes in base order (see
    [`~shards.plan_shards`]), and where each tensor comes from with the dtype it is written in."""
    sources: dict[str, tuple[Path, TensorEntry, torch.dtype]] = {}
    for path, entry in entries:
        out_dtype = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
        sources[entry.name] = (path, entry, out_dtype)
    split = plan_shards(
        [(name, entry.shape, out_dtype) for name, (_, entry, out_dtype) in sources.items()], max_shard_size
    )
    return split, sources


def _untied_output(
    config: dict[str, Any], entries: list[tuple[Path, TensorEntry]], adapter: Adapter
) -> tuple[Path, TensorEntry] | None:
    r"""
    The `lm_head.weight` a tied base (`tie_word_embeddings`, no `lm_head.weight` in its files) needs in the merge, or
    `None` when the merged model keeps the tie.

    PEFT does not keep the tie of an adapted layer: `modules_to_save` trains a copy of the embedding while `lm_head`
    stays tied to the frozen original, and a LoRA on `embed_tokens` or `lm_head` changes only that layer. The merged
    model then needs both tensors and `tie_word_embeddings: false`. The returned entry points at the base's embedding
    bytes under the new name, so the output layer is read, changed by the adapter's own `lm_head` changes if any,
    cast and written like any other tensor. PEFT's `ensure_weight_tying` saves one trained tensor under both names;
    then the tie holds and the duplicate is dropped from `adapter`.
    """
    by_name = {entry.name: (path, entry) for path, entry in entries}
    if not config.get("tie_word_embeddings") or OUTPUT_EMBEDDING in by_name or INPUT_EMBEDDING not in by_name:
        return None
    head, embedding = adapter.replacements.get(OUTPUT_EMBEDDING), adapter.replacements.get(INPUT_EMBEDDING)
    if (
        head is not None
        and embedding is not None
        and not {INPUT_EMBEDDING, OUTPUT_EMBEDDING} & set(adapter.deltas)
        and torch.equal(head, embedding)
    ):
        del adapter.replacements[OUTPUT_EMBEDDING]
        return None
    if not {INPUT_EMBEDDING, OUTPUT_EMBEDDING} & adapter.targets:
        return None
    path, entry = by_name[INPUT_EMBEDDING]
    return path, replace(entry, name=OUTPUT_EMBEDDING)


def _check_fits(adapter: Adapter, entries: list[tuple[Path, TensorEntry]], base_folder: Path) -> None:
    """Every tensor the adapter changes exists in the base with the shape the adapter gives it (from the headers)."""
    shapes = {entry.name: tuple(entry.shape) for _, entry in entries}
    unknown = sorted(adapter.targets - set(shapes))
    if unknown:
        raise MergeError(
            f"The adapter changes {len(unknown)} tensors the base at {base_folder} does not have (e.g. {unknown[0]}): "
            "it was trained on another architecture. Pass the right --base."
        )
    for name in sorted(adapter.targets):
        given = [tuple(adapter.replacements[name].shape)] if name in adapter.replacements else []
        given += [adapter.deltas[name].shape] if name in adapter.deltas else []
        for shape in given:
            if shape == shapes[name]:
                continue
            raise MergeError(
                f"The adapter's {name} has shape {shape} but the base's is {shapes[name]}: the adapter was trained on "
                "another base (or a resized vocabulary). Pass the right --base."
            )


def _check_free_space(output: Path, needed: int) -> None:
    """Refuse a merge the output's disk cannot hold, before writing any of it."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # a filesystem that does not say: the write itself reports a full disk
    if free < needed:
        raise MergeError(
            f"The merged weights need {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; free some "
            "space or pass an OUTPUT on another disk."
        )


def _merged(name: str, tensor: torch.Tensor, adapter: Adapter, out_dtype: torch.dtype) -> torch.Tensor:
    if name in adapter.replacements:
        trained = adapter.replacements[name]
        if trained.shape != tensor.shape:
            raise MergeError(
                f"The adapter's {name} has shape {tuple(trained.shape)} but the base's is {tuple(tensor.shape)}: "
                "the adapter was trained on another base (or a resized vocabulary). Pass the right --base."
            )
        tensor = trained  # a LoRA delta of the same layer, if any, goes on top (PEFT's saved base-layer copy)
    if name in adapter.deltas:
        delta = adapter.deltas[name].delta()
        if delta.shape != tensor.shape:
            raise MergeError(
                f"The adapter's LoRA for {name} gives shape {tuple(delta.shape)} but the base's is "
                f"{tuple(tensor.shape)}: the adapter was trained on another base. Pass the right --base."
            )
        return (tensor.float() + delta).to(out_dtype)
    return tensor.to(out_dtype)


def _check_base_config(config_dict: dict[str, Any], base_folder: Path) -> None:
    """What a merge needs of the base's `config.json`, checked before any tensor is read."""
    if config_dict.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise MergeError(
            f"The base at {base_folder} is a {config_dict.get('model_type')!r} model; this merge writes Llama-family "
            "checkpoints. Pass the Llama base the adapter was trained on with --base."
        )
    read_rope(config_dict)  # a RoPE transformers cannot run (factor 0, a string) is refused before any work


def _output_config(
    config_dict: dict[str, Any],
    architecture: str,
    dtype: torch.dtype | None,
    base_dtype: torch.dtype | None,
    untie: bool = False,
) -> Any:
    """The merged model's config object, built (and so checked by transformers) before any shard is written."""
    from huggingface_hub.errors import StrictDataclassError

    config_dict = dict(config_dict)
    if untie:  # the merge writes lm_head.weight; a tied config would make transformers drop it for the embedding
        config_dict["tie_word_embeddings"] = False
    config_dict.pop("torch_dtype", None)
    config_dict["dtype"] = str(dtype or base_dtype or torch.float32).removeprefix("torch.")
    try:
        if architecture == "llama_longlora":
            return build_config(
                config_dict,
                None,  # the base's RoPE and context, as trained
                group_size_ratio=config_dict.get("s2_group_size_ratio", 0.25),
                group_size=config_dict.get("s2_group_size"),
            )
        from transformers import LlamaConfig

        dropped = (*LONGLORA_CONFIG_KEYS, "transformers_version", "_name_or_path", "rope_scaling", "rope_theta")
        values = {key: value for key, value in config_dict.items() if key not in dropped}
        values.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_parameters=_stock_rope(config_dict))
        # transformers standardises the RoPE (`standardize_rope_params`: defaults, the pretraining context of the
        # types that read one) and validates it, exactly as when it loads the merged model
        return LlamaConfig(**values)
    except (TypeError, ValueError, StrictDataclassError) as error:
        if isinstance(error, MergeError):
            raise
        summary = " ".join(str(error).split())
        raise MergeError(
            f"The base's config.json cannot give a {architecture} config ({type(error).__name__}: {summary}); fix "
            "that value in the base's config.json, or restore it from the original checkpoint."
        ) from None


def _stock_rope(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The base's RoPE as a stock `LlamaConfig` takes it: what transformers' RoPE functions read for its type, and
    nothing they derive themselves (they warn about keys they do not read when the model loads)."""
    rope = read_rope(config_dict)  # one clean RoPE, whichever forms the base's config.json used
    if rope["rope_type"] not in ("yarn", "llama3", "longrope"):
        # only these read the pretraining context from rope_parameters (transformers' `standardize_rope_params`);
        # for them it must stay, or transformers would fill in max_position_embeddings and change the frequencies
        rope.pop("original_max_position_embeddings", None)
    if rope["rope_type"] == "default":  # an unscaled RoPE has no factor
        rope.pop("factor", None)
    return rope


def _save_config(config: Any, staging: Path, architecture: str) -> None:
    config.save_pretrained(staging)
    if architecture == "llama_longlora":
        for path in remote_code_files():
            shutil.copyfile(path, staging / path.name)
    written = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    if architecture == "llama":
        written.update(legacy_rope_fields(written.get("rope_parameters") or {}))
    # transformers 5 writes `dtype`; 4.x, vLLM, TGI and other engines read `torch_dtype` (5 reads it silently too)
    written["torch_dtype"] = written.get("dtype")
    (staging / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_side_files(adapter: Adapter, base_folder: Path, staging: Path) -> None:
    """Tokenizer (the adapter's when the trainer saved one there, else the base's) and generation config."""
    adapter_has_tokenizer = (adapter.folder / "tokenizer_config.json").is_file()
    tokenizer_source = adapter.folder if adapter_has_tokenizer else base_folder
    for pattern in TOKENIZER_PATTERNS:
        for path in tokenizer_source.glob(pattern):
            shutil.copyfile(path, staging / path.name)
    for pattern in OTHER_PATTERNS:
        for path in base_folder.glob(pattern):
            if path.is_file() and not path.name.startswith("README"):  # the base's card describes the base
                shutil.copyfile(path, staging / path.name)


def merge_adapter(
    adapter: str | Path,
    output: str | Path,
    base: str | Path | None = None,
    architecture: str = "llama_longlora",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    r"""
    Merge `adapter` into its base model and save the result to `output`, streamed tensor by tensor.

    Args:
        adapter (`str` or `Path`):
            A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`), e.g. a recipe's
            `output_dir`.
        output (`str` or `Path`):
            A new or empty folder. It is written under a temporary name and renamed at the end, so a failure
            leaves nothing behind; what a killed merge left there is removed by the next one (see
            [`~convert.remove_stale_staging`]). Everything that can be checked (the base's `config.json`, the
            adapter's shapes, the free disk space) is checked before the first shard is written.
        base (`str` or `Path`, *optional*):
            The base checkpoint (a folder or a Hub id); defaults to the adapter's `base_model_name_or_path`.
        architecture (`str`, *optional*, defaults to `"llama_longlora"`):
            `"llama_longlora"` keeps LlamaLongLoRA and its remote code; `"llama"` writes a stock Llama config.
        dtype (`str` or `torch.dtype`, *optional*):
            `"bfloat16"`, `"float16"` or `"float32"` for the floating-point tensors; defaults to the base's.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest output shard, in bytes or as `"500MB"`, `"5GB"`, `"2GiB"` (huggingface_hub's default and units).
            huggingface_hub plans the files, as for `save_pretrained`: `model.safetensors` when one holds
            everything, else `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`.

    Returns:
        `Path`: `output`.

    Raises:
        `FileNotFoundError`: A missing adapter, base or weights file.
        `FileExistsError`: `output` exists and is not empty.
        `MergeError`: The adapter does not fit the base, an argument is invalid, or the disk is too small.
        `ValueError`: The base's `config.json` is not a JSON object, or its RoPE is invalid.
    """
    if architecture not in ARCHITECTURES:
        raise MergeError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}.")
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise MergeError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}.")
        dtype = DTYPE_CHOICES[dtype]
    try:
        max_shard_size = parse_size(max_shard_size)
    except ValueError as error:
        raise MergeError(f"max_shard_size must be a positive size: {error}") from None
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} exists and is not empty; pass a new folder (nothing is overwritten).")
    lora = load_adapter(adapter)
    base_name = str(base or lora.config.get("base_model_name_or_path") or "")
    if not base_name:
        raise MergeError(f"{lora.folder}/adapter_config.json names no base model; pass --base.")
    base_folder = resolve_checkpoint(base_name, revision=None if base else lora.config.get("revision"))
    if output.resolve() in (base_folder.resolve(), lora.folder.resolve()):
        raise MergeError(f"The output folder {output} is an input; pass a new folder.")

    # everything that can be checked is checked before the first shard is written: a large merge takes minutes
    config_dict = read_config_file(base_folder / "config.json")
    _check_base_config(config_dict, base_folder)
    files = _base_files(base_folder)
    entries = [(path, entry) for path in files for entry in read_header(path)[0]]
    output_embedding = _untied_output(config_dict, entries, lora)
    if output_embedding is not None:
        entries.append(output_embedding)
    _check_fits(lora, entries, base_folder)
    floating = [entry.dtype for _, entry in entries if entry.dtype.is_floating_point]
    base_dtype = max(set(floating), key=floating.count) if floating else None
    config = _output_config(config_dict, architecture, dtype, base_dtype, untie=output_embedding is not None)
    split, sources = _plan_shards(entries, dtype, max_shard_size)
    _check_free_space(output, split.metadata["total_size"])

    staging = create_staging(output)
    logger.debug(
        f"merging {len(lora.deltas)} LoRA pairs and {len(lora.replacements)} trained tensors into "
        f"{len(split.filename_to_tensors)} shards of {base_folder}"
    )
    try:
        with ExitStack() as stack:
            handles = {path: stack.enter_context(path.open("rb")) for path in files}
            total = split.metadata["total_size"]
            bar = stack.enter_context(progress_bar("merge", total=total, desc="merging", unit="B", unit_scale=True))
            for shard_name, names in split.filename_to_tensors.items():
                shard = [sources[name] for name in names]
                writer = ShardWriter(staging / shard_name, [(e.name, e.shape, d) for _, e, d in shard])
                try:
                    for path, entry, out_dtype in shard:
                        tensor = _merged(entry.name, read_tensor(handles[path], entry), lora, out_dtype)
                        writer.write(entry.name, tensor)
                        bar.update(tensor.numel() * tensor.element_size())
                        del tensor
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        write_index(staging, split)
        _save_config(config, staging, architecture)
        _copy_side_files(lora, base_folder, staging)
        provenance = read_provenance(base_folder)
        provenance["license"] = read_license(base_folder)
        trained = read_provenance(lora.folder)  # how the adapter was trained, for the merged model's card
        provenance.update({key: trained[key] for key in RUN_RECORD_KEYS if trained.get(key) is not None})
        if provenance.get("trainable") in RENAMED_MODES:  # a run recorded before its mode was renamed
            provenance["trainable"] = RENAMED_MODES[provenance["trainable"]]
        if (lora.folder / "trainer_state.json").is_file():
            shutil.copyfile(lora.folder / "trainer_state.json", staging / "trainer_state.json")
        provenance.update(
            kind="merged",
            adapter=str(adapter),
            architecture=architecture,
            adapter_config={key: lora.config.get(key) for key in ("r", "lora_alpha", "target_modules")},
            modules_to_save=lora.config.get("modules_to_save") or [],
        )
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        finish_staging(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


__all__ = ["ARCHITECTURES", "DTYPE_CHOICES", "MergeError", "load_adapter", "merge_adapter"]
