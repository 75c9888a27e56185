"""Print pip constraints that pin each of longlora-hub's dependencies to its lower bound (`name==version`), for
`make test-oldest`. torch is left out: the Makefile installs the CPU build it pins, at both ends."""

import re
from pathlib import Path

pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE).group(1)
for name, lower in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^,"]*)', dependencies):
    if name != "torch":
        print(f"{name}=={lower}")
