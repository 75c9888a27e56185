"""Push a LongLoRA adapter or model folder to the Hub in one commit, with a model card written from what the folder
records (its config, `longlora_hub.json`, the trainer state and evaluation results).

Everything that can be checked locally is checked before the first request; the token is checked before any
upload; the files go up in ONE commit (an unchanged folder makes none), so a failure leaves the repository as it
was. Only an allowlist of files is pushed: never tokens, `.env` files, optimizer, scheduler or RNG states (unless
asked), or the trainer's pickled arguments.

Nothing from outside the folder is published: a file that is a link to somewhere else (`tokenizer.model ->
/etc/passwd`) is left out, or the push refused when the model cannot load without it, and local paths (an adapter's
`base_model_name_or_path`, the model an evaluation ran on) become Hub ids, file names or nothing, in an uploaded
copy; the user's files are never rewritten. The repository mirrors the folder: a file the allowlist covers that is
gone locally is deleted in the same commit, unless `keep_remote` is asked; files the allowlist does not cover
(the user's own) are kept.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .convert import PROVENANCE_FILE, TOKENIZER_PATTERNS, read_license, read_provenance
from .hub import HubPushError, check_hub_access, hub_errors, hub_failure
from .rope import describe, read_rope
from .trainable import RENAMED_MODES

KINDS = ("adapter", "llama_longlora", "llama")
TAGS = ("longlora", "long-context", "s2-attn")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", PROVENANCE_FILE)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", PROVENANCE_FILE)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
RECORD_FILES = ("trainer_state.json",)
LICENSE_PATTERNS = ("LICENSE*", "NOTICE*", "USE_POLICY*")
# the Trainer's resumable state: large, and the pickles can run code when loaded; pushed only when asked
TRAINING_STATE_PATTERNS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "training_args.bin")
EVAL_FOLDERS = ("", "eval", "evaluation")
# without these the published model does not load: rather no push than a broken repository
REQUIRED_FILES = ("config.json", "adapter_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
CHECKPOINT_PREFIX = "checkpoint-"
LONGLORA_PAPER = "https://arxiv.org/abs/2309.12307"
CITATION = """@inproceedings{chen2024longlora,
  title={LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models},
  author={Chen, Yukang and Qian, Shengju and Tang, Haotian and Lai, Xin and Liu, Zhijian and Han, Song and Jia, Jiaya},
  booktitle={The Twelfth International Conference on Learning Representations},
  year={2024}
}"""


class PushError(HubPushError):
    """The folder cannot be pushed as asked (not a model, no final model, unreadable files) or the Hub refused."""


@dataclass
class PushPlan:
    """What one push sends: the model folder, its kind, the files (path in repo -> local path or bytes) and the card."""

    folder: Path
    kind: str
    files: dict[str, Path | bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    card: str = ""
    base_model: str | None = None
    # what the allowlist covers (top-level name patterns), to tell the Hub's stale files from the user's own
    patterns: list[str] = field(default_factory=list)
    # what the user should know before the upload: files left out as links out of the folder, local paths removed
    warnings: list[str] = field(default_factory=list)


@dataclass
class PushResult:
    url: str
    commit_sha: str
    changed: bool
    pull_request_url: str | None
    files: list[str]
    kind: str
    deleted: list[str] = field(default_factory=list)
    kept_remote: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- the folder


def _checkpoints(folder: Path) -> list[Path]:
    found = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted(found, key=lambda path: int(re.sub(r"\D", "", path.name) or 0))


def model_kind(folder: Path) -> str | None:
    """`adapter` (PEFT), `llama_longlora` (our architecture: converted, fully fine-tuned or merged), `llama` (a stock
    Llama, e.g. merged with --architecture llama), or None when the folder holds no model."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    config_path = folder / "config.json"
    if not config_path.is_file():
        return None
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as error:
        raise PushError(f"{config_path} is not valid JSON ({error}); fix or restore it before pushing.") from None
    if model_type in ("llama_longlora", "llama"):
        return model_type
    raise PushError(
        f"{folder} holds a {model_type!r} model; `longlora-hub push` publishes LongLoRA adapters and Llama-family "
        "models. Use `huggingface_hub.upload_folder` for anything else."
    )


