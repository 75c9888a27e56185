"""Which parameters train: the paper's LoRA with trainable embeddings and norms, and the alternatives.

`longlora` is what the LongLoRA paper calls "LoRA+": LoRA (r=8, alpha=16, dropout 0) on the attention projections
q, k, v, o, plus the input embedding and every RMSNorm trained in full; `lm_head` stays frozen. It is named
`longlora` here because "LoRA+" elsewhere means an optimizer (PEFT's `create_loraplus_optimizer`, `loraplus_lr_ratio`:
larger learning rates for LoRA's B matrices), which has nothing to do with it; the mode's former name `lora_plus` is
still accepted for one release, with a warning. Plain LoRA cannot extend the context (the paper's 7B at 32k:
perplexity 11.44 with LoRA r=8 against 8.12 with trainable embeddings and norms).

The embedding and norms go through PEFT's `modules_to_save`, so the adapter is ONE self-contained PEFT folder
(`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM` load, with no side file.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

TRAINABLE_MODES = ("longlora", "lora", "full", "qlora")
# former names, accepted for one release with a FutureWarning
RENAMED_MODES = {"lora_plus": "longlora"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# every norm by its own name: PEFT 0.22 matches a modules_to_save entry only as a whole name at the end of a module's
# path, so "norm" alone would now train the final norm and no layer's (PEFT 0.21 and earlier matched any suffix)
EMBEDDING_AND_NORMS = ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")
# the sub-module names PEFT gives what it adds: a trainable parameter under one of them belongs to the module above it
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def trainable_mode(mode: str, stacklevel: int = 2) -> str:
    r"""
    The current name of a trainable-modules mode: `mode` itself, or for a former name (`lora_plus`) its new name
    (`longlora`), with a `FutureWarning` naming it.

    Raises:
        `ValueError`: If `mode` is none of `TRAINABLE_MODES` (nor a former name of one).
    """
    if mode in RENAMED_MODES:
        new = RENAMED_MODES[mode]
        warnings.warn(
            f"trainable: {mode} is now called {new} (LoRA + embeddings + norms; 'LoRA+' elsewhere means an optimizer); "
            f"write trainable: {new}. The name {mode} will stop working in the next release.",
            FutureWarning,
            stacklevel=stacklevel + 1,
        )
        return new
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {mode!r}.")
    return mode


def modules_to_save(mode: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The modules a LoRA mode trains in full (PEFT's `modules_to_save`): the embedding and norms for `longlora` and
    `qlora`, none for `lora`, then `extra` (the recipe's `lora_modules_to_save`), each once."""
    implied = () if mode == "lora" else EMBEDDING_AND_NORMS
    return list(dict.fromkeys((*implied, *extra)))


