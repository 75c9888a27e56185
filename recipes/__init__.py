"""The training recipe and its configurations, shipped in the package as `longlora_hub.recipes` (pyproject maps this
folder there): `recipes/sft.py` in a clone is `longlora_hub.recipes.sft` once installed, and a config is named by its
path under `configs/` without `.yaml` (`smollm2-135m/32k_extend`) wherever the package is installed.

    longlora-hub train --config tiny/extend --max_steps 10
    longlora-hub train --list   # every config's name, and where the accelerate launch configs are
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

FOLDER = Path(str(files(__name__)))
CONFIGS = FOLDER / "configs"
ACCELERATE_CONFIGS = FOLDER / "accelerate"


def config_names() -> list[str]:
    """The shipped recipe configs by name: `llama-2-7b/32k_extend`, `tiny/extend`, ..."""
    return sorted(path.relative_to(CONFIGS).with_suffix("").as_posix() for path in CONFIGS.glob("*/*.yaml"))


def config_path(config: str) -> str:
    r"""
    The YAML a recipe's `--config` value means: a file that exists as given, else a shipped config by name
    (`smollm2-135m/32k_extend`, with or without `.yaml`, also as the clone's `recipes/configs/...` path that a pip
    user copies from the README).

    Raises:
        `ValueError`: If `config` is neither a file nor the name of a shipped config; the message lists the names.
    """
    if Path(config).expanduser().is_file():
        return config
    name = config.removesuffix(".yaml")
    name = name.split("configs/", 1)[1] if "configs/" in name else name
    if name in config_names():
        return str(CONFIGS / f"{name}.yaml")
    raise ValueError(
        f"--config {config}: no such file, nor a shipped recipe config of that name. Give a YAML file, or one of: "
        f"{', '.join(config_names())} (longlora-hub train --list shows where they are)."
    )


def listing() -> str:
    """What `longlora-hub train --list` prints: each shipped config and accelerate launch config, a tab, its path."""
    accelerate = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    lines = ["# recipe configs: longlora-hub train --config NAME"]
    lines += [f"{name}\t{CONFIGS / name}.yaml" for name in config_names()]
    lines += ["# accelerate launch configs: accelerate launch --config_file PATH -m longlora_hub.train --config NAME"]
    lines += [f"{path.stem}\t{path}" for path in accelerate]
    return "\n".join(lines)


__all__ = ["ACCELERATE_CONFIGS", "CONFIGS", "config_names", "config_path", "listing"]
