"""Which parameters train: the paper's LoRA with trainable embeddings and norms, and the alternatives.

`lora_plus` is what the LongLoRA paper calls "LoRA+": LoRA (r=8, alpha=16, dropout 0) on the attention
projections q, k, v, o, plus the input embedding and every RMSNorm trained in full; `lm_head` stays frozen.
It has nothing to do with PEFT's `create_loraplus_optimizer` (an unrelated learning-rate method). Plain LoRA
cannot extend the context (the paper's 7B at 32k: perplexity 11.44 with LoRA r=8 against 8.12 with LoRA+).

The embedding and norms go through PEFT's `modules_to_save`, so the adapter is ONE self-contained PEFT folder
(`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM` load, with no side file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

TRAINABLE_MODES = ("lora_plus", "lora", "full", "qlora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# "norm" matches input_layernorm, post_attention_layernorm and the final norm (PEFT matches by suffix)
EMBEDDING_AND_NORMS = ("embed_tokens", "norm")


def lora_config(
    mode: str = "lora_plus",
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | tuple[str, ...] = LORA_TARGETS,
) -> LoraConfig | None:
    r"""
    The PEFT config of a trainable-modules mode, or `None` for `full` fine-tuning.

    Args:
        mode (`str`, *optional*, defaults to `"lora_plus"`):
            `"lora_plus"` (LoRA + trainable embeddings and norms), `"lora"` (LoRA only), `"qlora"` (`lora_plus` on a
            4-bit base) or `"full"`.
        r (`int`, *optional*, defaults to `8`): LoRA rank.
        alpha (`int`, *optional*, defaults to `16`): LoRA alpha.
        dropout (`float`, *optional*, defaults to `0.0`): LoRA dropout.
        target_modules (`list[str]`, *optional*): the projections that get LoRA; q, k, v, o by default.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {mode!r}.")
    if mode == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=None if mode == "lora" else list(EMBEDDING_AND_NORMS),
        task_type="CAUSAL_LM",
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (a PEFT model counts the frozen base and the saved-module copies)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = ["EMBEDDING_AND_NORMS", "LORA_TARGETS", "TRAINABLE_MODES", "count_parameters", "lora_config"]
