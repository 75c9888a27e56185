"""The shipped recipes: every training config parses and passes the pre-flight checks, the paper recipes carry the
paper's hyperparameters, every accelerate config is one accelerate accepts, and a real 2-process run (gloo, CPU)
ends with identical weights on both ranks and in the saved adapter."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trl import SFTConfig, TrlParser

from longlora_hub.training import DataArguments, LongLoRAArguments, ModelArguments, check_arguments

from .helpers import HANG_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
ACCELERATE = ROOT / "recipes" / "accelerate"
TRAINING_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
# the paper's hyperparameters at 7B-70B scale; the tiny CPU recipes and the small real model (SmolLM2-135M, larger
# learning rate, one GPU) are checked by their own tests (tests/test_training.py, tests/test_real_model.py)
SMALL_MODEL_CONFIGS = ("tiny", "smollm2-135m")
PAPER_CONFIGS = [path for path in TRAINING_CONFIGS if path.parent.name not in SMALL_MODEL_CONFIGS]
ACCELERATE_CONFIGS = sorted(ACCELERATE.glob("*.yaml"))

# the file names are a contract (docs and scripts point at them)
EXPECTED_PAPER_CONFIGS = {
    "llama-2-7b/8k_extend.yaml",
    "llama-2-7b/16k_extend.yaml",
    "llama-2-7b/32k_extend.yaml",
    "llama-2-7b/100k_extend.yaml",
    "llama-2-13b/64k_extend.yaml",
    "llama-2-70b/32k_extend.yaml",
    "llama-2-7b/16k_longqa.yaml",
    "llama-2-7b/32k_longqa.yaml",
}
EXPECTED_ACCELERATE_CONFIGS = {
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "zero2.yaml",
    "zero3.yaml",
    "zero3_offload.yaml",
    "fsdp2.yaml",
    "multi_node.yaml",
    "cpu_2proc.yaml",
}
CONTEXTS = {"8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536, "100k": 100000}
LLAMA2_CONTEXT = 4096
LLAMA31_CONTEXT = 131072


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse(path: Path, *overrides: str):
    """The four dataclasses exactly as `recipes/sft.py` builds them from this YAML."""
    argv = ["--config", str(path), *overrides]
    if not torch.cuda.is_available():
        # the paper recipes train in bf16 on GPUs, which TrainingArguments refuses on a CPU-only machine unless told
        # to use the CPU; nothing else in the recipe changes
        argv += ["--use_cpu", "true"]
    return TrlParser((ModelArguments, LongLoRAArguments, DataArguments, SFTConfig)).parse_args_and_config(argv)


def header(path: Path) -> list[str]:
    """The leading comment block, without the `#`."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def launch_commands(path: Path) -> list[list[str]]:
    """The commands on `Launch:` / `or:` header lines, continuation backslashes joined, split like a shell would."""
    lines, commands = header(path), []
    for index, line in enumerate(lines):
        match = re.match(r"(?:Launch|or)(?:\s*\([^)]*\))?:\s*(.*)", line)
        if not match:
            continue
        text, follow = match.group(1), index + 1
        while text.endswith("\\") and follow < len(lines):
            text, follow = text[:-1] + " " + lines[follow], follow + 1
        commands.append(shlex.split(text))
    return commands


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


# ----------------------------------------------------------------------------------------------------------
# training configs


