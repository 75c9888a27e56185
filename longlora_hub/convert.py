"""Turn a Llama checkpoint into a LlamaLongLoRA one extended to a longer context, without loading its weights.

The conversion only rewrites `config.json` (Position Interpolation, S²-Attn settings, `auto_map`) and adds the
remote-code files; the weights, tokenizer and generation config are copied byte for byte. LlamaLongLoRA has
exactly the parameters of Llama, so the base's weight files serve unchanged.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtin import model_location
from .log import get_logger, progress_bar
from .remote_code.configuration_llama_longlora import check_s2_settings
from .rope import EXTENSION_ROPE_TYPES, position_interpolation, read_rope

if TYPE_CHECKING:
    from .remote_code.configuration_llama_longlora import LlamaLongLoRAConfig

SUPPORTED_MODEL_TYPES = ("llama", "llama_longlora")
# where a checkpoint we write records what it came from (the Hub id of the pretrained base, how it was made), so
# that a model card written later can name the base even when training only saw a local copy
PROVENANCE_FILE = "longlora_hub.json"
REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
# the architecture whose code this package ships, and so may run without asking (see `trust_remote_code_for`)
OWN_MODEL_TYPE = "llama_longlora"
# inside a staging folder: which process writes it, so that a later run can tell a dead run's leftovers from a live one
STAGING_OWNER_FILE = ".longlora-hub-writer.json"
# a staging folder whose writer cannot be checked (another machine, or one from a version that did not record it) is
# removed once nothing in it has changed for this long: no write of a checkpoint pauses for a day
STALE_STAGING_HOURS = 24
logger = get_logger(__name__)

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


def read_json_object(
    path: str | Path, missing: str, restore: str, error: type[Exception] = ValueError, what: str = ""
) -> dict[str, Any]:
    r"""
    The contents of a JSON file that must hold one object (a config, an adapter config), with errors that name the
    fix.

    Args:
        path (`str` or `Path`): The file.
        missing (`str`): The message when the file does not exist.
        restore (`str`): Where to restore it from, for the messages on bad contents (e.g. "the training run").
        error (`type[Exception]`, *optional*, defaults to `ValueError`): What bad contents raise.
        what (`str`, *optional*): What the object holds, for the message when it is not one.

    Raises:
        `FileNotFoundError`: With `missing`, if there is no such file.
        `error`: If it is not valid JSON, or holds something other than an object (a list, a string, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); restore it from {restore}.") from None
    if not isinstance(found, dict):
        raise error(f"{path} holds a JSON {type(found).__name__}, not an object{what}; restore it from {restore}.")
    return found


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The contents of a checkpoint's `config.json`, which must be a JSON object (see [`read_json_object`])."""
    path = Path(path)
    return read_json_object(
        path,
        f"No config.json in {path.parent}; pass the folder of a transformers checkpoint (the one with config.json "
        "and the weights).",
        "the original checkpoint",
        what=' with the model\'s settings ({"model_type": ..., "hidden_size": ..., ...})',
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
    logger.debug(f"{base}: fetching {len(needed)} of its {len(names)} files ({', '.join(needed)})")
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


def checkpoint_file(checkpoint: str | Path, name: str, revision: str | None = None) -> Path | None:
    r"""
    One small file of a checkpoint, without the rest: from a local folder as is, from a Hub repo downloaded alone.

    Args:
        checkpoint (`str` or `Path`):
            A local checkpoint folder or a Hub repo id.
        name (`str`):
            The file, e.g. `"config.json"`.
        revision (`str`, *optional*):
            The branch, tag or commit of a Hub repo. Ignored for a local folder.

    Returns:
        `Path` or `None`: The file, or `None` when the checkpoint has no such file (or is neither a folder nor a
        valid repo id: loading it then says so).

    Raises:
        `FileNotFoundError`: If the Hub repo or revision does not exist or cannot be reached.
    """
    local = Path(checkpoint).expanduser()
    if local.exists():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(checkpoint))
    except HFValidationError:
        return None
    try:
        return Path(hf_hub_download(str(checkpoint), name, revision=revision))
    except EntryNotFoundError:  # not in the repo, or (offline) not in the cache
        return None
    except Exception as error:
        raise _download_error(str(checkpoint), error) from error


