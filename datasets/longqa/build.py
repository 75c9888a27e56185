"""Build the LongQA dataset: a thin wrapper over `longlora-hub longqa build` that uses this folder's README.md as
the dataset card template.

    python datasets/longqa/build.py --output longqa-out --longalpaca Yukang/LongAlpaca-12k \
        --tokenizer meta-llama/Llama-2-7b-hf --max-length 16384        # a LongAlpaca-16k-length-like subset
    python datasets/longqa/build.py --output demo-out --synthetic 200 --tokenizer path/to/tokenizer

Every option of `longlora-hub longqa build --help` is accepted. The logic lives in `longlora_hub/longqa/`; datasets
4+ no longer runs loading scripts, so this script writes parquet files and a card instead of being one.
"""

from __future__ import annotations

import sys
from pathlib import Path

CARD_TEMPLATE = Path(__file__).with_name("README.md")


def main(argv: list[str] | None = None) -> None:
    # imported here: this folder is named like the `datasets` library, so keep the script import-free at load time
    from longlora_hub.cli_longqa import build_command

    args = list(sys.argv[1:] if argv is None else argv)
    if "--card-template" not in args and not any(arg.startswith("--card-template=") for arg in args):
        args += ["--card-template", str(CARD_TEMPLATE)]
    build_command.main(args, prog_name="python datasets/longqa/build.py")


if __name__ == "__main__":
    main()