def lora_config(
    mode: str = "longlora",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = LORA_TARGETS,
    extra_modules_to_save: list[str] | tuple[str, ...] = (),
) -> LoraConfig | None:
    r"""
    The PEFT config of a trainable-modules mode, or `None` for `full` fine-tuning.

    Args:
        mode (`str`, *optional*, defaults to `"longlora"`):
            `"longlora"` (LoRA + trainable embeddings and norms, the paper's "LoRA+"), `"lora"` (LoRA only),
            `"qlora"` (`longlora` on a 4-bit base) or `"full"`. `"lora_plus"`, the former name of `"longlora"`, is
            accepted with a `FutureWarning`.
        r (`int`, *optional*, defaults to `8`): LoRA rank.
        alpha (`int`, *optional*, defaults to `16`): LoRA alpha.
        dropout (`float`, *optional*, defaults to `0.0`): LoRA dropout.
        target_modules (`list[str]`, *optional*): the projections that get LoRA; q, k, v, o by default.
        extra_modules_to_save (`list[str]`, *optional*):
            More modules trained in full and saved in the adapter (e.g. `["lm_head"]`), added to what `mode` implies.

    Raises:
        `ValueError`: If `mode` is unknown, or `extra_modules_to_save` is given with `"full"` (which trains every
            module already).
    """
    mode = trainable_mode(mode, stacklevel=2)
    if mode == "full":
        if extra_modules_to_save:
            raise ValueError(
                f"lora_modules_to_save ({', '.join(extra_modules_to_save)}) adds modules trained in full to a LoRA "
                "adapter; trainable: full trains every module already. Remove lora_modules_to_save, or pick a LoRA "
                "mode."
            )
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=modules_to_save(mode, extra_modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def _matches(path: str, name: str) -> bool:
    """Whether the module at `path` is the one `name` names: the whole path, or its last dotted parts."""
    return path == name or path.endswith("." + name)


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def promised_trainable(
    model: nn.Module,
    mode: str,
    target_modules: list[str] | tuple[str, ...] = LORA_TARGETS,
    extra_modules_to_save: list[str] | tuple[str, ...] | None = (),
) -> dict[str, str]:
    r"""
    What a mode promises to train in `model` (before PEFT wraps it), by module path: `"lora"` for a module that gets
    a LoRA adapter, `"full"` for one trained in full. Read from the model itself (its input embedding, every module
    whose class is an RMSNorm or LayerNorm, every projection named in `target_modules`), never from how a PEFT
    release matches names, so that `check_trainable` can hold PEFT's result against it.

    Args:
        model (`nn.Module`): The model as loaded, before `get_peft_model`.
        mode (`str`): A trainable-modules mode (`TRAINABLE_MODES`).
        target_modules (`list[str]`, *optional*): The projections that get LoRA; q, k, v, o by default.
        extra_modules_to_save (`list[str]`, *optional*): The recipe's `lora_modules_to_save`.
    """
    mode = trainable_mode(mode, stacklevel=2)
    if mode == "full":
        return {name.rpartition(".")[0]: "full" for name, _ in model.named_parameters()}
    embedding = model.get_input_embeddings()
    promised = {}
    for path, module in model.named_modules():
        if any(_matches(path, name) for name in target_modules) and not list(module.children()):
            promised[path] = "lora"
        if mode != "lora" and (module is embedding or _is_norm(module)):
            promised[path] = "full"
        if any(_matches(path, name) for name in extra_modules_to_save or ()):
            promised[path] = "full"
    return promised


def trained_modules(model: nn.Module) -> dict[str, str]:
    """The modules of a (PEFT) model that have a trainable parameter, by their path in the unwrapped model: `"lora"`
    where the parameter is in a LoRA adapter PEFT added, `"full"` where it is the module's own (or PEFT's trained
    copy of it, `modules_to_save`)."""
    trained = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = name.removeprefix("base_model.model.").split(".")
        for index, part in enumerate(parts):
            if part in LORA_PARTS or part == "modules_to_save":
                trained[".".join(parts[:index])] = "lora" if part in LORA_PARTS else "full"
                break
        else:
            trained[".".join(parts[:-1])] = "full"
    return trained


def check_trainable(model: nn.Module, promised: dict[str, str], mode: str) -> None:
    r"""
    Refuse to train when what trains in `model` (a PEFT model, or the model itself for `full`) is not what the mode
    promised (`promised_trainable`, taken before PEFT wrapped the model): a library that changes how it matches
    module names (PEFT 0.22 and `modules_to_save`) must stop a run, not turn it into another method silently.

    Raises:
        `ValueError`: Naming the modules that do not train and those that train without being asked, by name and
            count (`input_layernorm` x 30).
    """
    import peft

    trained = trained_modules(model)
    missing = [path for path, kind in promised.items() if trained.get(path) != kind]
    unasked = [path for path in trained if path not in promised]
    if not missing and not unasked:
        return
    problems = []
    if missing:
        problems.append(f"these do not train: {_summary(missing, promised)}")
    if unasked:
        problems.append(f"these train without being asked: {_summary(unasked, trained)}")
    raise ValueError(
        f"trainable: {mode} is not what PEFT {peft.__version__} set up: {'; '.join(problems)}. The run is stopped "
        f"before its first step. Install the PEFT longlora-hub was tested with (pip install '{_tested_peft()}'), or "
        "report it with these names."
    )


def _tested_peft() -> str:
    """This package's requirement on PEFT, as pip takes it (`peft>=0.21.2,<0.23`)."""
    from importlib import metadata

    try:
        requirements = metadata.requires("longlora-hub") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requirements = []
    return next((r.split(";")[0].replace(" ", "") for r in requirements if r.lower().startswith("peft")), "peft")


def _summary(paths: list[str], kinds: dict[str, str]) -> str:
    """`input_layernorm (full) x 30, q_proj (lora) x 30`: module paths grouped by their last name and kind."""
    counts: dict[str, int] = {}
    for path in paths:
        key = f"{path.rpartition('.')[2] or path} ({kinds[path]})"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(key if count == 1 else f"{key} x {count}" for key, count in counts.items())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (a PEFT model counts the frozen base and the saved-module copies)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = [
    "EMBEDDING_AND_NORMS",
    "LORA_TARGETS",
    "RENAMED_MODES",
    "TRAINABLE_MODES",
    "check_trainable",
    "count_parameters",
    "lora_config",
    "modules_to_save",
    "promised_trainable",
    "trainable_mode",
    "trained_modules",
]
