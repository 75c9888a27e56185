"""The streamed merge: merged logits equal base + adapter, both output architectures, sharding and dtype, the CLI,
bad input, and its peak memory against loading the model whole (through `benchmarks/merge.py`)."""

import inspect
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from longlora_hub.cli import main as cli
from longlora_hub.merge import MergeError, load_adapter, merge_adapter
from longlora_hub.shards import DEFAULT_MAX_SHARD_SIZE, parse_size, read_header
from longlora_hub.testing import sharded_base_and_adapter

from .test_training import TINY_EXTEND, run, short

ROOT = Path(__file__).resolve().parents[1]


def _ids(seed=0, length=256, vocab=300):
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def _base_plus_adapter(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    return PeftModel.from_pretrained(model, adapter).eval()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A stock Llama base in 8 shards and a longlora adapter that changes LoRA, embeddings and norms."""
    return sharded_base_and_adapter(tmp_path_factory.mktemp("sharded"), num_shards=8, max_position_embeddings=512)


def test_trained_adapter_merges_to_the_trained_model(tmp_path):
    """A real tiny training run: the merged LlamaLongLoRA checkpoint (written by the CLI) gives the trained
    model's logits, keeps the remote code and the run's RoPE, and records the run for the model card."""
    from transformers import AutoModelForCausalLM

    trainer = run(TINY_EXTEND, tmp_path / "run", *short("--max_steps", "3"))
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged_dir = tmp_path / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    assert type(merged).__name__ == "LlamaLongLoRAForCausalLM"
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 2.0 and config["rope_scaling"]["type"] == "linear"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_llama_longlora.")
    for name in ("modeling_llama_longlora.py", "s2_attention.py", "tokenizer.json", "generation_config.json"):
        assert (merged_dir / name).is_file(), name
    record = json.loads((merged_dir / "longlora_hub.json").read_text())
    assert record["kind"] == "merged" and record["stage"] == "extend" and record["training"]["max_steps"] == 3
    ids = _ids(length=512)
    with torch.no_grad():
        expected = trainer.model.eval()(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
    again = CliRunner().invoke(cli, ["merge", str(tmp_path / "run"), str(merged_dir)])
    assert again.exit_code == 1 and "not empty" in again.output


def test_stock_llama_output_sharded_in_bf16(sharded, tmp_path):
    """--architecture llama: a stock config (no auto_map, no S² keys, legacy RoPE fields), loadable without remote
    code; the weights equal the fp32 merge rounded once to bf16, split into shards with an index."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base, adapter = sharded
    fp32 = merge_adapter(adapter, tmp_path / "fp32")
    bf16 = merge_adapter(adapter, tmp_path / "bf16", architecture="llama", dtype="bfloat16", max_shard_size=60_000)
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(bf16.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {path.name for path in shards}
    config = json.loads((bf16 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not {"auto_map", "s2_attention", "s2_group_size_ratio"} & set(config)
    assert config["dtype"] == "bfloat16" and "rope_theta" in config
    assert not list(bf16.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(bf16)  # no trust_remote_code
    assert type(model) is LlamaForCausalLM and model.dtype == torch.bfloat16
    with safe_open(fp32 / "model.safetensors", "pt") as reference:
        weights = {name: reference.get_tensor(name) for name in reference.keys()}
    state = model.state_dict()
    assert set(state) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name


def test_merged_equals_base_plus_adapter_for_every_changed_tensor(sharded, tmp_path):
    """A multi-shard stock base turned into LlamaLongLoRA: logits equal PEFT's base + adapter (atol 1e-4), and the
    embeddings, norms and LoRA-targeted projections all changed from the base."""
    from transformers import AutoModelForCausalLM

    base, adapter = sharded
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    reference = _base_plus_adapter(base, adapter)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    stock = AutoModelForCausalLM.from_pretrained(base).state_dict()
    changed = {name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, stock[name])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert "model.layers.1.self_attn.v_proj.weight" in changed and "model.layers.1.mlp.up_proj.weight" not in changed


def test_adapter_scaling_variants(tmp_path):
    """rslora, rank_pattern and alpha_pattern change the LoRA scale exactly as PEFT applies it (alpha / sqrt(r),
    with r read from the tensors)."""
    from peft import LoraConfig, get_peft_model

    from longlora_hub.testing import tiny_llama

    model = tiny_llama()
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        alpha_pattern={"v_proj": 2},
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = load_adapter(tmp_path / "adapter")
    assert lora.deltas["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2)
    assert lora.deltas["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2**0.5)
    assert lora.deltas["model.layers.0.self_attn.v_proj.weight"].scale == pytest.approx(2 / 2)
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=base, architecture="llama")
    from transformers import AutoModelForCausalLM

    ids = _ids(vocab=300)
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _tied_base_and_adapter(folder, peft_config, seed=0):
    """A tiny tied Llama saved with `save_pretrained` (so no lm_head.weight on disk) and an adapter for it with every
    trainable tensor moved off its initial value, as training would."""
    return _base_and_adapter(folder, peft_config, seed, tie_word_embeddings=True)


def _base_and_adapter(folder, peft_config, seed=0, **overrides):
    """A tiny Llama saved with `save_pretrained` (one model.safetensors) and an adapter for it with every trainable
    tensor moved off its initial value, as training would."""
    from peft import get_peft_model

    from longlora_hub.testing import tiny_llama

    model = tiny_llama(seed, **overrides)
    base = folder / "base"
    model.save_pretrained(base)
    peft_model = get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(folder / "adapter")
    return base, folder / "adapter"


def _weights(folder):
    """Every tensor of a saved checkpoint, whichever shards hold it."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def _adapter_logits(base, adapter, ids):
    """Logits of PEFT's base + adapter, and of PEFT's own `merge_and_unload()` of it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    return unmerged, merged


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied base and a longlora adapter whose trained embedding differs from the base's."""
    from longlora_hub.trainable import lora_config

    return _tied_base_and_adapter(tmp_path_factory.mktemp("tied"), lora_config("longlora"))


@pytest.mark.parametrize("architecture", ["llama_longlora", "llama"])
def test_tied_base_with_trained_embedding_is_untied(tied, tmp_path, architecture):
    """PEFT trains a copy of a tied embedding while lm_head keeps the original: the merge writes that original as
    lm_head.weight and unties, so the logits equal PEFT's (base + adapter and merge_and_unload); a tied config would
    make the trained copy the output layer too."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base, adapter = tied
    base_weights = _weights(base)
    assert (
        "lm_head.weight" not in base_weights and json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    )
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture=architecture)
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    weights = _weights(merged_dir)
    assert torch.equal(weights["lm_head.weight"], base_weights["model.embed_tokens.weight"])
    assert not torch.equal(weights["model.embed_tokens.weight"], base_weights["model.embed_tokens.weight"])
    if architecture == "llama":
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # no trust_remote_code
        assert type(merged) is LlamaForCausalLM
    else:
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True)
    ids = _ids()
    unmerged, peft_merged = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        logits = merged.eval()(ids).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, peft_merged, atol=1e-4, rtol=0)


def test_tied_base_untied_in_shards(tied, tmp_path):
    """The added lm_head.weight is planned like any tensor: it lands in a shard, cast to the output dtype, and the
    index maps it there."""
    base, adapter = tied
    merged_dir = merge_adapter(
        adapter, tmp_path / "merged", base=base, architecture="llama", dtype="bfloat16", max_shard_size=60_000
    )
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {path.name for path in shards}
    with safe_open(merged_dir / index["weight_map"]["lm_head.weight"], "pt") as handle:
        head = handle.get_tensor("lm_head.weight")
    assert torch.equal(head, _weights(base)["model.embed_tokens.weight"].to(torch.bfloat16))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _weights(merged_dir).values())


@pytest.mark.parametrize("kind", ["lora", "ensure_weight_tying"])
def test_tied_base_keeps_its_tie(tmp_path, kind):
    """Plain LoRA leaves the embedding alone, and PEFT's `ensure_weight_tying` trains one tensor for both layers: the
    tie is kept and no lm_head.weight is written."""
    from peft import LoraConfig

    from longlora_hub.trainable import EMBEDDING_AND_NORMS, LORA_TARGETS, lora_config

    if kind == "lora":
        config = lora_config("lora")
    else:
        config = LoraConfig(
            target_modules=list(LORA_TARGETS), modules_to_save=list(EMBEDDING_AND_NORMS), ensure_weight_tying=True
        )
    base, adapter = _tied_base_and_adapter(tmp_path, config)
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture="llama")
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _weights(merged_dir)
    from transformers import AutoModelForCausalLM

    ids = _ids()
    unmerged, _ = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer", ["embed_tokens", "lm_head"])
def test_tied_base_with_lora_on_a_tied_layer(tmp_path, layer):
    """LoRA on one layer of a tied pair changes only that layer in PEFT's model (PEFT also saves a copy of the layer's
    base weight): the merge unties and gives the adapter's logits. PEFT's own merge_and_unload folds the delta into
    the shared tensor, so it is not the reference here (PEFT warns about merging such an adapter)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    base, adapter = _tied_base_and_adapter(tmp_path, LoraConfig(target_modules=["q_proj", "v_proj", layer]))
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture="llama")
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    weights, base_weights = _weights(merged_dir), _weights(base)
    unchanged = "lm_head.weight" if layer == "embed_tokens" else "model.embed_tokens.weight"
    assert torch.equal(weights[unchanged], base_weights["model.embed_tokens.weight"])
    ids = _ids()
    unmerged, _ = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-4, rtol=0)


def test_bad_input_is_refused_and_leaves_nothing(sharded, tmp_path):
    from longlora_hub.testing import tiny_llama

    base, adapter = sharded
    other = tmp_path / "other-base"
    tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(other)
    with pytest.raises(MergeError, match="trained on another base"):
        merge_adapter(adapter, tmp_path / "out", base=other)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        merge_adapter(base, tmp_path / "out")
    with pytest.raises(MergeError, match="architecture must be one of"):
        merge_adapter(adapter, tmp_path / "out", architecture="mistral")
    with pytest.raises(MergeError, match="dtype must be one of"):
        merge_adapter(adapter, tmp_path / "out", dtype="int8")
    pickled = tmp_path / "pickled-base"
    model = tiny_llama()
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # what older checkpoints ship
    with pytest.raises(MergeError, match=r"\.bin weights"):
        merge_adapter(adapter, tmp_path / "out", base=pickled)
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(tmp_path / "out"), "--max-shard-size", "lots"])
    assert result.exit_code == 2 and "is not a size" in result.output
    with pytest.raises(MergeError, match=r"max_shard_size must be a positive size: 'lots' is not a size"):
        merge_adapter(adapter, tmp_path / "out", max_shard_size="lots")


@pytest.fixture
def no_shard_written(monkeypatch):
    """Fail if the merge starts writing a shard: the errors below must all come before the first one."""
    import longlora_hub.merge as merge_module

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was written before the error")

    monkeypatch.setattr(merge_module, "ShardWriter", refuse)


@pytest.mark.parametrize(
    ("config_text", "error", "message"),
    [
        ("{not json", ValueError, r"config\.json is not valid JSON .*restore it from the original checkpoint"),
        ('["a", "list"]', ValueError, r"config\.json holds a JSON list, not an object"),
        ({"model_type": "mistral"}, MergeError, r"is a 'mistral' model; this merge writes Llama-family"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0}}, ValueError, r"RoPE factor must be a positive"),
        ({"rope_scaling": "linear"}, ValueError, r"rope_scaling must be an object"),
        ({"num_attention_heads": "four"}, MergeError, r"cannot give a llama(_longlora)? config .*fix that value"),
    ],
)
def test_the_base_config_is_checked_before_any_shard(sharded, tmp_path, no_shard_written, config_text, error, message):
    base, adapter = sharded
    broken = Path(shutil.copytree(base, tmp_path / "base"))
    if not isinstance(config_text, str):
        config_text = json.dumps(json.loads((base / "config.json").read_text()) | config_text)
    (broken / "config.json").write_text(config_text)
    with pytest.raises(error, match=message):
        merge_adapter(adapter, tmp_path / "out", base=broken, architecture="llama")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]  # no output, no staging folder
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(tmp_path / "out"), "--base", str(broken)])
    assert result.exit_code == 1 and re.search(message, result.output), result.output
    assert "Traceback" not in result.output