def find_model_folder(folder: str | Path, checkpoint: str | None = None) -> tuple[Path, str]:
    r"""
    The folder holding the model to push, and its kind.

    A trainer output holds the final model at its top and `checkpoint-*` subfolders: the final model is pushed,
    unless `checkpoint` names one (`"last"` for the latest).

    Raises:
        `PushError`: No model where one is expected, with what to pass instead.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"No folder at {folder}; pass the folder that holds the adapter or the model.")
    checkpoints = _checkpoints(folder)
    if checkpoint is not None:
        if checkpoint == "last":
            if not checkpoints:
                raise PushError(f"{folder} has no {CHECKPOINT_PREFIX}* subfolders; drop --checkpoint.")
            chosen = checkpoints[-1]
        else:
            chosen = folder / checkpoint
            if not chosen.is_dir():
                names = ", ".join(path.name for path in checkpoints) or "none"
                raise PushError(f"No checkpoint {checkpoint!r} in {folder} (found: {names}).")
        folder = chosen
    kind = model_kind(folder)
    if kind is None:
        if checkpoints and checkpoint is None:
            raise PushError(
                f"{folder} has checkpoints ({', '.join(path.name for path in checkpoints[-3:])}) but no final model "
                "(training did not finish?). Pass --checkpoint last, or --checkpoint NAME, to push one of them."
            )
        raise PushError(
            f"{folder} holds no model (no adapter_config.json or config.json); pass a trainer output, an adapter "
            "folder or a merged model folder."
        )
    return folder, kind


def _relative_imports(folder: Path, module_file: str, seen: set[str]) -> None:
    if module_file in seen or not (folder / module_file).is_file():
        return
    seen.add(module_file)
    source = (folder / module_file).read_text(encoding="utf-8")
    for name in re.findall(r"^\s*from\s+\.(\w+)\s+import", source, flags=re.MULTILINE):
        _relative_imports(folder, f"{name}.py", seen)


def remote_code_of(folder: Path) -> list[str]:
    """The remote-code files `auto_map` names, with every file they import relatively."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    seen: set[str] = set()
    for target in (config.get("auto_map") or {}).values():
        target = target[0] if isinstance(target, list) else target
        if target and "--" not in target:  # "repo--module.Class" points at code in another repository
            _relative_imports(folder, target.rsplit(".", 1)[0] + ".py", seen)
    missing = [name for name in seen if not (folder / name).is_file()]
    if missing:
        raise PushError(f"{folder} lacks the remote-code files {missing}; copy them from longlora_hub/remote_code.")
    return sorted(seen)


def link_problem(path: Path, root: Path) -> str | None:
    """Why the file at `path` must not be published from the folder `root` (already resolved): it is a link, or sits
    in a linked folder, whose target lies outside `root`; a broken link; or no regular file (a FIFO would hang the
    upload). None when it may go: a link to another file of the folder is fine."""
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a missing target, or a loop of links (RuntimeError before Python 3.13)
        return "a broken link"
    if not resolved.is_relative_to(root):
        return f"a link to {resolved}, outside the folder"
    if not resolved.is_file():
        return "not a regular file"
    return None


def _remedy(problem: str) -> str:
    if problem.startswith("a link to"):
        return (
            "A push never publishes what lies outside the folder; to publish it, replace the link (or the linked "
            "folder) by a copy of its target."
        )
    if problem == "a broken link":
        return "Restore its target or remove the link."
    return "Replace it by a regular file to publish it."


def _eval_candidates(folder: Path) -> list[Path]:
    return [
        path
        for sub in EVAL_FOLDERS
        for path in (sorted((folder / sub).glob("*.json")) if (folder / sub).is_dir() else ())
    ]