def _code_references(auto_map: Any) -> list[str]:
    """The classes an `auto_map` (of `config.json` or `tokenizer_config.json`) loads from Python files, e.g.
    `"modeling_llama_longlora.LlamaLongLoRAForCausalLM"` or `"other/repo--modeling_x.XModel"`."""
    values = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else []
    found = []
    for value in values:
        found += [str(item) for item in (value if isinstance(value, list | tuple) else [value]) if item]
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trust_remote_code_for(
    checkpoint: str | Path,
    revision: str | None = None,
    trust_remote_code: bool = False,
    option: str = "--trust-remote-code",
) -> bool:
    r"""
    The `trust_remote_code` to load `checkpoint` with, decided before any of its code can run.

    Loading with `trust_remote_code=True` runs the Python files a checkpoint names in its `auto_map`. This package
    runs them unasked only when they are its own: model type `llama_longlora`, every class of the `auto_map` in this
    package's remote-code files, and each of those files byte for byte the one this package ships (so an edited
    file, or one written by another version of longlora-hub, is not run unasked either). Any other checkpoint that
    needs its own code loads only when the user allows it (`trust_remote_code`), as in TRL and vLLM. A checkpoint
    that transformers' own classes load (a stock Llama, even one whose `auto_map` names code) needs none and gets
    `False`. From the Hub only `config.json`, `tokenizer_config.json` and, for a `llama_longlora` one, its
    remote-code files are downloaded for the decision (into the Hugging Face cache, where loading finds them).

    Args:
        checkpoint (`str` or `Path`):
            A local checkpoint folder (or an adapter folder with a tokenizer) or a Hub repo id.
        revision (`str`, *optional*):
            The Hub revision that will be loaded; the decision reads that revision's files.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            The user allows any code the checkpoint ships.
        option (`str`, *optional*, defaults to `"--trust-remote-code"`):
            How the user allows it, for the message.

    Returns:
        `bool`: `True` when loading may run the checkpoint's code, `False` when no code of the checkpoint is needed.

    Raises:
        `ValueError`: If `config.json` is not a JSON object, or the checkpoint needs code that is not this package's
            and the user did not allow it; the message names `option`.
        `FileNotFoundError`: If a Hub repo or revision cannot be found or reached.
    """
    name = str(checkpoint)
    config_path = checkpoint_file(checkpoint, "config.json", revision)
    config = read_config_file(config_path) if config_path is not None else {}
    tokenizer_map: Any = None
    tokenizer_path = checkpoint_file(checkpoint, "tokenizer_config.json", revision)
    if tokenizer_path is not None:
        try:
            tokenizer_config = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            tokenizer_config = {}  # the tokenizer then fails to load, with transformers' message
        tokenizer_map = tokenizer_config.get("auto_map") if isinstance(tokenizer_config, dict) else None
    references = _code_references(config.get("auto_map"))
    tokenizer_references = _code_references(tokenizer_map)
    if not references and not tokenizer_references:
        return False  # nothing to run: transformers' own classes load it
    if trust_remote_code:
        return True
    model_type = config.get("model_type")
    if model_type != OWN_MODEL_TYPE:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type in CONFIG_MAPPING_NAMES:
            # transformers has this architecture: with trust_remote_code=False it loads its own classes and never
            # imports the files the auto_map names
            return False
    own = {path.stem: path for path in remote_code_files()}
    foreign = [
        reference
        for reference in references + tokenizer_references
        if "--" in reference or reference.rpartition(".")[0] not in own
    ]
    if model_type != OWN_MODEL_TYPE or foreign or tokenizer_references:
        shown = ", ".join(foreign or references + tokenizer_references)
        raise ValueError(
            f"{name} needs its own Python code to load (model_type {model_type!r}, auto_map: {shown}), and "
            f"longlora-hub runs no checkpoint's code unasked except its own LlamaLongLoRA. If you trust the code of "
            f"{name}, read it and pass {option}."
        )
    changed = []
    for path in own.values():
        found = checkpoint_file(checkpoint, path.name, revision)
        if found is None:
            changed.append(f"{path.name} (missing)")
        elif _sha256(found) != _sha256(path):
            changed.append(path.name)
    if changed:
        raise ValueError(
            f"{name} is a LlamaLongLoRA checkpoint, but these of its files differ from this longlora-hub's: "
            f"{', '.join(changed)} (written by another version, or edited), so that code is not run unasked. Pass "
            f"{option} if you trust it, or copy this version's files from {REMOTE_CODE_DIR} over them to load the "
            "checkpoint with this version's code."
        )
    return True


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


