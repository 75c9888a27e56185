"""Turn a Llama checkpoint into a LlamaLongLoRA one extended to a longer context, without loading its weights.

The conversion only rewrites `config.json` (Position Interpolation, S²-Attn settings, `auto_map`) and adds the
remote-code files; the weights, tokenizer and generation config are copied byte for byte. LlamaLongLoRA has
exactly the parameters of Llama, so the base's weight files serve unchanged.
"""

from __future__ import annotations

import glob
import json
import shutil
import uuid
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .rope import EXTENSION_ROPE_TYPES, position_interpolation

if TYPE_CHECKING:
    from .remote_code.configuration_llama_longlora import LlamaLongLoRAConfig

SUPPORTED_MODEL_TYPES = ("llama", "llama_longlora")
# where a checkpoint we write records what it came from (the Hub id of the pretrained base, how it was made), so
# that a model card written later can name the base even when training only saw a local copy
PROVENANCE_FILE = "longlora_hub.json"
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"

# the weight formats transformers loads, in its order of preference, each with the index that names its shards: a
# checkpoint holding both is read from safetensors only, so only those are downloaded and copied
WEIGHT_FORMATS = ((".safetensors", "model.safetensors.index.json"), (".bin", "pytorch_model.bin.index.json"))
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_PATTERNS = ("generation_config.json", "README*", "LICENSE*", "NOTICE*", "USE_POLICY*")
# `*.bin` also matches the Trainer's pickled arguments, which are not part of a model
SKIPPED_FILES = ("training_args.bin",)
# keys that describe the old class or the old RoPE: the new config sets its own
DROPPED_CONFIG_KEYS = (
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "rope_scaling",
    "rope_theta",
    "rope_parameters",
    "original_max_position_embeddings",
    "max_position_embeddings",
)


def remote_code_files() -> list[Path]:
    """The files of `longlora_hub/remote_code/` that every converted checkpoint carries (all but `__init__.py`)."""
    return sorted(path for path in REMOTE_CODE_DIR.glob("*.py") if path.name != "__init__.py")


def _check_s2_settings(group_size_ratio: float, group_size: int | None) -> None:
    if isinstance(group_size_ratio, bool) or not 0.0 < float(group_size_ratio) <= 1.0:
        raise ValueError(
            f"The group size ratio must be in (0, 1], got {group_size_ratio}; the paper uses 0.25 (groups of a "
            "quarter of the sequence)."
        )
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2
    ):
        raise ValueError(
            f"The group size must be an even number of tokens >= 2 (the shifted heads move by half a group), got "
            f"{group_size!r}; or leave it unset to use the group size ratio."
        )


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """What `folder` records of its origin (`base_model`, ...): its provenance file, else nothing known."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def read_license(folder: str | Path) -> str | None:
    """The license a checkpoint folder declares: its provenance record, else its README's YAML `license`."""
    known = read_provenance(folder).get("license")
    readme = Path(folder) / "README.md"
    if known or not readme.is_file():
        return known
    from huggingface_hub.repocard import metadata_load

    try:
        return (metadata_load(readme) or {}).get("license")
    except Exception:  # a YAML error in someone else's card must not stop a conversion
        return None


def is_local(name: str | Path) -> bool:
    return Path(name).expanduser().exists()