def eval_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Evaluation results (`longlora-hub eval ... --output`) in the folder or its eval/ or evaluation/ subfolder,
    by their path relative to the folder; none read through a link out of the folder."""
    found = {}
    root = folder.resolve()
    for path in _eval_candidates(folder):
        if link_problem(path, root) is None:
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(result, dict) and "format" in result and result.get("task") in ("perplexity", "passkey"):
                found[path.relative_to(folder).as_posix()] = result
    return found


def allowlist(folder: Path, kind: str, include_training_state: bool = False) -> list[str]:
    """The name patterns of the top-level files a push of `folder` uploads (evaluation results aside)."""
    patterns = [*TOKENIZER_PATTERNS, *LICENSE_PATTERNS, *RECORD_FILES]
    patterns += list(ADAPTER_FILES) if kind == "adapter" else [*MODEL_FILES, *WEIGHT_PATTERNS]
    if include_training_state:
        patterns += TRAINING_STATE_PATTERNS
    return patterns + (remote_code_of(folder) if kind == "llama_longlora" else [])


def covers(patterns: list[str], name: str) -> bool:
    """Whether a file of the repository, `name`, is one a push with `patterns` manages (so it mirrors the folder):
    a top-level file the patterns match, or a JSON file in eval/ or evaluation/. Anything else there is the user's
    own and is kept. (`fnmatch`'s `*` would match across `/`, hence the split.)"""
    parent, _, base = name.rpartition("/")
    if parent:
        return parent in EVAL_FOLDERS and base.endswith(".json")
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) and name not in TRAINING_STATE_PATTERNS


def select_files(
    folder: Path, kind: str, include_training_state: bool = False
) -> tuple[dict[str, Path], list[str], dict[str, str]]:
    r"""
    The files a push of the model folder uploads.

    Returns:
        `tuple[dict[str, Path], list[str], dict[str, str]]`: The allowlisted files (path in repo -> resolved local
        path), the names the allowlist leaves out, and the allowlisted files not uploaded because they lie outside
        the folder (path in repo -> why).

    Raises:
        `PushError`: No weights, or a file the model cannot load without (weights, configs, remote code) links out
            of the folder: what to copy in.
    """
    patterns = allowlist(folder, kind, include_training_state)
    root = folder.resolve()
    results = eval_results(folder)
    chosen: dict[str, Path] = {}
    skipped: list[str] = []
    outside: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if not path.name.startswith(CHECKPOINT_PREFIX) and path.name not in EVAL_FOLDERS:
                skipped.append(path.name + "/")
            continue
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
            problem = link_problem(path, root)
            if problem:
                outside[path.name] = problem
            else:
                # the resolved path: what is uploaded is what was checked, even if the link changes meanwhile
                chosen[path.name] = path.resolve()
        elif path.name != "README.md" and path.name not in results:  # the card is written anew
            skipped.append(path.name)
    for path in _eval_candidates(folder):
        name = path.relative_to(folder).as_posix()
        problem = link_problem(path, root)
        if problem and "/" in name:  # a top-level JSON was seen above
            outside[name] = problem
    for name in results:
        chosen[name] = (folder / name).resolve()
    required = [name for name in outside if _is_weight(name) or name in REQUIRED_FILES or name.endswith(".py")]
    if required:
        listed = "; ".join(f"{name} is {outside[name]}" for name in required)
        raise PushError(
            f"Cannot push {folder}: {listed}. A push never uploads what lies outside the folder, and the model "
            "does not load without these. Replace each link by a copy of its target (e.g. `cp --remove-destination "
            '"$(readlink -f NAME)" NAME`), or push the folder that holds the files; a recipe\'s output_dir/base links '
            "its weights to the original checkpoint on purpose, so push the trainer output (the adapter) or a merged "
            "model instead."
        )
    if not any(_is_weight(name) for name in chosen):
        raise PushError(f"{folder} has no weights (*.safetensors); the model folder is incomplete.")
    return chosen, skipped, outside


# ---------------------------------------------------------------------------------------------------- local paths


def is_local_path(value: Any) -> bool:
    """Whether `value` names a place on this machine (an absolute, home or relative path, or anything that exists
    here) rather than a Hub id, a URL or a plain name. A folder named like its Hub repository counts as local: the
    Hub id is then for `--base-model` to give."""
    if not isinstance(value, str) or not value or "\n" in value:
        return False
    if value.startswith("file://"):
        return True
    if "://" in value:
        return False
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if value.count("/") > 1 or "\\" in value:  # a Hub id has one slash at most
        return True
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError):
        return False


def public_name(value: str) -> str:
    """A local path as it may be published: its last component (`/home/me/runs/extend` -> `extend`)."""
    return re.split(r"[\\/]", value.removeprefix("file://").rstrip("/\\"))[-1]