# ---------------------------------------------------------------------------------------------------------------
# staging: a checkpoint is written into a hidden sibling folder and renamed onto the output when complete


def _process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell it from a later process given the same
    PID; `None` where `/proc` does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    """The PID namespace of this process (Linux): two containers with one hostname do not share PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _writer_record() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "pid_namespace": _pid_namespace(),
        "started": _process_start_time(pid),
    }


def _writer_alive(record: Any) -> bool | None:
    """Whether the process a staging folder's record names still runs: `None` when this machine cannot tell (another
    host or PID namespace, no record, Windows, where signal 0 is not a liveness check)."""
    if not isinstance(record, dict) or os.name == "nt":
        return None
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return None
    started = record.get("started")
    if started is not None and _process_start_time(pid) not in (None, started):
        return False  # the PID now belongs to a process that started after the writer
    return True


def _hours_since_last_change(folder: Path) -> float:
    """Hours since anything in `folder` was last modified (links themselves, never their targets)."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue  # removed while walking
    return max(0.0, time.time() - newest) / 3600


def remove_stale_staging(output: str | Path) -> list[Path]:
    r"""
    Remove the staging folders an interrupted run (`kill -9`, a crash, a power cut) left next to `output`, and say so.

    A run writes `output` into a hidden sibling, `.NAME.<12 hex digits>.partial`, holding a record of its process
    (PID, start time, host). A staging folder of the same output is stale when that process has ended (or its PID
    now belongs to a later process), or, when this machine cannot check the process (written on another host, or by
    a version that kept no record), when nothing in it changed for `STALE_STAGING_HOURS` hours. A folder a running
    process may still be writing is left alone, and named. Only the folders' own files go: links to a base's
    weights are removed, never what they point to.

    Args:
        output (`str` or `Path`):
            The output folder whose stale staging folders to remove.

    Returns:
        `list[Path]`: The folders removed.
    """
    output = Path(output).expanduser()
    if not output.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(output.name)}\.[0-9a-f]{{12}}\.partial")
    removed = []
    for folder in sorted(output.parent.iterdir()):
        if not pattern.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            record = json.loads((folder / STAGING_OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        alive = _writer_alive(record)
        if alive is None:
            hours = _hours_since_last_change(folder)
            if hours < STALE_STAGING_HOURS:
                logger.info(
                    f"left {folder} alone: a run elsewhere may still be writing {output.name} (changed {hours:.1f} "
                    f"hours ago); it is removed once untouched for {STALE_STAGING_HOURS} hours, or remove it yourself."
                )
                continue
            why = f"untouched for {hours:.0f} hours"
        elif alive:
            logger.info(f"left {folder} alone: process {record['pid']} is still writing {output.name} there.")
            continue
        else:
            why = f"process {record['pid']} that wrote it has ended"
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            logger.warning(f"could not remove {folder}, left by an interrupted run ({why}); remove it yourself.")
            continue
        logger.info(f"removed {folder}, left by an interrupted run ({why}).")
        removed.append(folder)
    return removed


def create_staging(output: Path) -> Path:
    """A new staging folder for `output` (after removing stale ones), on its filesystem so the final rename is atomic,
    holding the record of this process that `remove_stale_staging` reads."""
    remove_stale_staging(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # created with `mkdir` rather than `tempfile.mkdtemp` so the folder gets the user's usual permissions, not 0700
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        (staging / STAGING_OWNER_FILE).write_text(json.dumps(_writer_record()) + "\n", encoding="utf-8")
    except BaseException:  # a full disk already: leave nothing
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def finish_staging(staging: Path, output: Path) -> None:
    """Rename the complete `staging` folder onto `output` (absent or empty), without the writer's record."""
    (staging / STAGING_OWNER_FILE).unlink()
    if output.exists():
        output.rmdir()  # checked empty before; a directory cannot be renamed onto another on every platform
    staging.rename(output)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, `timeout`, a scheduler's cancel) raises `SystemExit` like Ctrl-C raises
    `KeyboardInterrupt`, so a command's cleanup runs and leaves no staging folder; for commands, not the library."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    check_s2_settings(group_size_ratio=group_size_ratio, group_size=group_size)
    read_rope(config_dict)  # a RoPE transformers cannot run (factor 0, a string) is refused here, not at training
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
    is written to a temporary folder next to `output` and renamed at the end: a failure leaves nothing behind, and
    what a killed run left (`.NAME.<id>.partial`) is removed by the next conversion to the same output (see
    [`remove_stale_staging`]).

    Args:
        base (`str` or `Path`):
            A local checkpoint folder, a Hub repo id (its config, weights, tokenizer and generation config are
            downloaded), or `builtin:tiny-llama-pretrained`, the tiny base this package ships.
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
    check_s2_settings(group_size_ratio=group_size_ratio, group_size=group_size)
    output = Path(output).expanduser()
    base = model_location(str(base)) if isinstance(base, str) else base
    local_base = Path(base).expanduser()
    if local_base.exists():
        _check_output(output, local_base)  # before any download or work
    base_folder = resolve_checkpoint(base)
    _check_output(output, base_folder)
    config_dict = read_config_file(base_folder / "config.json")
    config = build_config(
        config_dict,
        context_length,
        group_size_ratio=group_size_ratio,
        group_size=group_size,
        rope_type=rope_type,
        ceil=ceil,
    )
    if group_size is not None and group_size > config.max_position_embeddings:
        # accepted (a shorter context may be trained later with an explicit group), but S² would then do nothing
        warnings.warn(
            f"s2_group_size={group_size} is above the context of {config.max_position_embeddings} tokens: every "
            "sequence fits in one group, so S²-Attn trains as full attention. Pass a smaller --group-size (the paper "
            "uses a quarter of the training length) or leave it unset to use the ratio.",
            stacklevel=2,
        )
    files = _files_to_copy(base_folder)
    if not any(path.name.endswith((".safetensors", ".bin")) for path in files):
        raise FileNotFoundError(
            f"No weights (*.safetensors or *.bin) in {base_folder}; pass a complete checkpoint folder."
        )

    provenance = read_provenance(base_folder)
    provenance["base_model"] = base_model or (None if is_local(base) else str(base)) or provenance.get("base_model")
    provenance["kind"] = "converted"
    provenance["license"] = provenance.get("license") or read_license(base_folder)
    staging = create_staging(output)
    try:
        config.save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        for path in remote_code_files():
            shutil.copyfile(path, staging / path.name)
        weights = [path for path in files if path.name.endswith((".safetensors", ".bin"))]
        for path in files:
            if path in weights and link_weights:
                (staging / path.name).symlink_to(path.resolve())
            elif path not in weights:
                shutil.copyfile(path, staging / path.name)  # follows Hub-cache symlinks: the output stands alone
        if not link_weights:
            _copy_weights(weights, staging)
        finish_staging(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _copy_weights(paths: list[Path], folder: Path) -> None:
    """Copy the weight files into `folder` (following Hub-cache links: the output stands alone), with a progress bar
    over their bytes, the only part of a conversion that takes long. File by file, each with `shutil.copyfile`, which
    lets the kernel copy (`sendfile`) where Python would read and write every byte."""
    sizes = [path.stat().st_size for path in paths]
    logger.debug(f"copying {len(paths)} weight files ({sum(sizes) / 1e9:.2f} GB) into {folder}")
    with progress_bar("convert", total=sum(sizes), desc="copying weights", unit="B", unit_scale=True) as bar:
        for path, size in zip(paths, sizes, strict=True):
            shutil.copyfile(path, folder / path.name)
            bar.update(size)


__all__ = [
    "OWN_MODEL_TYPE",
    "PROVENANCE_FILE",
    "STALE_STAGING_HOURS",
    "SUPPORTED_MODEL_TYPES",
    "build_config",
    "checkpoint_file",
    "checkpoint_files",
    "convert_checkpoint",
    "create_staging",
    "finish_staging",
    "read_config_file",
    "read_json_object",
    "read_provenance",
    "remote_code_files",
    "remove_stale_staging",
    "resolve_checkpoint",
    "sigterm_as_exit",
    "trust_remote_code_for",
]
