"""Messages and progress bars of longlora-hub, the way transformers and huggingface_hub handle theirs.

Every module logs through `get_logger(__name__)`, a child of the `longlora_hub` logger. That logger has one handler,
which writes `[longlora-hub] message` to stderr (`[longlora-hub] warning: message` for warnings), and does not pass
records on to the root logger, as transformers' own library logger does; so stdout holds only what a command
produces (a table, an answer, a path) and can be piped. Its level is INFO by default: what the commands always
said (a stale folder removed, examples dropped) is still said. `set_verbosity` changes it; `longlora-hub -q` and
`-v` change it for one command, with transformers' and huggingface_hub's verbosity (see [`cli_verbosity`]).

Long, otherwise silent work (a merge, a conversion's copy, a LongQA build) shows a progress bar made by
[`progress_bar`]: huggingface_hub's `tqdm`, so `HF_HUB_DISABLE_PROGRESS_BARS=1` or
`huggingface_hub.utils.disable_progress_bars()` (also for the `longlora_hub` group alone) turn them off.

Only the standard library is imported here, so that `longlora-hub --help` stays instant.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

LIBRARY = "longlora_hub"
PREFIX = "[longlora-hub]"
DEFAULT_LEVEL = logging.INFO
# the group of every progress bar of this package, for `huggingface_hub.utils.disable_progress_bars("longlora_hub")`
PROGRESS_BAR_GROUP = LIBRARY


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message (a test's capture, a notebook's redirection, click's test
    runner), not to the stream there was when the package was imported."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # not StreamHandler's: it would pin the stream of the moment

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{PREFIX} {level}{super().format(record)}"


def _library_logger() -> logging.Logger:
    logger = logging.getLogger(LIBRARY)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.setLevel(DEFAULT_LEVEL)
        # one handler prints each message: an application that configures the root logger does not print it twice
        logger.propagate = False
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger of a module of this package (`get_logger(__name__)`), or the package's own logger."""
    library = _library_logger()
    return library if name is None or name == LIBRARY else logging.getLogger(name)


def get_verbosity() -> int:
    """The level of the package's logger (`logging.INFO` by default)."""
    return _library_logger().getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the level of the package's logger, e.g. `set_verbosity(logging.WARNING)` to keep only warnings."""
    _library_logger().setLevel(level)


# what `longlora-hub -q`, no flag, `-v` and `-vv` set: this package's level, then transformers' and huggingface_hub's
# (None: left as they are)
CLI_LEVELS = {
    -1: (logging.WARNING, logging.ERROR),
    0: (DEFAULT_LEVEL, None),
    1: (logging.DEBUG, logging.INFO),
    2: (logging.DEBUG, logging.DEBUG),
}


@contextmanager
def cli_verbosity(verbose: int = 0, quiet: bool = False) -> Iterator[None]:
    r"""
    The verbosity of one command of `longlora-hub`, set on entry and put back on exit (so that a command run in a
    test, or from another program, leaves the process as it was).

    Args:
        verbose (`int`, *optional*, defaults to `0`):
            How many `-v` were given: 1 for this package's debug messages and transformers' and huggingface_hub's
            info messages, 2 (or more) for their debug messages too.
        quiet (`bool`, *optional*, defaults to `False`):
            `-q`: only this package's warnings and errors, only transformers' and huggingface_hub's errors, and no
            progress bars (huggingface_hub's, which this package's and transformers' downloads use). A command's
            result (stdout) is printed either way.
    """
    if verbose and quiet:
        raise ValueError("verbose and quiet exclude each other")
    ours, theirs = CLI_LEVELS[-1 if quiet else min(verbose, 2)]
    before = get_verbosity()
    with ExitStack() as stack:
        set_verbosity(ours)
        stack.callback(set_verbosity, before)
        if theirs is not None:
            # imported only when asked for: they cost a second, and `--help` must answer at once
            import huggingface_hub.utils.logging as hub_logging
            import transformers.utils.logging as transformers_logging

            for module in (transformers_logging, hub_logging):
                stack.callback(module.set_verbosity, module.get_verbosity())
                module.set_verbosity(theirs)
        if quiet:
            from huggingface_hub.utils import disable_progress_bars

            stack.enter_context(disable_progress_bars())  # turned back on at exit, unless they were off before
        yield


def progress_bar(what: str, **kwargs: Any):
    r"""
    A progress bar on stderr for long work: huggingface_hub's `tqdm`, in the `longlora_hub.<what>` group, so it is
    off when `HF_HUB_DISABLE_PROGRESS_BARS=1` is set or `huggingface_hub.utils.disable_progress_bars()` (for all bars,
    or for the `longlora_hub` group) was called.

    Args:
        what (`str`):
            The work, e.g. `"merge"`: the bar's group is `longlora_hub.merge`.
        kwargs:
            `tqdm`'s arguments (`total`, `desc`, `unit`, `unit_scale`, ...).
    """
    from huggingface_hub.utils import tqdm

    return tqdm(name=f"{PROGRESS_BAR_GROUP}.{what}", **kwargs)


__all__ = [
    "CLI_LEVELS",
    "DEFAULT_LEVEL",
    "LIBRARY",
    "PROGRESS_BAR_GROUP",
    "cli_verbosity",
    "get_logger",
    "get_verbosity",
    "set_verbosity",
    "progress_bar",
]