def public_fields(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    r"""
    A copy of a record's top-level fields (an evaluation result, a provenance record) fit to publish: each local
    path becomes its file name, `base_model` (a Hub id by definition) None, and a local entry of `datasets` (Hub
    ids) is dropped. Nested values (numbers, RoPE, versions) hold no paths and stay as they are.

    Returns:
        `tuple[dict[str, Any], list[str]]`: The copy and the names of the fields that changed.
    """
    public: dict[str, Any] = {}
    changed = []
    for key, value in record.items():
        if key == "base_model":
            new = None if is_local_path(value) else value
        elif key == "datasets" and isinstance(value, list):
            new = [item for item in value if not is_local_path(item)]
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            new = [public_name(item) if is_local_path(item) else item for item in value]
        else:
            new = public_name(value) if is_local_path(value) else value
        public[key] = new
        if new != value:
            changed.append(key)
    return public, changed


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------------------------------- the card


def _base_folder(folder: Path, kind: str) -> Path | None:
    """The local base checkpoint of an adapter (what its config names), for its RoPE, license and provenance."""
    if kind != "adapter":
        return folder
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    return Path(base) if base and Path(base).is_dir() else None


def _license(*folders: Path | None) -> str | None:
    return next((found for folder in folders if folder is not None and (found := read_license(folder))), None)


def _trainer_state(folder: Path) -> dict[str, Any]:
    candidates = [folder / "trainer_state.json"] + [path / "trainer_state.json" for path in _checkpoints(folder)[::-1]]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return {}
    return {}


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "", [])]
    return "\n".join(lines)


def _training_section(record: dict[str, Any], state: dict[str, Any]) -> str:
    if not record and not state:
        return ""
    training = record.get("training", {})
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    final = next((entry for entry in reversed(state.get("log_history", [])) if "train_runtime" in entry), {})
    rows = [
        (
            "stage",
            {"extend": "context extension (causal LM on long text)", "longqa": "supervised long QA"}.get(
                record.get("stage"), record.get("stage")
            ),
        ),
        ("data", record.get("data")),
        ("sequence length", training.get("max_length")),
        # a run recorded before a mode was renamed (lora_plus) is described by the mode's current name
        ("trainable", RENAMED_MODES.get(record.get("trainable"), record.get("trainable"))),
        ("learning rate", training.get("learning_rate")),
        ("schedule", training.get("lr_scheduler_type")),
        ("batch size per device", training.get("per_device_train_batch_size")),
        ("gradient accumulation", training.get("gradient_accumulation_steps")),
        ("precision", ("bf16" if training["bf16"] else "fp16" if training["fp16"] else "fp32") if training else None),
        ("attention kernel", training.get("attn_implementation")),
        ("steps", state.get("global_step")),
        ("epochs", round(state["epoch"], 4) if state.get("epoch") is not None else None),
        ("loss (first → last logged)", f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else None),
        ("train runtime (s)", final.get("train_runtime")),
    ]
    return "## Training\n\n" + _table(rows) + "\n"


def _eval_section(results: dict[str, dict[str, Any]]) -> str:
    if not results:
        return ""
    from .evaluation.report import markdown_table

    parts = ["## Evaluation\n"]
    for name, result in results.items():
        result = public_fields(result)[0]  # the caption names the model and data: file names, never local paths
        parts.append(f"From `{name}` ({result['task']}, protocol `{result.get('protocol')}`):\n")
        parts.append(markdown_table(result).rstrip() + "\n")
    return "\n".join(parts)


PROTOCOL_LABELS = {"longlora": "LongLoRA windows", "press": "sliding window"}
PASSKEY_DATASET = ("passkey", "passkey retrieval (synthetic)")


def _perplexity_dataset(result: dict[str, Any], public: dict[str, Any]) -> dict[str, Any]:
    """The model-index `dataset` of a perplexity result: a Hub dataset by its id (with the config and split it was
    loaded with), a local file by its name without suffix (`pg19_test.bin` -> `pg19_test`)."""
    data = str(public.get("data") or "unknown")
    if is_local_path(result.get("data")):
        name = data.rsplit(".", 1)[0] if "." in data.lstrip(".") else data
        return {"dataset_type": name, "dataset_name": name}
    return {
        "dataset_type": data,
        "dataset_name": data,
        "dataset_config": public.get("data_config"),
        "dataset_split": public.get("split"),
    }