def test_adapter_shapes_and_disk_space_are_checked_before_any_shard(sharded, tmp_path, no_shard_written, monkeypatch):
    from longlora_hub import merge as merge_module
    from longlora_hub.testing import tiny_llama

    base, adapter = sharded
    other = tmp_path / "other-base"
    tiny_llama(hidden_size=32, intermediate_size=64).save_pretrained(other)
    with pytest.raises(MergeError, match=r"has shape .* but the base's is .*trained on another base"):
        merge_adapter(adapter, tmp_path / "out", base=other)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(MergeError, match=r"need .* GB but .* has 0\.00 GB free; free some space or pass an OUTPUT"):
        merge_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_an_adapter_config_that_is_not_an_object_is_refused(sharded, tmp_path):
    _, adapter = sharded
    broken = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    (broken / "adapter_config.json").write_text("[]")
    with pytest.raises(MergeError, match=r"adapter_config\.json holds a JSON list, not an object"):
        merge_adapter(broken, tmp_path / "out")
    (broken / "adapter_config.json").write_text("{")
    with pytest.raises(MergeError, match=r"adapter_config\.json is not valid JSON"):
        merge_adapter(broken, tmp_path / "out")


def test_a_rerun_removes_what_a_killed_merge_left(sharded, tmp_path):
    """`kill -9` in the middle of a merge (here the merge kills itself while writing its first tensor) leaves its
    hidden staging folder; the next merge to the same output removes it and says so."""
    _, adapter = sharded
    output = tmp_path / "merged"
    killed = (
        "import os, signal, sys\n"
        "import longlora_hub.merge as merge\n"
        "merge.ShardWriter.write = lambda self, *args: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from longlora_hub.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, "merge", str(adapter), str(output)], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    (left,) = tmp_path.glob(".merged.*.partial")
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(output)])
    assert result.exit_code == 0, result.output
    assert f"removed {left}, left by an interrupted run (process" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