def test_the_contract_files_exist():
    present = {path.relative_to(CONFIGS).as_posix() for path in TRAINING_CONFIGS}
    assert EXPECTED_PAPER_CONFIGS <= present, EXPECTED_PAPER_CONFIGS - present
    assert any(name.startswith("llama-3.1-8b/") and name.endswith("_extend.yaml") for name in present)
    assert {"tiny/extend.yaml", "tiny/longqa.yaml"} <= present
    assert EXPECTED_ACCELERATE_CONFIGS <= {path.name for path in ACCELERATE_CONFIGS}


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=rel)
def test_training_config_parses_and_validates(path):
    with warnings.catch_warnings():
        # a shipped recipe uses the current names: no key or trainable mode by its former name
        warnings.filterwarnings("error", message=".* is now called ", category=FutureWarning)
        model_args, ll_args, data_args, training_args = parse(path)
    if ll_args.trainable == "qlora" and not torch.cuda.is_available():
        pytest.skip("qlora recipes need a CUDA GPU and bitsandbytes")
    check_arguments(model_args, ll_args, data_args, training_args)
    assert model_args.model_name_or_path and training_args.output_dir and training_args.max_length


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=rel)
def test_training_config_header(path):
    lines = header(path)
    assert len(lines) >= 3, "the config must open with a comment block: what it is, hardware, launch line"
    text = " ".join(lines).lower()
    assert "hardware" in text and "memory" in text
    commands = launch_commands(path)
    assert commands, "the header names no `# Launch:` command"
    for command in commands:
        assert "recipes/sft.py" in command
        assert flag(command, "--config") == rel(path), "the launch line must run this very file"
        accelerate_config = flag(command, "--config_file")
        if accelerate_config is not None:
            assert (ROOT / accelerate_config).is_file(), accelerate_config


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=rel)
def test_paper_recipe_hyperparameters(path):
    model_args, ll_args, data_args, training_args = parse(path)
    context, stage = path.stem.split("_")
    # what the file name promises
    assert ll_args.stage == stage
    assert model_args.context_length == CONTEXTS[context] == training_args.max_length
    assert path.parent.name in model_args.model_name_or_path.lower()
    # the paper's trainable modules, attention and optimisation (both stages)
    assert ll_args.trainable == "longlora"
    assert (ll_args.lora_r, ll_args.lora_alpha, ll_args.lora_dropout) == (8, 16, 0.0)
    assert sorted(ll_args.lora_target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj"])
    assert ll_args.s2_attention and ll_args.s2_group_size is None and ll_args.s2_group_size_ratio == 0.25
    assert training_args.learning_rate == 2e-5
    assert training_args.per_device_train_batch_size == 1
    assert training_args.gradient_accumulation_steps == 8
    assert training_args.lr_scheduler_type == "constant_with_warmup" and training_args.warmup_steps == 20
    assert training_args.weight_decay == 0.0
    assert training_args.bf16 and model_args.dtype == "bfloat16"
    assert training_args.activation_checkpointing
    if stage == "extend":
        assert data_args.dataset_name == "togethercomputer/RedPajama-Data-1T-Sample" and data_args.dataset_streaming
        assert data_args.text_field == "text" and not data_args.keep_documents_apart
        assert training_args.max_steps == 1000
    else:
        assert data_args.dataset_name == "Yukang/LongAlpaca-12k"
        assert data_args.prompt_template == "[INST]{instruction}[/INST]"
        assert training_args.num_train_epochs == 5 and training_args.max_steps in (-1, None)
        # trains the merged output of the extend recipe of the same context
        assert model_args.model_name_or_path == f"runs/{path.parent.name}-{context}-merged"
        assert (path.parent / f"{context}_extend.yaml").is_file()
    if path.parent.name.startswith("llama-2-") and stage == "extend":
        assert model_args.rope_type == "linear" and model_args.rope_ceil  # PI with the reference's integer factor
    if path.parent.name.startswith("llama-3.1"):
        # native llama3 RoPE: S² fine-tuning within its context, never PI stacked on it
        assert model_args.context_length <= LLAMA31_CONTEXT
    launch = launch_commands(path)[-1]
    expected = "zero3.yaml" if path.parent.name in ("llama-2-70b", "llama-3.1-8b") else "zero2.yaml"
    assert flag(launch, "--config_file") == f"recipes/accelerate/{expected}"


def test_reference_position_interpolation_factor_for_100k():
    """100k over Llama-2's 4096 gives the reference's factor ceil(24.41) = 25, not 24.41."""
    from longlora_hub.rope import position_interpolation

    model_args = parse(CONFIGS / "llama-2-7b" / "100k_extend.yaml")[0]
    config = {"max_position_embeddings": LLAMA2_CONTEXT, "rope_theta": 10000.0}
    rope = position_interpolation(config, model_args.context_length, model_args.rope_type, ceil=model_args.rope_ceil)
    assert rope["rope_parameters"]["factor"] == 25.0 and rope["max_position_embeddings"] >= 100000


# ----------------------------------------------------------------------------------------------------------
# accelerate configs

# distributed type, processes, machines, and the values that make each file what its name says
ACCELERATE_EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1, {}),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1, {}),
    "zero2.yaml": ("DEEPSPEED", 8, 1, {"zero_stage": 2}),
    "zero3.yaml": ("DEEPSPEED", 8, 1, {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True}),
    "zero3_offload.yaml": (
        "DEEPSPEED",
        8,
        1,
        {
            "zero_stage": 3,
            "offload_optimizer_device": "cpu",
            "offload_param_device": "cpu",
            "zero3_save_16bit_model": True,
        },
    ),
    "fsdp2.yaml": (
        "FSDP",
        8,
        1,
        {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaLongLoRADecoderLayer",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": False,
        },
    ),
    "multi_node.yaml": ("DEEPSPEED", 16, 2, {"zero_stage": 2}),
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1, {}),
}