def model_index(results: dict[str, dict[str, Any]]) -> list[Any]:
    r"""
    The card's `model-index`, as `huggingface_hub.EvalResult`s: one per length of every evaluation result, in the
    order of the files. Perplexity: `metric_type` "perplexity", named by length, data and protocol ("perplexity @
    8192 (proof-pile, sliding window)"), with the protocol as `metric_config` and the length and stride in
    `metric_args`. Passkey: `metric_type` "accuracy", the fraction of keys retrieved at each prompt length. The
    values are the JSON's numbers as they are; task `text-generation`.
    """
    from huggingface_hub import EvalResult

    evals = []
    for result in results.values():
        public = public_fields(result)[0]
        if result.get("task") == "perplexity":
            dataset = _perplexity_dataset(result, public)
            protocol = str(result.get("protocol"))
            label = PROTOCOL_LABELS.get(protocol, protocol) + (", S²-Attn" if result.get("s2") else "")
            for row in result.get("results") or []:
                value = row.get("perplexity")
                if not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                arguments = {"seq_len": row["seq_len"], "stride": row.get("stride", result.get("stride"))}
                evals.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Long-context language modeling",
                        **dataset,
                        metric_type="perplexity",
                        metric_value=value,
                        metric_name=f"perplexity @ {row['seq_len']} ({dataset['dataset_name']}, {label})",
                        metric_config=protocol,
                        metric_args={key: item for key, item in arguments.items() if item is not None},
                    )
                )
        elif result.get("task") == "passkey":
            accuracy = (result.get("results") or {}).get("accuracy") or {}
            for length in result.get("lengths") or []:
                value = accuracy.get(str(length))
                if not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                evals.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Passkey retrieval",
                        dataset_type=PASSKEY_DATASET[0],
                        dataset_name=PASSKEY_DATASET[1],
                        metric_type="accuracy",
                        metric_value=value,
                        metric_name=f"passkey accuracy @ {length}",
                        metric_args={"prompt_tokens": int(length), "trials": result.get("trials")}
                        if result.get("trials") is not None
                        else {"prompt_tokens": int(length)},
                    )
                )
    return evals


def _usage(kind: str, repo_id: str, base_model: str | None, config: dict[str, Any]) -> str:
    rope = read_rope(config)
    rope_arg = {key: rope[key] for key in ("rope_type", "factor", "rope_theta") if key in rope}
    length = config.get("max_position_embeddings")
    if kind == "adapter":
        base = base_model or "BASE_MODEL"
        return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

# the stock base with the RoPE this adapter was trained with (Position Interpolation to {length} tokens);
# at inference LongLoRA uses standard attention, so no remote code is needed
base = AutoModelForCausalLM.from_pretrained(
    "{base}", rope_parameters={rope_arg!r}, max_position_embeddings={length}, dtype="auto"
)
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

