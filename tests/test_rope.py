"""RoPE config reading and Position Interpolation (longlora_hub.rope)."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longlora_hub.remote_code.configuration_llama_longlora import LlamaLongLoRAConfig
from longlora_hub.rope import apply_to_config, original_context_length, position_interpolation, read_rope
from longlora_hub.testing import tiny_llama_config


def llama(max_positions: int = 4096, **rope) -> dict:
    """A config.json-like dict in the 5.x form."""
    return {"model_type": "llama", "max_position_embeddings": max_positions, "rope_parameters": rope or None}


# ---------------------------------------------------------------------------------------------------------------
# read_rope / original_context_length


def test_read_rope_5x_default():
    rope = read_rope(llama(rope_type="default", rope_theta=500000.0))
    assert rope == {
        "rope_type": "default",
        "factor": 1.0,
        "rope_theta": 500000.0,
        "original_max_position_embeddings": 4096,
    }


def test_read_rope_without_any_rope_key_is_default():
    rope = read_rope({"max_position_embeddings": 2048})
    assert rope["rope_type"] == "default"
    assert rope["factor"] == 1.0
    assert rope["rope_theta"] == 10000.0
    assert rope["original_max_position_embeddings"] == 2048


def test_read_rope_legacy_4x_form():
    legacy = {"max_position_embeddings": 8192, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6}
    rope = read_rope(legacy)
    assert rope == {
        "rope_type": "linear",
        "factor": 2.0,
        "rope_theta": 1e6,
        "original_max_position_embeddings": 4096,
    }
    assert "type" not in rope


def test_read_rope_prefers_rope_scaling_like_transformers_5():
    # a config.json with both: transformers 5.x builds the model from `rope_scaling`
    both = {
        "max_position_embeddings": 16384,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    }
    assert read_rope(both)["factor"] == 4.0
    assert LlamaConfig(**both).rope_parameters["factor"] == 4.0


def test_read_rope_yarn_and_llama3_keep_their_keys():
    yarn = read_rope(
        llama(32768, rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, beta_fast=16, rope_theta=1e4)
    )
    assert yarn["original_max_position_embeddings"] == 4096
    assert yarn["beta_fast"] == 16
    llama3 = read_rope(
        llama(
            131072,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
            rope_theta=500000.0,
        )
    )
    assert llama3["rope_type"] == "llama3"
    assert llama3["original_max_position_embeddings"] == 8192
    assert llama3["low_freq_factor"] == 1.0


def test_read_rope_config_objects():
    config = tiny_llama_config(max_position_embeddings=1024, rope_parameters={"rope_type": "linear", "factor": 4.0})
    rope = read_rope(config)
    assert rope["rope_type"] == "linear"
    assert rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 256


def test_read_rope_reads_what_longlora_config_writes():
    config = LlamaLongLoRAConfig(
        **tiny_llama_config().to_dict()
        | {"max_position_embeddings": 2048, "rope_parameters": {"rope_type": "linear", "factor": 8.0}}
    )
    saved = config.to_dict()
    only_legacy = {k: v for k, v in saved.items() if k != "rope_parameters"}  # what a 4.x reader uses
    for form in (saved, only_legacy):
        rope = read_rope(form)
        assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("linear", 8.0, 256)


def test_read_rope_refuses_per_layer_rope():
    with pytest.raises(ValueError, match="per layer"):
        read_rope({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding": {"rope_type": "x"}}})


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (llama(4096, rope_type="default"), 4096),
        (llama(8192, rope_type="linear", factor=2.0), 4096),
        (llama(32768, rope_type="yarn", factor=8.0, original_max_position_embeddings=4096), 4096),
        (llama(131072, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192), 8192),
        (llama(4096, rope_type="dynamic", factor=2.0), 4096),
    ],
)
def test_original_context_length(config, expected):
    assert original_context_length(config) == expected


def test_original_context_length_needs_max_positions():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        original_context_length({"rope_parameters": {"rope_type": "linear", "factor": 2.0}})


# ---------------------------------------------------------------------------------------------------------------
# position_interpolation


@pytest.mark.parametrize(
    ("target", "ceil", "factor", "max_positions"),
    [
        (8192, False, 2.0, 8192),
        (32768, False, 8.0, 32768),
        (8192, True, 2.0, 8192),
        (32768, True, 8.0, 32768),
        (100000, False, 100000 / 4096, 100000),
        # the reference's ceil: 24.4 -> 25, and the config then covers what factor 25 covers
        (100000, True, 25.0, 25 * 4096),
    ],
)
def test_linear_from_unscaled(target, ceil, factor, max_positions):
    result = position_interpolation(llama(4096, rope_type="default", rope_theta=10000.0), target, ceil=ceil)
    assert result["rope_parameters"] == {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
    assert result["max_position_embeddings"] == max_positions
    assert original_context_length({**result, "model_type": "llama"}) == 4096


@pytest.mark.parametrize(
    "base",
    [
        llama(8192, rope_type="linear", factor=2.0, rope_theta=10000.0),
        {"max_position_embeddings": 8192, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0},
    ],
    ids=["5.x", "4.x"],
)
def test_linear_factors_multiply(base):
    # 4k pretrained, extended to 8k (factor 2), extended again to 16k: factor 4, not 2 (the reference's bug)
    for ceil in (False, True):
        result = position_interpolation(base, 16384, ceil=ceil)
        assert result["rope_parameters"]["factor"] == 4.0
        assert result["max_position_embeddings"] == 16384
    ceiled = position_interpolation(base, 20000, ceil=True)  # step ceil(20000 / 8192) = 3
    assert ceiled["rope_parameters"]["factor"] == 6.0
    assert ceiled["max_position_embeddings"] == 3 * 8192


def test_rope_theta_and_partial_rotary_factor_are_kept():
    base = llama(4096, rope_type="default", rope_theta=500000.0, partial_rotary_factor=0.5)
    params = position_interpolation(base, 16384)["rope_parameters"]
    assert params["rope_theta"] == 500000.0
    assert params["partial_rotary_factor"] == 0.5


def test_yarn():
    result = position_interpolation(llama(4096, rope_type="default", rope_theta=10000.0), 16384, rope_type="yarn")
    assert result["rope_parameters"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    }
    assert result["max_position_embeddings"] == 16384
    assert position_interpolation(llama(4096), 10000, rope_type="yarn", ceil=True)["rope_parameters"]["factor"] == 3.0


def test_dynamic_keeps_max_positions_at_the_pretraining_context():
    # transformers' dynamic NTK rescales only beyond max_position_embeddings
    result = position_interpolation(llama(4096, rope_type="default"), 16384, rope_type="dynamic")
    assert result["rope_parameters"]["rope_type"] == "dynamic"
    assert result["rope_parameters"]["factor"] == 4.0
    assert result["max_position_embeddings"] == 4096


@pytest.mark.parametrize("target", [4096, 2048, 1])
def test_nothing_to_extend(target):
    with pytest.raises(ValueError, match=r"Nothing to extend.*covers 4096 tokens"):
        position_interpolation(llama(4096), target)


@pytest.mark.parametrize(
    ("rope", "new_type"),
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "linear"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "yarn"),
        ({"rope_type": "dynamic", "factor": 2.0}, "linear"),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "linear",
        ),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "linear"),
        ({"rope_type": "linear", "factor": 2.0}, "yarn"),
        ({"rope_type": "linear", "factor": 2.0}, "dynamic"),
    ],
)
def test_non_composable_scalings_are_refused(rope, new_type):
    with pytest.raises(ValueError, match=f"already uses '{rope['rope_type']}' RoPE scaling.*; (extend|use)"):
        position_interpolation(llama(16384, **rope), 65536, rope_type=new_type)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rope_type must be one of"):
        position_interpolation(llama(4096), 8192, rope_type="ntk")
    with pytest.raises(ValueError, match="positive number of tokens"):
        position_interpolation(llama(4096), -8192)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        position_interpolation({"rope_parameters": {"rope_type": "default"}}, 8192)


def test_apply_to_config():
    config = tiny_llama_config()  # 256 positions
    result = apply_to_config(config, 1024)
    assert config.max_position_embeddings == 1024
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert result["rope_parameters"] == config.rope_parameters
    assert result["rope_parameters"] is not config.rope_parameters
    # the config still round-trips through transformers with the same RoPE
    assert LlamaConfig(**config.to_dict()).rope_parameters["factor"] == 4.0


# ---------------------------------------------------------------------------------------------------------------
# the invariant Position Interpolation rests on


def rotary(config: LlamaConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embedding = LlamaRotaryEmbedding(config)
    return embedding(torch.zeros(1, dtype=torch.float32), positions[None])


@pytest.mark.parametrize("target", [512, 1024, 2048])
def test_pi_position_x_rotates_like_unscaled_x_over_factor(target):
    plain = tiny_llama_config()  # 256 positions
    scaled = tiny_llama_config()
    factor = apply_to_config(scaled, target)["rope_parameters"]["factor"]
    assert factor == target / 256
    positions = torch.arange(target, dtype=torch.float32)
    cos, sin = rotary(scaled, positions)
    cos_ref, sin_ref = rotary(plain, positions / factor)
    torch.testing.assert_close(cos, cos_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=1e-5, rtol=0)
    # every extended position lands inside the pretrained range, and the scaling really changed something
    assert (positions / factor).max() < 256
    assert not torch.allclose(cos, rotary(plain, positions)[0], atol=1e-3)
