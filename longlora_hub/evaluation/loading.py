"""Loading what an evaluation runs: the model (a LlamaLongLoRA checkpoint, a stock or merged Llama, or a base plus a
PEFT adapter), its tokenizer, and the facts about them that a result records.

Everything a user can get wrong (a missing folder, an adapter whose base cannot be found, a length beyond what the
model's RoPE covers, a device this machine lacks, an adapter of another model) raises `FileNotFoundError` or
`ValueError` with a message that says how to fix it; the command line turns those into its error messages.

A checkpoint's own Python code runs only when it is this package's LlamaLongLoRA code or the user allows it
(`trust_remote_code`, the `--trust-remote-code` flag): see [`~longlora_hub.convert.trust_remote_code_for`].
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..builtin import model_location

DTYPES = ("auto", "float32", "bfloat16", "float16")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ModelSource:
    r"""
    Where the weights of an evaluated model come from.

    Args:
        model (`str`):
            The MODEL the user named (a folder or a Hub id; an adapter folder when the base comes from it).
        base (`str`):
            The checkpoint whose weights are loaded first.
        adapter (`str`, *optional*):
            A PEFT adapter folder applied on top of `base`.
        revision (`str`, *optional*):
            The Hub revision asked for (a branch, tag or commit).
        base_from_adapter (`bool`, *optional*, defaults to `False`):
            `base` was read from the adapter's `adapter_config.json` rather than named by the user.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            The user allows the checkpoint's own code even when it is not this package's (`--trust-remote-code`).
    """

    model: str
    base: str
    adapter: str | None = None
    revision: str | None = None
    base_from_adapter: bool = False
    trust_remote_code: bool = False
    # location -> the trust_remote_code decided for it, so a Hub checkpoint's files are checked once
    _trusted: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    def trust_for(self, location: str) -> bool:
        """The `trust_remote_code` to load `location` (the base or the adapter folder) with."""
        from ..convert import trust_remote_code_for

        if location not in self._trusted:
            revision = None if location == self.adapter else self.revision
            self._trusted[location] = trust_remote_code_for(
                location, revision, self.trust_remote_code, option="--trust-remote-code"
            )
        return self._trusted[location]


@dataclass
class LoadedModel:
    r"""
    A model ready to evaluate, with its tokenizer and what a result should record about it.

    Args:
        model (`torch.nn.Module`):
            The causal LM in eval mode (a `PeftModel` when an adapter was given).
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer of the adapter folder when it has one, else of the base.
        source (`ModelSource`):
            What was loaded.
        info (`dict[str, Any]`):
            `model`, `adapter`, `base_model`, `revision`, `model_class`, `max_position_embeddings`, `rope`, `dtype`,
            `device`: the model part of a result's JSON.
    """

    model: Any
    tokenizer: Any
    source: ModelSource
    info: dict[str, Any] = field(default_factory=dict)


def software_versions() -> dict[str, str | None]:
    """The versions of the packages that decide an evaluation's numbers, for the result's JSON."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "longlora-hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    from ..convert import read_json_object

    return read_json_object(
        folder / ADAPTER_CONFIG,
        f"No {ADAPTER_CONFIG} in {folder}; --adapter takes the folder of a PEFT adapter (the output of a LongLoRA "
        "training run).",
        "the training run",
    )