def test_streamed_merge_memory_against_loading_whole():
    """benchmarks/merge.py on a 170 MB model in 8 shards: the streamed merge's peak memory is at most a third of
    loading the model whole (each measured in a fresh process, VmHWM growth after imports). The model is large
    enough that glibc's heap noise (10-15 MiB from run to run in the streamed case) cannot decide the outcome."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--hidden", "768", "--intermediate", "2048"],
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    result = json.loads(done.stdout)
    if "NOT reset" in result["cases"]["streamed"]["memory"]:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    assert result["config"]["base_shards"] == 8 and result["config"]["model_mib"] > 150
    assert result["ratios"]["mem_streamed/load"] <= 1 / 3, result["cases"]


@pytest.fixture
def transformers_warnings():
    """A list of what transformers logs at WARNING and above (its logger does not propagate to caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    yield records
    logging.getLogger("transformers").removeHandler(handler)


def _lora_on_q_and_v(peft_config):
    """A LoraConfig for `_base_and_adapter`: LoRA on q and v, plus `peft_config`."""
    from peft import LoraConfig

    return LoraConfig(**{"target_modules": ["q_proj", "v_proj"], **peft_config})


def test_shards_are_planned_by_huggingface_hub(tmp_path):
    """The output files are huggingface_hub's plan (`split_torch_state_dict_into_shards`, what `save_pretrained`
    uses) for the output tensors in base order: names, grouping (a tensor over the limit gets its own file while the
    current one keeps filling), `metadata.total_size` and `weight_map`; the streamed writer fills them. One file is
    `model.safetensors` with no index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM

    base, adapter = _base_and_adapter(tmp_path, _lora_on_q_and_v({}))
    limit = 30_000  # the MLP matrices (32 KiB in fp32) are over it, the attention ones and the norms under it
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture="llama", max_shard_size="30KB")
    stand_ins = {
        e.name: torch.empty(e.shape, dtype=e.dtype, device="meta") for e in read_header(base / "model.safetensors")[0]
    }
    expected = split_torch_state_dict_into_shards(stand_ins, max_shard_size=limit)
    assert expected.is_sharded and len(expected.filename_to_tensors) > 8
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert index == {"metadata": expected.metadata, "weight_map": expected.tensor_to_filename}
    assert sorted(path.name for path in merged_dir.glob("*.safetensors")) == sorted(expected.filename_to_tensors)
    for name, tensors in expected.filename_to_tensors.items():
        with safe_open(merged_dir / name, "pt") as handle:
            assert sorted(handle.keys()) == sorted(tensors), name
            assert handle.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _weights(merged_dir).values())
    ids = _ids()
    unmerged, _ = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(logits, unmerged, atol=1e-4, rtol=0)

    single = merge_adapter(adapter, tmp_path / "single", base=base, architecture="llama")
    assert sorted(path.name for path in single.glob("*.safetensors")) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


def test_one_default_shard_size_shared_with_huggingface_hub(sharded, tmp_path, monkeypatch):
    """The Python API, the CLI (which passes nothing without the flag) and huggingface_hub share one default:
    5GB, 5 * 10**9 bytes (the API used to say 5 GiB while the CLI said 5GB)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    import longlora_hub.merge as merge_module

    hub_default = inspect.signature(split_torch_state_dict_into_shards).parameters["max_shard_size"].default
    api_default = inspect.signature(merge_adapter).parameters["max_shard_size"].default
    assert api_default == DEFAULT_MAX_SHARD_SIZE == hub_default == "5GB"
    assert parse_size(api_default) == 5 * 10**9
    calls = []
    monkeypatch.setattr(merge_module, "merge_adapter", lambda *args, **kwargs: calls.append(kwargs) or Path(args[1]))
    _, adapter = sharded
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert parse_size(calls[0].get("max_shard_size", api_default)) == 5 * 10**9
    help_text = CliRunner().invoke(cli, ["merge", "--help"]).output
    assert f"default: {DEFAULT_MAX_SHARD_SIZE}" in " ".join(help_text.split())


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("500MB", 500 * 10**6),
        ("5GB", 5 * 10**9),
        ("5gb", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("2GiB", 2 * 2**30),
        ("64KiB", 65536),
        ("1TB", 10**12),
    ],
)
def test_max_shard_size_option_reads_sizes(sharded, tmp_path, monkeypatch, text, size):
    """`--max-shard-size` is a click type: bytes, decimal units (as huggingface_hub) and binary ones (as
    transformers) arrive at merge_adapter as a number of bytes."""
    import longlora_hub.merge as merge_module

    calls = []
    monkeypatch.setattr(merge_module, "merge_adapter", lambda *args, **kwargs: calls.append(kwargs) or Path(args[1]))
    _, adapter = sharded
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(tmp_path / "out"), "--max-shard-size", text])
    assert result.exit_code == 0, result.output
    assert calls == [{"base": None, "architecture": "llama_longlora", "dtype": None, "max_shard_size": size}]