def checkpoint_files(names: Iterable[str], locate: Callable[[str], Path]) -> list[str]:
    r"""
    The files of a checkpoint that loading and conversion need, out of all the files it holds.

    That is `config.json`, the provenance file, the tokenizer, the generation config, the README and license files,
    and the weights in one format: safetensors when there are any, else PyTorch `.bin` (never `training_args.bin`).
    When the format's index (`model.safetensors.index.json` or `pytorch_model.bin.index.json`) is there, the weights
    are the index and the shards it names; otherwise every file of that format. Only top-level files count: the
    subfolders of a Hub repo hold other formats (Meta's `original/*.pth`, ...) that no loader reads.

    Args:
        names (`Iterable[str]`):
            The checkpoint's files, as paths relative to its folder with `/` separators (a Hub repo's listing).
        locate (`Callable[[str], Path]`):
            Where one of those files is on disk (downloading it if needed); called for the index only.

    Returns:
        `list[str]`: The needed names, sorted.

    Raises:
        `FileNotFoundError`: If the index names shards the checkpoint does not hold.
        `ValueError`: If the index is not valid JSON or has no `weight_map`.
    """
    top = {name for name in names if "/" not in name}
    patterns = ("config.json", PROVENANCE_FILE, *TOKENIZER_PATTERNS, *OTHER_PATTERNS)
    needed = {name for name in top if any(fnmatchcase(name, pattern) for pattern in patterns)}
    for suffix, index in WEIGHT_FORMATS:
        if index in top:
            shards = _index_shards(locate(index))
            missing = sorted(shards - top)
            if missing:
                raise FileNotFoundError(
                    f"{index} names {len(missing)} weight files the checkpoint does not hold (e.g. {missing[0]}); "
                    "pass a complete checkpoint, or restore the missing shards from the original."
                )
            return sorted(needed | shards | {index})
        weights = {name for name in top if name.endswith(suffix) and name not in SKIPPED_FILES}
        if weights:
            return sorted(needed | weights)
    return sorted(needed)


def _index_shards(path: Path) -> set[str]:
    """The shard files a sharded checkpoint's index names (the values of its `weight_map`)."""
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a valid weights index ({type(error).__name__}: {error}); restore it from the original "
            "checkpoint."
        ) from None


def _download_error(base: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"{base} is not a local folder and could not be downloaded from the Hugging Face Hub "
        f"({type(error).__name__}: {error}). Check the path, the repo id and revision, your network, and for gated "
        "models your access and token (`hf auth login`)."
    )


def resolve_checkpoint(base: str | Path, revision: str | None = None) -> Path:
    r"""
    The folder of a checkpoint: a local folder as is, a Hub repo id downloaded into the Hugging Face cache.

    From the Hub, only what `checkpoint_files` picks is downloaded (config, tokenizer, generation config, README and
    license, and the weights in one format), so a repo that also carries `.bin` copies of its safetensors or Meta's
    `original/` weights costs no more than the model itself. When the Hub cannot be reached (offline mode, no
    network), a snapshot of that revision already in the cache serves, as with `snapshot_download`.

    Args:
        base (`str` or `Path`):
            A local checkpoint folder or a Hub repo id.
        revision (`str`, *optional*):
            The branch, tag or commit of a Hub repo; defaults to its default branch. Ignored for a local folder.

    Returns:
        `Path`: The checkpoint folder (for a Hub id, its snapshot in the cache).

    Raises:
        `FileNotFoundError`: If `base` is a file, neither a folder nor a valid repo id, or cannot be downloaded.
    """
    base = str(base)
    local = Path(base).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"{base} is a file; pass the folder that holds the checkpoint's config.json.")
        return local
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        raise FileNotFoundError(
            f"No folder at {base}. Pass an existing checkpoint folder or a Hub repo id such as "
            "'meta-llama/Llama-2-7b-hf'."
        ) from None
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        names = HfApi().list_repo_files(base, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:  # the cache must not hide a wrong id
        raise _download_error(base, error) from error
    except Exception as error:  # offline, network, Hub down: what the cache holds may do
        return _cached_checkpoint(base, revision, error)

    def download(name: str) -> Path:
        try:
            return Path(hf_hub_download(base, name, revision=revision))
        except Exception as error:
            raise _download_error(base, error) from error

    needed = checkpoint_files(names, download)
    try:
        # the names as literal patterns: snapshot_download matches with fnmatch, whose `*` also crosses folders
        return Path(snapshot_download(base, revision=revision, allow_patterns=[glob.escape(n) for n in needed]))
    except Exception as error:
        raise _download_error(base, error) from error


def _cached_checkpoint(base: str, revision: str | None, error: Exception) -> Path:
    """The cached snapshot of a Hub checkpoint that could not be listed, if it holds weights; else the error."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(base, revision=revision, local_files_only=True, allow_patterns="config.json"))
    except Exception:
        raise _download_error(base, error) from error
    names = [path.name for path in folder.iterdir() if path.is_file()]
    found = checkpoint_files(names, lambda name: folder / name)
    if not any(name.endswith((".safetensors", ".bin")) for name in found):
        # e.g. only the config.json that transformers fetched: not a checkpoint to work from
        raise _download_error(base, error) from error
    return folder


def _files_to_copy(folder: Path) -> list[Path]:
    """The base's files that a conversion copies: what `checkpoint_files` picks, less the two files it rewrites."""
    names = [path.name for path in folder.iterdir() if path.is_file()]
    needed = checkpoint_files(names, lambda name: folder / name)
    return [folder / name for name in needed if name not in ("config.json", PROVENANCE_FILE)]


def _check_output(output: Path, base_folder: Path) -> None:
    if output.resolve() == base_folder.resolve():
        raise ValueError(
            f"The output folder is the base checkpoint ({output}); pass a new folder so the base stays intact."
        )
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} is an existing file; pass a new or empty folder (nothing is overwritten).")
    if output.is_dir() and any(output.iterdir()):
        raise FileExistsError(
            f"{output} already exists and is not empty; pass a new or empty folder (nothing is overwritten)."
        )