def _check_model_exists(name: str, what: str) -> None:
    """A local folder must exist; anything else must at least be a valid Hub id (it is fetched when loaded)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{name} is a file; pass the folder that holds the {what}'s config.json.")
        return
    if not _is_repo_id(name):
        raise FileNotFoundError(f"No {what} at {name}: it is neither a folder nor a Hugging Face Hub id.")


def resolve_source(
    model: str, adapter: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSource:
    r"""
    Work out which checkpoint to load and which adapter to apply.

    `MODEL --adapter DIR` loads MODEL and applies the adapter. A MODEL that is itself an adapter folder (it holds
    `adapter_config.json`) loads the adapter's `base_model_name_or_path` and applies MODEL.

    Args:
        model (`str`):
            A checkpoint folder or Hub id, an adapter folder, or `builtin:tiny-llama-pretrained` (the tiny base this
            package ships).
        adapter (`str`, *optional*):
            A PEFT adapter folder to apply on `model`.
        revision (`str`, *optional*):
            The Hub revision of `model`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow the checkpoint's own code even when it is not this package's.

    Returns:
        `ModelSource`: What to load.

    Raises:
        `FileNotFoundError`: If the model or the adapter folder is missing, or the adapter's base cannot be found.
    """
    model = model_location(model)
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"No adapter folder at {adapter}; pass the folder that holds {ADAPTER_CONFIG}.")
        _read_adapter_config(adapter_dir)
        _check_model_exists(model, "base model")
        return ModelSource(
            model=model, base=model, adapter=str(adapter_dir), revision=revision, trust_remote_code=trust_remote_code
        )

    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / ADAPTER_CONFIG).is_file():
        base = _read_adapter_config(folder).get("base_model_name_or_path")
        fix = (
            f"Pass the base model as MODEL and the adapter with --adapter ({model}), or set base_model_name_or_path "
            f"in {folder / ADAPTER_CONFIG} to the base checkpoint."
        )
        if not base:
            raise FileNotFoundError(f"The adapter {model} does not say which base it was trained on. {fix}")
        base_path = Path(base).expanduser()
        if not base_path.is_dir() and (base_path.is_absolute() or base_path.exists() or not _is_repo_id(base)):
            raise FileNotFoundError(
                f"The base model of the adapter {model} was not found: base_model_name_or_path is {base!r} "
                f"({ADAPTER_CONFIG}). {fix}"
            )
        return ModelSource(
            model=model,
            base=base,
            adapter=str(folder),
            revision=revision,
            base_from_adapter=True,
            trust_remote_code=trust_remote_code,
        )

    _check_model_exists(model, "model")
    return ModelSource(model=model, base=model, revision=revision, trust_remote_code=trust_remote_code)


def load_config(source: ModelSource) -> Any:
    r"""
    The config of the base checkpoint, without loading any weights (so length checks fail fast).

    Raises:
        `FileNotFoundError`: If the checkpoint cannot be found or downloaded.
        `ValueError`: If its `config.json` is not a valid config (not an object, an invalid RoPE), or it needs code
            that is not this package's and `source.trust_remote_code` is not set.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from ..convert import checkpoint_file, read_config_file
    from ..rope import read_rope

    try:
        trust = source.trust_for(source.base)  # reads config.json (from the Hub: downloads it alone) before any code
        path = checkpoint_file(source.base, "config.json", source.revision)
        if path is not None:
            read_rope(read_config_file(path))  # a RoPE transformers would reject with a traceback, or run as NaN
        return AutoConfig.from_pretrained(source.base, trust_remote_code=trust, revision=source.revision)
    except StrictDataclassError as error:  # transformers' check of a field's type: a multi-line message
        raise ValueError(
            f"The config.json of {source.base} is not a valid config ({' '.join(str(error).split())}); fix that field "
            "or restore the file from the original checkpoint."
        ) from None
    except OSError as error:
        if source.base_from_adapter:
            raise FileNotFoundError(
                f"The base model of the adapter {source.model} was not found: base_model_name_or_path is "
                f"{source.base!r} ({ADAPTER_CONFIG}) and loading it failed ({error}). Pass the base model as MODEL and "
                f"the adapter with --adapter {source.model}, or fix base_model_name_or_path."
            ) from error
        raise FileNotFoundError(
            f"Could not load the config of {source.base!r} ({error}). Check the path or Hub id, your network and, for "
            "a gated model, your token (`hf auth login`)."
        ) from error


