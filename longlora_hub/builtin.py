"""The model this package ships: `builtin:tiny-llama-pretrained`, a 3.4M-parameter Llama pretrained by this project at
a 256-token context (`assets/tiny-llama-pretrained/README.md` says how), so that every command can be tried without a
download. The training recipe also builds untrained tiny models in code (`training.BUILTIN_MODELS`)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = "builtin:tiny-llama-pretrained"
PRETRAINED_TINY = Path(__file__).resolve().parent / "assets" / "tiny-llama-pretrained"


def model_location(model: str) -> str:
    """MODEL as the commands that read a checkpoint (`convert`, `eval`, `generate`) take it: the shipped tiny base's
    folder for `builtin:tiny-llama-pretrained`, anything else as it is (a folder or a Hub id)."""
    return str(PRETRAINED_TINY) if model == SHIPPED_MODEL else model


__all__ = ["PRETRAINED_TINY", "SHIPPED_MODEL", "model_location"]