def build_config(
    config_dict: dict[str, Any],
    context_length: int | None,
    group_size_ratio: float = 0.25,
    group_size: int | None = None,
    rope_type: str = "linear",
    ceil: bool = False,
) -> LlamaLongLoRAConfig:
    r"""
    Build the `LlamaLongLoRAConfig` of a converted checkpoint from the base's `config.json` contents.

    Args:
        config_dict (`dict[str, Any]`):
            The base checkpoint's `config.json`, model type `"llama"` or `"llama_longlora"`.
        context_length (`int` or `None`):
            The context to extend to, in tokens; `None` keeps the base's RoPE and context (only the class changes,
            for S² training within the pretraining context).
        group_size_ratio (`float`, *optional*, defaults to `0.25`):
            S²-Attn group size as a fraction of the sequence length, in (0, 1].
        group_size (`int`, *optional*):
            An absolute, even S²-Attn group size in tokens; overrides the ratio.
        rope_type (`str`, *optional*, defaults to `"linear"`):
            One of `"linear"`, `"yarn"` or `"dynamic"`.
        ceil (`bool`, *optional*, defaults to `False`):
            Round the extension's factor up to an integer, like the LongLoRA reference.

    Returns:
        `LlamaLongLoRAConfig`: The new config; `config.json` of the converted checkpoint is its `save_pretrained`.
    """
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"The base checkpoint has model_type {model_type!r}; only Llama-family checkpoints (model_type "
            f"{' or '.join(map(repr, SUPPORTED_MODEL_TYPES))}) can be converted to LlamaLongLoRA."
        )
    if rope_type not in EXTENSION_ROPE_TYPES:
        raise ValueError(f"The RoPE type must be one of {', '.join(EXTENSION_ROPE_TYPES)}, got {rope_type!r}.")
    _check_s2_settings(group_size_ratio, group_size)
    if context_length is None:
        extension = {}
        dropped = DROPPED_CONFIG_KEYS[:5]  # the class keys only: RoPE and context stay as they are
    else:
        found = position_interpolation(config_dict, context_length, rope_type=rope_type, ceil=ceil)
        extension = {
            "rope_parameters": found["rope_parameters"],
            "max_position_embeddings": found["max_position_embeddings"],
        }
        dropped = DROPPED_CONFIG_KEYS

    from .remote_code.configuration_llama_longlora import LlamaLongLoRAConfig

    values = {key: value for key, value in config_dict.items() if key not in dropped}
    values.update(
        architectures=["LlamaLongLoRAForCausalLM"],
        **extension,
        s2_group_size_ratio=float(group_size_ratio),
        s2_group_size=group_size,
    )
    return LlamaLongLoRAConfig(**values)