def max_length(config: Any) -> int | None:
    r"""
    The longest sequence the checkpoint's RoPE is configured for, or `None` when it has no fixed limit.

    `max_position_embeddings` is that limit for unscaled RoPE and for Position Interpolation (linear) and YaRN,
    which scale to cover it; dynamic NTK rescales on the fly beyond it, so it has no limit of its own.
    """
    from ..rope import read_rope

    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or read_rope(config)["rope_type"] == "dynamic":
        return None
    return int(limit)


def check_reachable(config: Any, lengths: list[int], model_name: str, option: str = "--seq-len") -> None:
    r"""
    Refuse lengths beyond what the model's position embeddings are configured for.

    Args:
        config (`PreTrainedConfig`):
            The model's config.
        lengths (`list[int]`):
            The lengths to evaluate, in tokens.
        model_name (`str`):
            The model as the user named it, for the message.
        option (`str`, *optional*, defaults to `"--seq-len"`):
            The option that gave the lengths, for the message.

    Raises:
        `ValueError`: If a length is above `max_position_embeddings` (RoPE other than dynamic NTK); the message
            gives the maximum and the `longlora-hub convert` command that extends the model.
    """
    from ..rope import describe, read_rope

    limit = max_length(config)
    too_long = [length for length in lengths if limit is not None and length > limit]
    if not too_long:
        return
    longest = max(too_long)
    raise ValueError(
        f"{model_name} reaches at most {limit} tokens (max_position_embeddings={limit}, {describe(read_rope(config))}"
        f"), so {option} {longest} is beyond it. Extend the model first with `longlora-hub convert {model_name} "
        f"OUTPUT --context-length {longest}` (Position Interpolation; fine-tune it with LongLoRA afterwards), or "
        f"evaluate at lengths up to {limit}."
    )


def resolve_device(device: str = "auto") -> str:
    r"""
    The device to evaluate on. `"auto"` stays `"auto"` when CUDA is there (the model is then loaded with
    `device_map="auto"`: on one GPU when it fits, split over all of them, and CPU memory after that, when it does
    not) and is `"cpu"` otherwise; anything else must be a device this machine has.

    Raises:
        `ValueError`: If `device` is not a torch device name, or names a GPU this machine (or this build of torch)
            does not have.
    """
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device name; use auto, cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "torch finds no CUDA GPU"
            raise ValueError(f"--device {device} needs a CUDA GPU, but {why}; use --device cpu (or auto).")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"--device {device} names GPU {parsed.index}, but this machine has {count} (cuda:0 to "
                f"cuda:{count - 1}); pass one of those."
            )
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device} needs Apple's MPS, which this machine lacks; use --device cpu (or auto).")
    return device