def launch_args(path: Path):
    """What `accelerate launch --config_file path script.py` resolves, without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_config_is_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "mixed_precision"):
        assert key in raw, f"{path.name} lacks {key}"
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: unknown keys are errors
    distributed_type, processes, machines, expected = ACCELERATE_EXPECTED[path.name]
    assert config.distributed_type.value == distributed_type
    assert (config.num_processes, config.num_machines) == (processes, machines)
    # every nested key must be a flag `accelerate launch` knows (it copies them there, silently, known or not)
    dests = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.deepspeed_config, **config.fsdp_config}
    assert not {key for key in nested if key not in dests}, "keys accelerate launch would ignore"
    for key, value in expected.items():
        assert nested.get(key) == value, (key, nested.get(key))
    if machines > 1:
        assert config.main_process_ip and config.main_process_port and config.machine_rank == 0
    if distributed_type != "NO" and path.name != "cpu_2proc.yaml":
        assert config.mixed_precision == "bf16"
    args, _ = launch_args(path)
    assert args.num_processes == processes
    assert args.use_deepspeed == (distributed_type == "DEEPSPEED") and args.use_fsdp == (distributed_type == "FSDP")
    assert args.multi_gpu == (distributed_type == "MULTI_GPU")  # what makes accelerate start several processes
    commands = launch_commands(path)
    assert commands and any(flag(command, "--config_file") == rel(path) for command in commands)
    for command in commands:
        recipe = flag(command, "--config")
        assert recipe is None or (ROOT / recipe).is_file(), recipe


@pytest.mark.parametrize(
    "name", ["zero2.yaml", "zero3.yaml", "zero3_offload.yaml", "multi_node.yaml"], ids=lambda name: name
)
def test_deepspeed_plugin_built_from_config(name):
    """The DeepSpeed config the Trainer will receive (no deepspeed install needed): the right ZeRO stage, and the
    batch values left to the recipe ("auto") so that the two never disagree."""
    from accelerate.utils import DeepSpeedPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = launch_args(ACCELERATE / name)
    args.main_process_port = 0  # a free port: the launcher checks that it is available
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**{key: value for key, value in env.items() if os.environ.get(key) != value}):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == defaults.deepspeed_config["zero_stage"]
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    if zero["stage"] == 3:
        assert plugin.zero3_init_flag and zero["stage3_gather_16bit_weights_on_model_save"]
    offload = "cpu" if name == "zero3_offload.yaml" else "none"
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload


def test_fsdp2_plugin_built_from_config():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    from longlora_hub.remote_code.modeling_llama_longlora import LlamaLongLoRADecoderLayer, LlamaLongLoRAPreTrainedModel

    args, _ = launch_args(ACCELERATE / "fsdp2.yaml")
    args.main_process_port = 0
    env = prepare_multi_gpu_env(args)
    with patch_environment(**{key: value for key, value in env.items() if os.environ.get(key) != value}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == [LlamaLongLoRADecoderLayer.__name__]
    assert LlamaLongLoRADecoderLayer.__name__ in LlamaLongLoRAPreTrainedModel._no_split_modules
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.activation_checkpointing is False  # the Trainer checkpoints activations (recipes' setting)


# ----------------------------------------------------------------------------------------------------------
# a real 2-process run


def saved_name(parameter_name: str) -> str:
    """The key PEFT writes to adapter_model.safetensors for a trainable parameter of the live PeftModel:
    `...embed_tokens.modules_to_save.default.weight` -> `...embed_tokens.weight`,
    `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`."""
    return parameter_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path):
    """`accelerate launch` with recipes/accelerate/cpu_2proc.yaml starts 2 processes on a machine without GPUs
    (gloo); 4 steps of the tiny extend recipe (context 256 -> 512 by PI) keep both replicas identical, both ranks
    see their own data, and the adapter saved by rank 0 holds exactly the trained weights."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE / "cpu_2proc.yaml"),
        str(ROOT / "tests" / "dist_worker.py"),
        "--config",
        str(CONFIGS / "tiny" / "extend.yaml"),
        "--output_dir",
        str(out),
        "--max_length",
        "256",
        "--context_length",
        "512",
        "--max_steps",
        "4",
        "--save_steps",
        "4",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        # the paper recipes' DDP settings, exercised here
        "--activation_checkpointing",
        "true",
        "--ddp_find_unused_parameters",
        "false",
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a hung run is stopped with all its workers
    )
    try:
        output, _ = process.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process run hung for {HANG_TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    assert "rank 0 done" in output and "rank 1 done" in output, output[-3000:]

    records = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["distributed_type"].endswith("MULTI_CPU")
    weights0, weights1 = records[0]["weights"], records[1]["weights"]
    assert weights0.keys() == weights1.keys() and len(weights0) > 0
    for name, tensor in weights0.items():
        assert torch.equal(tensor, weights1[name]), f"{name} differs between the ranks"
    # training happened: LoRA B starts at zero
    assert any(tensor.abs().sum() > 0 for name, tensor in weights0.items() if ".lora_B." in name)

    # both ranks consumed their own rows: 4 steps x 2 processes x 1 row x 256 tokens
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["num_input_tokens_seen"] for entry in state["log_history"] if "loss" in entry][-1] == 4 * 2 * 256

    saved = load_file(out / "adapter_model.safetensors")
    expected = {saved_name(name): tensor for name, tensor in weights0.items()}
    assert saved.keys() == expected.keys()
    assert any("embed_tokens" in key for key in saved) and any(key.endswith("norm.weight") for key in saved)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), f"saved {key} is not rank 0's trained weight"
