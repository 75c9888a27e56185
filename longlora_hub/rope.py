"""RoPE configuration: reading the forms checkpoints use and computing Position Interpolation (PI).

This is the only module that knows how a config spells its RoPE. Two forms exist on the Hub:

- transformers 5.x: `rope_parameters = {"rope_type": ..., "factor": ..., "rope_theta": ...}`;
- transformers 4.x: `rope_scaling = {"type" or "rope_type": ..., "factor": ...}` plus a top-level `rope_theta`.

Both are read into one normalised dict by [`read_rope`]; [`position_interpolation`] computes the RoPE that
extends a checkpoint to a longer context. Everything here is pure (dicts in, dicts out) apart from
[`apply_to_config`], which writes the result onto a transformers config object.

Conventions:

- `max_position_embeddings` is the context the checkpoint's RoPE covers. For a linearly scaled checkpoint the
  pretraining context is therefore `max_position_embeddings / factor`. Some older checkpoints (the LongLoRA
  reference scripts, Vicuna-16k) left `max_position_embeddings` at the pretraining length next to a linear
  factor; set it to `factor x pretraining length` in their `config.json` before extending them again.
- Extensions compose only when both are linear: the factors multiply (a model pretrained at 4k and extended to
  8k with factor 2, extended again to 16k, gets factor 4). Any other existing scaling (yarn, dynamic, llama3,
  longrope, ...) cannot be stacked with a new extension as one RoPE that transformers can run, so
  [`position_interpolation`] refuses it and says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# one definition, in the remote-code config (which may import nothing of this package), used here too
from .remote_code.configuration_llama_longlora import legacy_rope_fields

DEFAULT_ROPE_THETA = 10_000.0
EXTENSION_ROPE_TYPES = ("linear", "yarn", "dynamic")
# RoPE types whose `rope_parameters` carry the pretraining context themselves
_TYPES_WITH_ORIGINAL = ("yarn", "llama3", "longrope")


def _config_as_dict(config: Any) -> dict[str, Any]:
    """The RoPE-relevant fields of a config dict (`config.json` contents) or a transformers config object."""
    if isinstance(config, Mapping):
        return dict(config)
    fields: dict[str, Any] = {}
    for name in ("max_position_embeddings", "rope_theta", "original_max_position_embeddings"):
        value = getattr(config, name, None)
        if value is not None:
            fields[name] = value
    # 5.x objects hold `rope_parameters` (and alias `rope_scaling` to it); 4.x objects only have `rope_scaling`
    rope = getattr(config, "rope_parameters", None)
    if rope is None:
        fields["rope_scaling"] = getattr(config, "rope_scaling", None)
    else:
        fields["rope_parameters"] = rope
    return fields


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and value != float("inf")


def read_rope(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    r"""
    Read the RoPE of a config in any of the forms transformers has used.

    Args:
        config (`Mapping[str, Any]` or `PreTrainedConfig`):
            The contents of a `config.json` or a transformers config object (4.x or 5.x).

    Returns:
        `dict[str, Any]`: The RoPE with `rope_type` (`"default"` when unscaled), `factor` (`1.0` when unscaled),
        `rope_theta`, `original_max_position_embeddings` (the pretraining context) when the config says or implies
        it, and any other key of the source (`beta_fast`, `low_freq_factor`, `partial_rotary_factor`, ...). The
        legacy `type` key is folded into `rope_type`.

    Raises:
        `ValueError`: If `rope_parameters` or `rope_scaling` is not an object, the factor or `rope_theta` is not a
            positive number, or the RoPE is given per layer type, which no Llama checkpoint does.
    """
    source = _config_as_dict(config)
    for key in ("rope_parameters", "rope_scaling"):
        if source.get(key) is not None and not isinstance(source[key], Mapping):
            raise ValueError(
                f'The config\'s {key} must be an object such as {{"rope_type": "linear", "factor": 4.0}}, got '
                f"{source[key]!r}; fix it in config.json (or remove it for unscaled RoPE)."
            )
    parameters = source.get("rope_parameters") or {}
    legacy = source.get("rope_scaling") or {}
    # transformers 5.x lets `rope_scaling` win over `rope_parameters` when a config.json has both
    chosen = dict(legacy or parameters)
    if any(isinstance(value, Mapping) for value in chosen.values()):
        raise ValueError(
            f"This config sets a RoPE per layer type ({sorted(chosen)}); only a single RoPE (Llama-family "
            "checkpoints) is supported."
        )
    rope_type = chosen.pop("rope_type", None) or chosen.get("type") or "default"
    chosen.pop("type", None)
    theta = next(
        (
            value
            for value in (chosen.pop("rope_theta", None), source.get("rope_theta"), parameters.get("rope_theta"))
            if value is not None
        ),
        None,
    )
    if theta is not None and not _is_positive_number(theta):
        raise ValueError(
            f"The config's rope_theta must be a positive number (10000.0 for Llama 2, 500000.0 for Llama 3), got "
            f"{theta!r}; fix it in config.json."
        )
    if rope_type != "default" and "factor" in chosen and not _is_positive_number(chosen["factor"]):
        raise ValueError(
            f"The config's RoPE factor must be a positive number (the context's multiple of the pretraining one), got "
            f"{chosen['factor']!r} for {rope_type!r} RoPE; fix the factor in config.json's rope_parameters (or "
            "rope_scaling), or remove the scaling for unscaled RoPE."
        )
    max_positions = source.get("max_position_embeddings")

    rope: dict[str, Any] = {"rope_type": rope_type, **chosen, "rope_theta": float(theta or DEFAULT_ROPE_THETA)}
    original = None
    if rope_type in _TYPES_WITH_ORIGINAL:
        # like transformers: a top-level value (Phi-3 style) first, then the RoPE dict, then max_position_embeddings
        original = source.get("original_max_position_embeddings") or chosen.get("original_max_position_embeddings")
        original = original or max_positions
    factor = chosen.get("factor")
    if rope_type == "default":
        factor = 1.0
    elif factor is None:
        # longrope/yarn may leave the factor implicit: the ratio of the two contexts
        factor = max_positions / original if max_positions and original else 1.0
    rope["factor"] = float(factor)
    if original is None and max_positions is not None:
        # linear scaling covers `factor` times the pretraining context; default and dynamic RoPE cover it as is
        original = round(max_positions / rope["factor"]) if rope_type == "linear" else max_positions
    if original is not None:
        rope["original_max_position_embeddings"] = int(original)
    return rope


def original_context_length(config: Mapping[str, Any] | Any) -> int:
    r"""
    The context the weights were pretrained at, before any RoPE scaling.

    Args:
        config (`Mapping[str, Any]` or `PreTrainedConfig`):
            The contents of a `config.json` or a transformers config object.

    Returns:
        `int`: `max_position_embeddings / factor` for a linearly scaled checkpoint, the
        `original_max_position_embeddings` of a yarn, llama3 or longrope one, otherwise `max_position_embeddings`.

    Raises:
        `ValueError`: If the config has no `max_position_embeddings` to derive it from.
    """
    original = read_rope(config).get("original_max_position_embeddings")
    if original is None:
        raise ValueError("The config has no `max_position_embeddings`, so its pretraining context is unknown.")
    return original


def _step_factor(target_length: int, from_length: int, ceil: bool) -> float:
    if ceil:
        return float(-(-target_length // from_length))  # integer ceiling, no float rounding on exact ratios
    return target_length / from_length


def position_interpolation(
    config: Mapping[str, Any] | Any, target_length: int, rope_type: str = "linear", ceil: bool = False
) -> dict[str, Any]:
    r"""
    Compute the RoPE that extends a checkpoint to `target_length` tokens.

    - `"linear"` (Position Interpolation): `factor = target_length / max_position_embeddings`, so position x of the
      extended model sees the rotation of position x / factor of the current one. On an already linearly scaled
      checkpoint the factors multiply, so the result still maps back to the pretraining positions.
    - `"yarn"`: `factor = target_length / pretraining context`, with `original_max_position_embeddings` set to
      the pretraining context.
    - `"dynamic"` (dynamic NTK): `factor = target_length / pretraining context`. transformers' dynamic NTK rescales
      only beyond `max_position_embeddings`, so `max_position_embeddings` stays at the pretraining context;
      raising it would switch the scaling off for every length up to the target.

    Only unscaled checkpoints can take any of the three; linearly scaled ones only `"linear"`.

    Args:
        config (`Mapping[str, Any]` or `PreTrainedConfig`):
            The contents of the checkpoint's `config.json` or its config object.
        target_length (`int`):
            The context to extend to, in tokens. Must be above the current `max_position_embeddings`.
        rope_type (`str`, *optional*, defaults to `"linear"`):
            One of `"linear"`, `"yarn"` or `"dynamic"`.
        ceil (`bool`, *optional*, defaults to `False`):
            Round this extension's factor up to an integer, like the LongLoRA reference (100k from 4k gives 25
            rather than 24.4). `max_position_embeddings` then becomes the context the rounded factor covers
            (102400 in that example), so `max_position_embeddings / factor` stays the pretraining context.

    Returns:
        `dict[str, Any]`: `{"rope_parameters": {...}, "max_position_embeddings": int}`, ready for a transformers 5.x
        config.

    Raises:
        `ValueError`: If `target_length` is not above the current context, if `rope_type` is unknown, or if the
        checkpoint's existing RoPE scaling cannot be combined with the requested one.
    """
    if rope_type not in EXTENSION_ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {EXTENSION_ROPE_TYPES}, got {rope_type!r}.")
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= 0:
        raise ValueError(f"The target context length must be a positive number of tokens, got {target_length!r}.")
    source = _config_as_dict(config)
    current = source.get("max_position_embeddings")
    if current is None:
        raise ValueError("The config has no `max_position_embeddings`, so the current context is unknown.")
    current = int(current)
    if target_length <= current:
        raise ValueError(
            f"Nothing to extend: the checkpoint already covers {current} tokens (max_position_embeddings) and the "
            f"target is {target_length}. Pass a context length above {current}."
        )
    base = read_rope(source)
    base_type = base["rope_type"]
    composable = base_type == "default" or (base_type == "linear" and rope_type == "linear")
    if not composable:
        if base_type == "linear":
            fix = "extend it with rope_type 'linear' (its factor is then multiplied)"
        else:
            fix = (
                "extend a checkpoint without RoPE scaling instead (e.g. the model this one was derived from), "
                "whose pretraining context is the starting point of the new extension"
            )
        raise ValueError(
            f"The checkpoint already uses {base_type!r} RoPE scaling (factor {base['factor']:g}), which cannot be "
            f"combined with a new {rope_type!r} extension into one RoPE that transformers runs; {fix}."
        )

    pretraining = base["original_max_position_embeddings"]
    rope_parameters: dict[str, Any] = {"rope_type": rope_type}
    if rope_type == "linear":
        step = _step_factor(target_length, current, ceil)
        rope_parameters["factor"] = base["factor"] * step
        max_positions = round(current * step) if ceil else target_length
    else:
        # the base is unscaled here, so the current context is the pretraining one
        factor = _step_factor(target_length, pretraining, ceil)
        rope_parameters["factor"] = factor
        if rope_type == "yarn":
            rope_parameters["original_max_position_embeddings"] = pretraining
            max_positions = round(pretraining * factor) if ceil else target_length
        else:
            max_positions = pretraining
    rope_parameters["rope_theta"] = base["rope_theta"]
    if "partial_rotary_factor" in base:
        rope_parameters["partial_rotary_factor"] = base["partial_rotary_factor"]
    return {"rope_parameters": rope_parameters, "max_position_embeddings": max_positions}


def apply_to_config(config: Any, target_length: int, rope_type: str = "linear", ceil: bool = False) -> dict[str, Any]:
    r"""
    Extend a transformers config in place with [`position_interpolation`].

    Args:
        config (`PreTrainedConfig`):
            The config to update: its `rope_parameters` and `max_position_embeddings` are replaced.
        target_length (`int`):
            The context to extend to, in tokens.
        rope_type (`str`, *optional*, defaults to `"linear"`):
            One of `"linear"`, `"yarn"` or `"dynamic"`.
        ceil (`bool`, *optional*, defaults to `False`):
            Round the extension's factor up to an integer, like the LongLoRA reference.

    Returns:
        `dict[str, Any]`: What was applied, as returned by [`position_interpolation`].
    """
    result = position_interpolation(config, target_length, rope_type=rope_type, ceil=ceil)
    config.max_position_embeddings = result["max_position_embeddings"]
    config.rope_parameters = dict(result["rope_parameters"])
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return result


def describe(rope: Mapping[str, Any]) -> str:
    """A one-line, human-readable summary of a [`read_rope`] dict, e.g. `"linear RoPE, factor 8"`."""
    if rope["rope_type"] == "default":
        return "unscaled RoPE"
    return f"{rope['rope_type']} RoPE, factor {rope['factor']:g}"


__all__ = [
    "EXTENSION_ROPE_TYPES",
    "apply_to_config",
    "describe",
    "legacy_rope_fields",
    "original_context_length",
    "position_interpolation",
    "read_rope",
]
