"""Configuration of the LlamaLongLoRA architecture: a Llama config plus the S²-Attn switches.

The S² switches live in the config so that they travel with the checkpoint (a model extended to 32k
keeps its group size when someone resumes training from the Hub). This file is shipped as remote
code: it imports only the standard library, torch and transformers.
"""

from transformers import LlamaConfig
from transformers.configuration_utils import strict  # huggingface_hub's, as every transformers config uses it

S2_SHIFTS = ("segments", "roll", "none")
AUTO_MAP = {
    "AutoConfig": "configuration_llama_longlora.LlamaLongLoRAConfig",
    "AutoModel": "modeling_llama_longlora.LlamaLongLoRAModel",
    "AutoModelForCausalLM": "modeling_llama_longlora.LlamaLongLoRAForCausalLM",
}


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """The transformers 4.x form of a RoPE: `rope_theta` and, when scaled, `rope_scaling` (with the old `type`
    key). 5.x gives `rope_scaling` precedence when both are present, so it must say the same as `rope_parameters`."""
    fields = {}
    if "rope_theta" in rope_parameters:
        fields["rope_theta"] = rope_parameters["rope_theta"]
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
        fields["rope_scaling"] = {"type": rope_type, **scaling}
    return fields


def check_s2_settings(shift: str = "segments", group_size_ratio: float = 0.25, group_size: int | None = None) -> None:
    r"""
    The one place the S² settings are checked: by this config, by the S² layout of any model's config (the generic
    `s2_*` attention functions), by `longlora-hub convert` and by the training recipe.

    Raises:
        `ValueError`: Naming the setting, what it must be, and the paper's value.
    """
    if shift not in S2_SHIFTS:
        raise ValueError(f"s2_shift must be one of {S2_SHIFTS}, got {shift!r}.")
    if isinstance(group_size_ratio, bool) or not isinstance(group_size_ratio, (int, float)):
        raise ValueError(
            f"s2_group_size_ratio must be a number in (0, 1], got {group_size_ratio!r}; the paper uses 0.25."
        )
    if not 0.0 < group_size_ratio <= 1.0:
        raise ValueError(
            f"s2_group_size_ratio must be in (0, 1], got {group_size_ratio}; the paper uses 0.25 (groups of a quarter "
            "of the sequence)."
        )
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2
    ):
        raise ValueError(
            f"s2_group_size must be an even number of tokens >= 2 (the shifted heads move by half a group), got "
            f"{group_size!r}; or leave it unset to use s2_group_size_ratio."
        )


@strict
class LlamaLongLoRAConfig(LlamaConfig):
    r"""
    Configuration for [`LlamaLongLoRAForCausalLM`]: every [`LlamaConfig`] field plus the shifted sparse
    attention (S²-Attn) settings used while the model is in training mode.

    Args:
        s2_attention (`bool`, *optional*, defaults to `True`):
            Use S²-Attn while the module is in training mode. Evaluation, generation and any forward with a
            KV cache always use standard full causal attention.
        s2_group_size_ratio (`float`, *optional*, defaults to `0.25`):
            Group size G as a fraction of the current sequence length (the paper uses 1/4). Must be in (0, 1].
        s2_group_size (`int`, *optional*):
            An absolute group size in tokens (even, >= 2). Overrides `s2_group_size_ratio` when set.
        s2_shift (`str`, *optional*, defaults to `"segments"`):
            How the second half of the heads is shifted by G/2. `"segments"` uses the groups [0, G/2),
            [G/2, 3G/2), ... ending with the remainder, so no token ever sees a later one. `"roll"` is the
            paper's cyclic-roll pseudo-code, kept to reproduce the paper: its last shifted group lets the
            first G/2 tokens see the last G/2 tokens of the row. `"none"` shifts nothing: every head attends
            within the same groups, which never exchange information (the paper's "short attention"
            ablation; for studies only).
    """

    model_type = "llama_longlora"

    s2_attention: bool = True
    s2_group_size_ratio: float = 0.25
    s2_group_size: int | None = None
    s2_shift: str = "segments"

    def validate_architecture(self):
        super().validate_architecture()
        check_s2_settings(self.s2_shift, self.s2_group_size_ratio, self.s2_group_size)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters.pop("type", None)  # the legacy key we write for 4.x readers

    def to_dict(self):
        output = super().to_dict()
        # `save_pretrained` records only the class being saved; a checkpoint should load with every Auto class
        auto_map = output.get("auto_map") or {}
        for auto_class, target in AUTO_MAP.items():
            auto_map.setdefault(auto_class, target)
        output["auto_map"] = auto_map
        # transformers 4.x reads `rope_scaling` + `rope_theta`, not `rope_parameters`: without these a
        # 4.x reader silently drops the position interpolation. 5.x gives `rope_scaling` precedence, so
        # it must say the same thing as `rope_parameters`.
        legacy = legacy_rope_fields(output.get("rope_parameters") or {})
        if "rope_scaling" not in legacy:
            output.pop("rope_scaling", None)
        output.update(legacy)
        return output


__all__ = ["S2_SHIFTS", "LlamaLongLoRAConfig", "check_s2_settings", "legacy_rope_fields"]