def convert_checkpoint(
    base: str | Path,
    output: str | Path,
    context_length: int | None,
    group_size_ratio: float = 0.25,
    group_size: int | None = None,
    rope_type: str = "linear",
    ceil: bool = False,
    link_weights: bool = False,
    base_model: str | None = None,
) -> Path:
    r"""
    Convert a Llama checkpoint into a LlamaLongLoRA checkpoint extended to `context_length` tokens.

    The weights are copied, never loaded, so this takes seconds and no memory whatever the model size. The output
    is written to a temporary folder next to `output` and renamed at the end: a failure leaves nothing behind.

    Args:
        base (`str` or `Path`):
            A local checkpoint folder, or a Hub repo id (its config, weights, tokenizer and generation config are
            downloaded).
        output (`str` or `Path`):
            A new or empty folder for the converted checkpoint.
        context_length (`int` or `None`):
            The context to extend to, in tokens; must be above the base's `max_position_embeddings`. `None` keeps
            the base's context and RoPE (the training recipe's conversion when no extension is asked for).
        group_size_ratio (`float`, *optional*, defaults to `0.25`):
            S²-Attn group size as a fraction of the training sequence length, in (0, 1].
        group_size (`int`, *optional*):
            An absolute, even S²-Attn group size in tokens; overrides `group_size_ratio`.
        rope_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (Position Interpolation, as in LongLoRA), `"yarn"` or `"dynamic"` (NTK).
        ceil (`bool`, *optional*, defaults to `False`):
            Round the extension's factor up to an integer, like the LongLoRA reference scripts.
        link_weights (`bool`, *optional*, defaults to `False`):
            Symlink the weight files instead of copying them (the training recipe's on-the-fly conversion: no
            extra disk, but the output then depends on the base staying where it is).
        base_model (`str`, *optional*):
            The Hub id the base came from, recorded in the output's `longlora_hub.json` for model cards; defaults
            to `base` when that is a Hub id, else to what the base folder itself records.

    Returns:
        `Path`: The output folder.

    Raises:
        `FileNotFoundError`: If the base folder, its `config.json` or its weights are missing, or a Hub id cannot
            be downloaded.
        `FileExistsError`: If `output` exists and is not empty.
        `ValueError`: If the base is not a Llama checkpoint, `context_length` is not above its context, the RoPE
            scaling cannot be combined, the group size (ratio) is invalid, or `output` is the base folder.
    """
    _check_s2_settings(group_size_ratio, group_size)
    output = Path(output).expanduser()
    local_base = Path(base).expanduser()
    if local_base.exists():
        _check_output(output, local_base)  # before any download or work
    base_folder = resolve_checkpoint(base)
    _check_output(output, base_folder)
    config_path = base_folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No config.json in {base_folder}; pass the folder of a transformers checkpoint (the one with "
            "config.json and the weights)."
        )
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_path} is not valid JSON ({error}); restore it from the original checkpoint."
        ) from None
    config = build_config(
        config_dict,
        context_length,
        group_size_ratio=group_size_ratio,
        group_size=group_size,
        rope_type=rope_type,
        ceil=ceil,
    )
    files = _files_to_copy(base_folder)
    if not any(path.name.endswith((".safetensors", ".bin")) for path in files):
        raise FileNotFoundError(
            f"No weights (*.safetensors or *.bin) in {base_folder}; pass a complete checkpoint folder."
        )

    output.parent.mkdir(parents=True, exist_ok=True)
    # a hidden sibling on the same filesystem, so the final rename is atomic; created with `mkdir` rather than
    # `tempfile.mkdtemp` so the folder gets the user's usual permissions, not 0700
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    provenance = read_provenance(base_folder)
    provenance["base_model"] = base_model or (None if is_local(base) else str(base)) or provenance.get("base_model")
    provenance["kind"] = "converted"
    provenance["license"] = provenance.get("license") or read_license(base_folder)
    try:
        config.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        for path in remote_code_files():
            shutil.copyfile(path, staging / path.name)
        for path in files:
            if link_weights and path.name.endswith((".safetensors", ".bin")):
                (staging / path.name).symlink_to(path.resolve())
            else:
                shutil.copyfile(path, staging / path.name)  # follows Hub-cache symlinks: the output stands alone
        if output.exists():
            output.rmdir()  # checked empty above; a directory cannot be renamed onto another on every platform
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


__all__ = [
    "PROVENANCE_FILE",
    "SUPPORTED_MODEL_TYPES",
    "build_config",
    "checkpoint_files",
    "convert_checkpoint",
    "read_provenance",
    "remote_code_files",
    "resolve_checkpoint",
]
