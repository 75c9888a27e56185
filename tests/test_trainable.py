"""What each `trainable` mode trains, read from the PEFT model itself (the names of its parameters that require
gradients), and the check that stops a run when a library release changes it: PEFT 0.22 matches a `modules_to_save`
entry only as a whole name, so the entry `norm` silently stopped training every layer's norm."""

import importlib.util
from pathlib import Path

import pytest

from longlora_hub.testing import tiny_llama
from longlora_hub.trainable import check_trainable, lora_config, promised_trainable

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "recipes" / "sft.py")
sft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sft)

LAYERS = 2  # the tiny Llama's


def wrapped(mode: str, extra: tuple[str, ...] = ()):
    """The tiny Llama as a mode sets it up for training, and what the mode promised before PEFT wrapped it."""
    from peft import get_peft_model

    model = tiny_llama()
    promised = promised_trainable(model, mode, extra_modules_to_save=extra)
    peft_config = lora_config(mode, extra_modules_to_save=extra)
    return (model if peft_config is None else get_peft_model(model, peft_config)), promised


def requires_grad(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def expected_names(mode: str) -> set[str]:
    """The trainable parameters a mode means on a Llama, spelled out as PEFT names them."""
    prefix = "base_model.model.model."
    lora = {
        f"{prefix}layers.{i}.self_attn.{projection}.lora_{half}.default.weight"
        for i in range(LAYERS)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj")
        for half in ("A", "B")
    }
    if mode == "lora":
        return lora
    full = {f"{prefix}{name}.modules_to_save.default.weight" for name in ("embed_tokens", "norm")}
    for i in range(LAYERS):
        full |= {
            f"{prefix}layers.{i}.{norm}.modules_to_save.default.weight"
            for norm in ("input_layernorm", "post_attention_layernorm")
        }
    return lora | full


@pytest.mark.parametrize("mode", ["longlora", "lora"])
def test_a_lora_mode_trains_exactly_its_modules(mode):
    model, promised = wrapped(mode)
    assert requires_grad(model) == expected_names(mode)
    check_trainable(model, promised, mode)


def test_full_fine_tuning_trains_every_parameter():
    model, promised = wrapped("full")
    assert requires_grad(model) == {name for name, _ in model.named_parameters()}
    check_trainable(model, promised, "full")


def test_a_module_that_stops_training_is_named():
    model, promised = wrapped("longlora")
    model.base_model.model.model.layers[1].post_attention_layernorm.modules_to_save.default.weight.requires_grad_(False)
    for layer in model.base_model.model.model.layers:
        layer.self_attn.v_proj.lora_B.default.weight.requires_grad_(False)
        layer.self_attn.v_proj.lora_A.default.weight.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"these do not train: v_proj \(lora\) x 2, post_attention_layernorm \(full\)\."
    ):
        check_trainable(model, promised, "longlora")


def test_a_module_that_trains_unasked_is_named():
    model, promised = wrapped("lora")
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(
        ValueError, match=r"trainable: lora is not what PEFT .* set up: these train without being asked: lm_head"
    ):
        check_trainable(model, promised, "lora")


def test_more_modules_to_save_are_part_of_the_promise():
    model, promised = wrapped("longlora", extra=("lm_head",))
    assert promised["lm_head"] == "full"
    assert "base_model.model.lm_head.modules_to_save.default.weight" in requires_grad(model)
    check_trainable(model, promised, "longlora")


def test_the_recipe_stops_before_its_first_step_when_peft_drops_the_norms(tmp_path, monkeypatch):
    """The names PEFT is given that match the final norm alone, under the old and the new matching rule alike: what
    `norm` became with PEFT 0.22."""
    from longlora_hub import trainable

    monkeypatch.setattr(trainable, "EMBEDDING_AND_NORMS", ("embed_tokens", "model.norm"))
    output = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"trainable: longlora is not what PEFT .* set up: these do not train: input_layernorm \(full\) x 2, "
        r"post_attention_layernorm \(full\) x 2\. The run is stopped before its first step",
    ):
        sft.main(["--config", str(ROOT / "recipes/configs/tiny/extend.yaml"), "--output_dir", str(output)])
    assert not list(output.glob("checkpoint-*")) and not (output / "adapter_model.safetensors").exists()
