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
# "norm" matches input_layernorm, post_attention_layernorm and the final norm (PEFT matches by suffix)
EMBEDDING_AND_NORMS = ("embed_tokens", "norm")


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (a PEFT model counts the frozen base and the saved-module copies)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = [
    "EMBEDDING_AND_NORMS",
    "LORA_TARGETS",
    "RENAMED_MODES",
    "TRAINABLE_MODES",
    "count_parameters",
    "lora_config",
    "modules_to_save",
    "trainable_mode",
]