To continue S²-Attn training, convert the base first (`longlora-hub convert {base} base --context-length {length}`)
and load the adapter onto `AutoModelForCausalLM.from_pretrained("base", trust_remote_code=True)`."""
    if kind == "llama":
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")  # a stock Llama: no remote code
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```"""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# LlamaLongLoRA runs code from this repository: read it, then pin the commit you read
REVISION = "<commit sha>"  # e.g. HfApi().list_repo_commits("{repo_id}")[0].commit_id
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, revision=REVISION, dtype="auto")
# the config names remote code, so the tokenizer needs the flag too (without it transformers asks)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True, revision=REVISION)
```

In eval mode the model is a standard Llama with Position Interpolation; S²-Attn applies only in training mode,
so fine-tuning can continue with the same class (`model.train()`)."""


def model_card(folder: Path, kind: str, repo_id: str, base_model: str | None = None) -> tuple[str, str | None]:
    r"""
    The README.md of the pushed repository: YAML metadata (`base_model`, `base_model_relation`, `library_name`,
    `pipeline_tag`, tags, datasets, license, and the evaluation results as `model-index`: [`model_index`]) and a
    body with the context, RoPE, S² settings, trainable modules, training summary, evaluation tables and a usage
    snippet. Deterministic (no dates), so an unchanged folder
    gives an unchanged card.

    Returns:
        `tuple[str, str | None]`: The card's text and the base model's Hub id it names (None when unknown).
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_folder = _base_folder(folder, kind)
    record = public_fields(read_provenance(folder))[0]
    base_record = public_fields(read_provenance(base_folder))[0] if base_folder else {}
    base_model = base_model or record.get("base_model") or base_record.get("base_model")
    config = (
        json.loads(((base_folder or folder) / "config.json").read_text(encoding="utf-8"))
        if ((base_folder or folder) / "config.json").is_file()
        else {}
    )
    adapter_config = (
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")) if kind == "adapter" else {}
    )
    lora = adapter_config or record.get("adapter_config") or {}
    modules_to_save = adapter_config.get("modules_to_save") or record.get("modules_to_save") or []
    results = eval_results(folder)
    evals = model_index(results)
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if kind == "adapter" else "finetune",
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, "lora" if lora else "llama", *(["custom_code"] if kind == "llama_longlora" else [])],
        datasets=record.get("datasets") or None,
        license=_license(folder, base_folder),
        # the Hub shows these on the model page and in leaderboards; the Markdown tables below stay for readers
        model_name=repo_id.split("/")[-1] if evals else None,
        eval_results=evals or None,
    )
    rope = read_rope(config) if config else {}
    length = config.get("max_position_embeddings")
    ratio, size = (
        config.get("s2_group_size_ratio", record.get("s2", {}).get("group_size_ratio")),
        config.get("s2_group_size", record.get("s2", {}).get("group_size")),
    )
    group = f"{size} tokens" if size else (f"{ratio:g} × sequence length" if ratio else None)
    what = {"adapter": "A LoRA adapter", "llama_longlora": "A LongLoRA model", "llama": "A LongLoRA model"}[kind]
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a Llama base model"
    trainable = None
    if lora:
        modules = ", ".join(lora.get("target_modules") or [])
        trainable = f"LoRA r={lora.get('r')}, alpha={lora.get('lora_alpha')} on {modules}"
        if modules_to_save:
            trainable += f"; trained in full: {', '.join(modules_to_save)}"
    elif record.get("trainable") == "full":
        trainable = "every parameter (full fine-tuning)"
    if lora:
        method = "shifted sparse attention (S²-Attn) during training, and LoRA" + (
            " with trainable embeddings and norms" if modules_to_save else ""
        )
    elif record.get("trainable") == "full":
        method = "shifted sparse attention (S²-Attn) during training, and full fine-tuning"
    else:
        method = "ready for S²-Attn training (converted; not trained yet)"
    details = [
        ("context length", f"{length} tokens" if length else None),
        ("pretrained context", rope.get("original_max_position_embeddings")),
        ("RoPE", describe(rope) if rope else None),
        ("Position Interpolation factor", f"{rope['factor']:g}" if rope.get("rope_type") == "linear" else None),
        ("S²-Attn group size (training)", group),
        ("S²-Attn shift", config.get("s2_shift") or record.get("s2", {}).get("shift")),
        ("trainable", trainable),
        (
            "architecture",
            {
                "adapter": "PEFT LoRA adapter",
                "llama_longlora": "LlamaLongLoRA (remote code; standard attention in eval mode)",
                "llama": "stock LlamaForCausalLM (merged; no remote code)",
            }[kind],
        ),
    ]
    sections = [
        f"# {repo_id.split('/')[-1]}\n",
        f"{what} extending {base_link} to {length or 'a longer'} tokens with [LongLoRA]({LONGLORA_PAPER}): "
        f"Position Interpolation, {method}. Made with longlora-hub.\n",
        "## Model details\n\n" + _table(details) + "\n",
        _training_section(record, _trainer_state(folder)),
        _eval_section(results),
        "## Usage\n\n" + _usage(kind, repo_id, base_model, config) + "\n",
        "## Citation\n\n```bibtex\n" + CITATION + "\n```\n",
    ]
    body = "\n".join(section for section in sections if section)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return str(card), base_model


# ---------------------------------------------------------------------------------------------------- the push


def plan_push(
    folder: str | Path,
    repo_id: str,
    *,
    checkpoint: str | None = None,
    include_training_state: bool = False,
    base_model: str | None = None,
) -> PushPlan:
    """Everything a push will send, worked out locally (no network): see `push_folder`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"{repo_id!r} is not a valid repository id ({error}); write it as 'user/name'.") from None
    if base_model is not None:
        try:
            validate_repo_id(base_model)  # refuses paths: a leading `/`, `.` or `~`, more than one `/`
        except HFValidationError as error:
            raise PushError(
                f"--base-model {base_model!r} is not a Hub id ({error}); pass the base model's repository id, e.g. "
                "meta-llama/Llama-2-7b-hf, not a local folder."
            ) from None
    model_folder, kind = find_model_folder(folder, checkpoint)
    files, skipped, outside = select_files(model_folder, kind, include_training_state)
    card, base_model = model_card(model_folder, kind, repo_id, base_model)
    plan = PushPlan(model_folder, kind, dict(files), skipped, card, base_model)
    plan.patterns = allowlist(model_folder, kind, include_training_state)
    for name, problem in outside.items():
        plan.warnings.append(f"{name} is not uploaded: it is {problem}. {_remedy(problem)}")
    if "adapter_config.json" in plan.files:
        _publish_adapter_config(plan)
    # local paths (the evaluated model, the merged adapter, a best checkpoint) become file names in the copies sent
    records = {PROVENANCE_FILE, *eval_results(model_folder)}
    for name in sorted(plan.files):
        is_record = name in records
        if is_record or name == "trainer_state.json":
            _publish_record(plan, name, is_record)
    plan.files["README.md"] = card.encode()
    return plan


def _publish_adapter_config(plan: PushPlan) -> None:
    """A local base path means nothing to whoever downloads the adapter (and tells them where the user keeps it):
    the uploaded copy names the base's Hub id, or no base at all when it is unknown."""
    config = json.loads(Path(plan.files["adapter_config.json"]).read_text(encoding="utf-8"))
    local_base = config.get("base_model_name_or_path")
    if not is_local_path(local_base):
        return
    config["base_model_name_or_path"] = plan.base_model
    revision = read_provenance(plan.folder).get("base_revision") or config.get("revision")
    config["revision"] = revision if plan.base_model else None
    plan.files["adapter_config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    if plan.base_model is None:
        plan.warnings.append(
            f"adapter_config.json names the local base {local_base}; the uploaded copy names no base model (the "
            "folder records no Hub id), so AutoPeftModelForCausalLM cannot load the adapter alone. Pass "
            "--base-model USER/NAME (the base's Hub id) to name it."
        )


def _publish_record(plan: PushPlan, name: str, is_record: bool) -> None:
    """Upload a copy of the JSON record `name` without the local paths it holds (the local file stays as it is)."""
    try:
        record = json.loads(Path(plan.files[name]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # not ours to judge: uploaded as it is, like any allowlisted file
    if not isinstance(record, dict):
        return
    if is_record:
        public, changed = public_fields(record)
    else:  # trainer_state.json: the Trainer records where it saved the best checkpoint
        best = record.get("best_model_checkpoint")
        public, changed = dict(record), []
        if is_local_path(best):
            public["best_model_checkpoint"], changed = public_name(best), ["best_model_checkpoint"]
    if changed:
        plan.files[name] = _json_bytes(public)
        plan.warnings.append(
            f"{name}: the local paths in {', '.join(changed)} are published as file names only (or not at all)."
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    checkpoint: str | None = None,
    include_training_state: bool = False,
    base_model: str | None = None,
    keep_remote: bool = False,
    endpoint: str | None = None,
    plan: PushPlan | None = None,
) -> PushResult:
    r"""
    Push a LongLoRA adapter or model folder to the Hub model repository `repo_id`, in one commit.

    Args:
        folder (`str` or `Path`):
            A PEFT adapter, a LlamaLongLoRA checkpoint, a merged stock Llama, or a trainer output (its final model
            is pushed unless `checkpoint` says otherwise).
        repo_id (`str`):
            The repository, created if missing.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository private.
        revision (`str`, *optional*):
            A branch to push to (created from `main` if missing); defaults to `main`.
        commit_message (`str`, *optional*):
            Defaults to a message naming what is pushed.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request with the files instead of committing to the branch.
        token (`str`, *optional*):
            Defaults to the logged-in token.
        checkpoint (`str`, *optional*):
            `"last"` or a `checkpoint-N` subfolder of a trainer output to push instead of its final model.
        include_training_state (`bool`, *optional*, defaults to `False`):
            Also push the optimizer, scheduler and RNG states and the trainer's arguments (to resume elsewhere).
        base_model (`str`, *optional*):
            The base model's Hub id, for the card and the uploaded `adapter_config.json`, when the folder does not
            record it.
        keep_remote (`bool`, *optional*, defaults to `False`):
            Keep the files of the repository that the allowlist covers but the folder no longer holds; by default
            the commit deletes them, so the repository mirrors the folder. Files the allowlist does not cover (added
            to the repository by other means) are kept either way; top-level weights of an earlier push that this
            one does not replace (another sharding) are deleted either way, as loaders would mix them.
        endpoint (`str`, *optional*):
            The Hub server; defaults to `HF_ENDPOINT` / huggingface.co.
        plan (`PushPlan`, *optional*):
            What `plan_push` returned for the same folder and options (e.g. shown to the user first), so that the
            folder is not read and the card not written twice.

    Returns:
        `PushResult`: the URL, the commit (`changed` is False when the folder was already there as is), the pull
        request URL if one was opened, the files, the kind of model, the files the commit deleted and those
        `keep_remote` kept.

    Raises:
        `PushError`: A local problem (no model, missing files, a bad repo id) before any request, or a Hub failure
            (no token, 401, 403, an unreachable Hub) with what to do.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    plan = plan or plan_push(
        folder, repo_id, checkpoint=checkpoint, include_training_state=include_training_state, base_model=base_model
    )
    endpoint = endpoint or constants.ENDPOINT
    try:
        token = check_hub_access(token, endpoint)
    except HubPushError as error:
        raise PushError(str(error)) from error
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except hub_errors() as error:
        raise PushError(
            str(hub_failure(error, endpoint, f"create {repo_id} (or see that it exists)"))
            + " If the repository does not exist yet, the token needs the right to create it in that namespace."
        ) from error
    try:
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        before = api.repo_info(repo_id, revision=branch, files_metadata=False)
        remote = {sibling.rfilename for sibling in before.siblings or []} - set(plan.files)
        # top-level weights from an earlier push that this one does not replace (e.g. other sharding) would mislead
        # loaders; subfolders are no loader's business, and may be the user's own
        stale = {
            name
            for name in remote
            if "/" not in name and (name.endswith(".safetensors") or name == "model.safetensors.index.json")
        }
        # what the allowlist covers and the folder no longer holds (deleted there). A file still there but not
        # uploaded (a link out of the folder) is not gone: its copy on the Hub stays until the user decides.
        gone = sorted(
            name for name in remote - stale if covers(plan.patterns, name) and not os.path.lexists(plan.folder / name)
        )
        deleted = sorted(stale | (set() if keep_remote else set(gone)))
        operations = [CommitOperationAdd(path, content) for path, content in sorted(plan.files.items())]
        operations += [CommitOperationDelete(name) for name in deleted]
        what = {"adapter": "LongLoRA adapter", "llama_longlora": "LongLoRA model", "llama": "merged LongLoRA model"}
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload {what[plan.kind]} with longlora-hub",
            revision=branch,
            create_pr=create_pr,
        )
    except hub_errors() as error:
        raise PushError(str(hub_failure(error, endpoint, f"push to {repo_id}"))) from error
    return PushResult(
        url=url,
        commit_sha=info.oid,
        changed=info.oid != before.sha,
        pull_request_url=info.pr_url,
        files=sorted(plan.files),
        kind=plan.kind,
        deleted=deleted,
        kept_remote=gone if keep_remote else [],
    )


__all__ = [
    "KINDS",
    "PushError",
    "PushPlan",
    "PushResult",
    "covers",
    "find_model_folder",
    "is_local_path",
    "model_card",
    "model_index",
    "plan_push",
    "push_folder",
]