def resolve_dtype(dtype: str) -> Any:
    """`"auto"` stays `"auto"`: transformers then loads the checkpoint in its own dtype (its config's `dtype`, else
    that of its first floating-point weight). Anything else is the torch dtype of that name."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def model_device(model: Any) -> Any:
    """Where a model's inputs go: the device of its input embeddings (the first shard of a model split by
    `device_map="auto"`), else of its first parameter."""
    import torch

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(iter(model.parameters()), torch.empty(0)).device


def placement(model: Any, device: str) -> str:
    """Where the model's weights are, for a result: the device, or for `device_map="auto"` the devices it was
    split over (`"cuda:0"` when it fits one GPU, `"cuda:0,cuda:1,cpu"` when it does not)."""
    device_map = getattr(model, "hf_device_map", None)
    if device != "auto" or not device_map:
        return device
    devices = []
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        if name not in devices:
            devices.append(name)
    return ",".join(devices)


def load_tokenizer(source: ModelSource) -> Any:
    """The adapter folder's tokenizer when it saved one (a LongQA run may add tokens), else the base's."""
    from transformers import AutoTokenizer

    location = source.base
    if source.adapter and (Path(source.adapter) / "tokenizer_config.json").is_file():
        location = source.adapter
    trust = source.trust_for(location)
    try:
        return AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust, revision=None if location == source.adapter else source.revision
        )
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not load a tokenizer from {location!r} ({error}); evaluation needs the checkpoint's tokenizer "
            "files (tokenizer.json or tokenizer.model) next to its config."
        ) from error


def load_model(
    source: ModelSource,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    tokenizer: Any | None = None,
) -> LoadedModel:
    r"""
    Load a model (and its adapter) for evaluation, in eval mode, on `device`.

    Args:
        source (`ModelSource`):
            From [`resolve_source`].
        device (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (`device_map="auto"` over the GPUs when CUDA is there, else the CPU), `"cpu"`, `"cuda"`,
            `"cuda:1"`, ...
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (the checkpoint's own dtype, transformers' `dtype="auto"`), `"float32"`, `"bfloat16"` or
            `"float16"`.
        attn_implementation (`str`, *optional*):
            `"sdpa"`, `"eager"`, `"flash_attention_2"`, ...; transformers' default when unset.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer from [`load_tokenizer`], kept with the model; pre-tokenized data needs none.

    Returns:
        `LoadedModel`: The model, its tokenizer and the facts a result records.
    """
    from transformers import AutoModelForCausalLM

    from ..rope import read_rope

    device = resolve_device(device)
    trust = source.trust_for(source.base)
    kwargs: dict[str, Any] = {"trust_remote_code": trust, "dtype": resolve_dtype(dtype), "revision": source.revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device != "cpu":
        # straight onto the GPU(s), never a full copy in CPU memory first; "auto" lets accelerate split the model
        # over every GPU (and CPU memory) when it does not fit one
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(source.base, **kwargs)
    except OSError as error:
        raise FileNotFoundError(f"Could not load the model {source.base!r} ({error}).") from error
    if source.adapter:
        from peft import PeftModel

        try:
            # a split model: PEFT puts each LoRA layer next to the layer it adapts (hf_device_map)
            adapter_device = None if device == "auto" else device
            model = PeftModel.from_pretrained(model, source.adapter, torch_device=adapter_device)
        except RuntimeError as error:  # torch's "size mismatch for ..." list, one line per tensor
            raise ValueError(_adapter_mismatch(source, error)) from None
    model.eval()
    config = model.config
    base_model = model.get_base_model() if source.adapter else model
    info = {
        "model": source.model,
        "adapter": source.adapter,
        "base_model": source.base if source.adapter else None,
        # the commit a Hub download resolved to; None for a local folder
        "revision": source.revision or getattr(config, "_commit_hash", None),
        "model_class": type(base_model).__name__,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope": read_rope(config),
        # what was loaded, not what was asked: "auto" is the checkpoint's dtype and the devices it was placed on
        "dtype": str(base_model.dtype).removeprefix("torch."),
        "device": placement(base_model, device),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, info=info)


def _adapter_mismatch(source: ModelSource, error: RuntimeError) -> str:
    """The message for an adapter whose tensors do not fit the model it was put on."""
    mismatches = [line.strip() for line in str(error).splitlines() if line.strip().startswith("size mismatch")]
    if not mismatches:
        return f"The adapter {source.adapter} cannot be applied to {source.base}: {' '.join(str(error).split())}"
    trained_on = _read_adapter_config(Path(source.adapter)).get("base_model_name_or_path")
    where = f" ({ADAPTER_CONFIG} names {trained_on!r})" if trained_on else ""
    more = f" and {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
    return (
        f"The adapter {source.adapter} does not fit {source.base}: {mismatches[0].rstrip('.')}{more}. It was trained "
        f"on another model{where}: evaluate it on that base, e.g. `longlora-hub eval ... {trained_on or 'BASE'} "
        f"--adapter {source.adapter}`."
    )


__all__ = [
    "DTYPES",
    "LoadedModel",
    "ModelSource",
    "check_reachable",
    "load_config",
    "load_model",
    "load_tokenizer",
    "max_length",
    "model_device",
    "placement",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
    "software_versions",
]