@pytest.mark.parametrize("text", ["lots", "5XB", "0", "-1GB", "5 GB B", ""])
def test_a_bad_max_shard_size_is_a_usage_error(sharded, tmp_path, no_shard_written, text):
    _, adapter = sharded
    result = CliRunner().invoke(cli, ["merge", str(adapter), str(tmp_path / "out"), "--max-shard-size", text])
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.output and "Invalid value for '--max-shard-size':" in result.output
    assert "write e.g. 5GB, 500MB, 2GiB or a number of bytes" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "LOHA"}, r"peft_type='LOHA': only LoRA adapters .* `merge_and_unload\(\)`"),
        ({"lora_alpha": "16"}, r"lora_alpha='16' is not a number"),
        ({"alpha_pattern": {"q_proj": "big"}}, r"alpha_pattern=\{'q_proj': 'big'\} does not map"),
        ({"use_rslora": "yes"}, r"use_rslora='yes' is not true or false"),
        ({"bias": "some"}, r"bias='some' is none of none, all, lora_only"),
        ({"use_dora": True}, r"use_dora=True: DoRA .*; merge it with PEFT's `merge_and_unload\(\)` instead\."),
        ({"lora_bias": True}, r"lora_bias=True: its LoRA B matrices carry biases"),
        ({"trainable_token_indices": [5, 6]}, r"trainable_token_indices=\[5, 6\]: it trains single rows"),
        ({"alora_invocation_tokens": [7, 8]}, r"alora_invocation_tokens=\[7, 8\]: .*serve the adapter unmerged"),
        ({"use_qalora": True}, r"use_qalora=True: QALoRA"),
        ({"monteclora_config": {"n_samples": 4}}, r"monteclora_config=\{'n_samples': 4\}: MonteCLoRA"),
        ({"use_bdlora": {"nblocks": 2}}, r"use_bdlora=\{'nblocks': 2\}: BD-LoRA"),
        ({"arrow_config": {"top_k": 2}}, r"arrow_config=\{'top_k': 2\}: Arrow routes .*serve the adapters unmerged"),
        ({"kasa_config": {"beta": 1}}, r"kasa_config=\{'beta': 1\}: KaSA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, r"layer_replication=\[\[0, 2\], \[1, 2\]\]: .*more layers"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, r"target_parameters=\['mlp.experts.down_proj'\]"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, r"megatron_config=.*Megatron's parallel layers"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' changes the base weights.*convert"),
        ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4' changes the base weights"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora' changes the base weights"),
        ({"init_lora_weights": "corda"}, r"init_lora_weights='corda' changes the base weights"),
        ({"init_lora_weights": "lora_ga"}, r"init_lora_weights='lora_ga' changes the base weights"),
        ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq': PEFT quantises the base weights again"),
        ({"init_lora_weights": "spectral"}, r"init_lora_weights='spectral' is an initialisation this merge does not"),
        ({"use_quantum_lora": True}, r"use_quantum_lora=True is a setting this merge does not know .*newer PEFT"),
        ({"future_scale": 0.5}, r"future_scale=0.5 is a setting this merge does not know"),
    ],
)
def test_adapter_config_allowlist_refuses(sharded, tmp_path, no_shard_written, changes, message):
    """Anything but plain LoRA, named by its field and value with what to do instead, before any shard; a field
    this merge does not know (a newer PEFT's) is refused unless unset."""
    _, adapter = sharded
    edited = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    config = json.loads((edited / "adapter_config.json").read_text()) | changes
    (edited / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=message) as error:
        merge_adapter(edited, tmp_path / "out")
    assert str(edited / "adapter_config.json") in str(error.value)
    assert not (tmp_path / "out").exists()


def test_adapter_config_fields_a_merge_ignores_pass(sharded):
    """Bookkeeping, training-time and init-only fields take any value; an unknown field passes when unset."""
    _, adapter = sharded
    config = json.loads((adapter / "adapter_config.json").read_text())
    from longlora_hub.merge import _check_adapter_config

    _check_adapter_config(config, adapter / "adapter_config.json")  # what PEFT 0.21 writes for longlora
    _check_adapter_config(
        config
        | {
            "lora_dropout": 0.3,
            "loftq_config": {"loftq_bits": 4, "loftq_iter": 1},
            "eva_config": {"rho": 2.0},
            "corda_config": {"corda_method": "kpm"},
            "megatron_core": "my.megatron",
            "qalora_group_size": 32,
            "layers_to_transform": [0],
            "layers_pattern": "layers",
            "rank_pattern": {"q_proj": 4},
            "exclude_modules": ["lm_head"],
            "inference_mode": False,
            "task_type": None,
            "velora_config": {"num_groups": 4},
            "init_lora_weights": "gaussian",
            "use_dora": False,
            "layer_replication": None,
            "target_parameters": [],
            "future_flag": False,
            "future_list": [],
            "future_setting": None,
        },
        adapter / "adapter_config.json",
    )


@pytest.mark.parametrize(
    ("kind", "peft_config", "base_overrides", "config_edit"),
    [
        # a saved fan_in_fan_out=true: PEFT turns it off for nn.Linear when it loads the adapter (the merge once
        # transposed the deltas for it)
        ("fan_in_fan_out", {}, {}, {"fan_in_fan_out": True}),
        ("bias_all", {"bias": "all"}, {"attention_bias": True}, {}),
        ("bias_lora_only", {"bias": "lora_only"}, {"attention_bias": True}, {}),
        ("velora", {"velora_config": {}}, {}, {}),
        ("mica", {"init_lora_weights": "mica"}, {}, {}),
    ],
)
def test_supported_adapter_settings_merge_to_peft_logits(tmp_path, kind, peft_config, base_overrides, config_edit):
    """Settings a plain merge expresses give PEFT's logits: trained biases replace the base's, VeLoRA's buffer
    (backward only) is skipped, MiCA is LoRA with a frozen B."""
    from peft.tuners.lora.config import VeloraConfig
    from transformers import AutoModelForCausalLM

    if "velora_config" in peft_config:
        peft_config = {**peft_config, "velora_config": VeloraConfig()}
    base, adapter = _base_and_adapter(tmp_path, _lora_on_q_and_v(peft_config), **base_overrides)
    if config_edit:
        config_path = adapter / "adapter_config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | config_edit))
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture="llama")
    ids = _ids()
    unmerged, _ = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
    assert not torch.allclose(logits, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits, unmerged, atol=1e-4, rtol=0)
    if kind.startswith("bias"):
        weights, base_weights = _weights(merged_dir), _weights(base)
        name = "model.layers.0.self_attn.q_proj.bias"
        assert not torch.equal(weights[name], base_weights[name])


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
    ids=["default", "linear", "dynamic", "yarn", "llama3"],
)
def test_stock_llama_keeps_the_base_rope_and_loads_without_warnings(tmp_path, transformers_warnings, rope):
    """--architecture llama: transformers standardises the base's RoPE into the merged config, which loads without
    a warning and runs the base's RoPE (a yarn or llama3 base keeps its pretraining context: the merge used to drop
    it, so transformers filled in max_position_embeddings, changed the frequencies and warned)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    overrides = {} if rope is None else {"rope_parameters": dict(rope)}
    base, adapter = _base_and_adapter(tmp_path, _lora_on_q_and_v({}), **overrides)
    merged_dir = merge_adapter(adapter, tmp_path / "merged", base=base, architecture="llama")
    transformers_warnings.clear()
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert [record.getMessage() for record in transformers_warnings] == []

    def standardised(folder):
        rope_parameters = dict(LlamaConfig.from_pretrained(folder).rope_parameters)
        rope_parameters.pop("type", None)  # 4.x's name, from the legacy rope_scaling beside it
        return rope_parameters

    assert standardised(merged_dir) == standardised(base)
    assert (
        model.config.max_position_embeddings
        == json.loads((base / "config.json").read_text())["max_position_embeddings"]
    )
    ids = _ids()
    unmerged, _ = _adapter_logits(base, adapter, ids)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ["llama_longlora", "llama"])
def test_merged_config_writes_torch_dtype_beside_dtype(sharded, tmp_path, transformers_warnings, architecture):
    """transformers 5 writes `dtype`; 4.x and other engines read `torch_dtype`: both are there, and 5 loads the
    config without a word."""
    from transformers import AutoConfig

    _, adapter = sharded
    merged_dir = merge_adapter(adapter, tmp_path / "merged", architecture=architecture, dtype="bfloat16")
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    transformers_warnings.clear()
    loaded = AutoConfig.from_pretrained(merged_dir, trust_remote_code=architecture == "llama_longlora")
    assert loaded.dtype == torch.bfloat16
    assert [record.getMessage() for record in transformers_warnings] == []
