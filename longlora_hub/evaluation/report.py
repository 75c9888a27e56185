"""Results of an evaluation as JSON (what `longlora-hub push` reads to put an evaluation table in a model card), as a
Markdown table, and, for passkey retrieval, as a heatmap of accuracy by length and depth."""

from __future__ import annotations

import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .loading import software_versions

RESULT_FORMAT = 1  # bump when the JSON layout changes, so readers can tell


def make_result(task: str, protocol: str, model_info: dict[str, Any], settings: dict[str, Any], results: Any) -> dict:
    r"""
    Assemble the JSON of an evaluation.

    Args:
        task (`str`):
            `"perplexity"` or `"passkey"`.
        protocol (`str`):
            How the numbers were computed (`"longlora"`, `"press"`, `"passkey"`).
        model_info (`dict[str, Any]`):
            `LoadedModel.info`: `model`, `adapter`, `base_model`, `revision`, `model_class`, ...
        settings (`dict[str, Any]`):
            The evaluation's settings (`lengths`, `data`, `stride`, `seed`, ...), stored at the top level.
        results (`Any`):
            The numbers.

    Returns:
        `dict`: `format`, `task`, `protocol`, the model fields, the settings, `results`, `versions` (python, torch,
        transformers, peft, longlora-hub) and `created_at` (UTC, ISO 8601).
    """
    return {
        "format": RESULT_FORMAT,
        "task": task,
        "protocol": protocol,
        **model_info,
        **settings,
        "results": results,
        "versions": software_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write `result` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    """Read a result written by [`save_result`]."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _percent(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"


def _depth_label(depth: float) -> str:
    return f"{depth:.0%}" if abs(depth * 100 - round(depth * 100)) < 1e-9 else f"{depth:.1%}"


def _trials_note(result: dict[str, Any]) -> str:
    if result.get("depths") is None:
        return f"{result['trials']} keys per length at random depths, grouped in {result.get('depth_bins')} bins"
    return f"{result['trials']} keys per cell"


def _depth_rows(result: dict[str, Any]) -> list[tuple[float, list[float] | None]]:
    """Every row of the per-depth table: each fixed depth, or every one of the `depth_bins` bins of random depths
    (by its centre and range, as `summarize_passkey` labels its cells), whether or not a trial fell in it."""
    cells = result["results"]["cells"]
    bins = result.get("depth_bins")
    if result.get("depths") is None and isinstance(bins, int) and bins > 0:
        return [
            (round((index + 0.5) / bins, 6), [round(index / bins, 6), round((index + 1) / bins, 6)])
            for index in range(bins)
        ]
    if result.get("depths") is not None:
        return [(float(depth), None) for depth in sorted(result["depths"])]
    # a result written without its settings: the depths its cells hold
    ranges = {cell["depth"]: cell.get("depth_range") for cell in cells}
    return sorted(ranges.items())


def passkey_grid(result: dict[str, Any]) -> tuple[list[int], list[str], list[list[float | None]]]:
    """`(lengths, depth_labels, accuracy)` with `accuracy[d][l]` the accuracy at the `d`-th depth (or depth bin) and
    the `l`-th length, `None` where no trial fell. With random depths every bin is a row, an empty one too, so the
    depth axis never skips a bin."""
    results = result["results"]
    lengths = [int(length) for length in result["lengths"]]
    rows = _depth_rows(result)
    labels = [
        f"{depth_range[0]:.0%}–{depth_range[1]:.0%}" if depth_range else _depth_label(depth)  # random depths: the bin
        for depth, depth_range in rows
    ]
    found = {(cell["length"], round(cell["depth"], 6)): cell["accuracy"] for cell in results["cells"]}
    return lengths, labels, [[found.get((length, round(depth, 6))) for length in lengths] for depth, _ in rows]


def markdown_table(result: dict[str, Any]) -> str:
    r"""
    A Markdown table of an evaluation's numbers, with a one-line caption, for a README or a model card.

    Perplexity: one row per context length. Passkey: one row per length, one column per depth (per depth bin when
    depths were random) and the accuracy over all depths.
    """
    model = result.get("model")
    if result.get("adapter") and result.get("adapter") != model:
        model = f"{model} + {result['adapter']}"
    if result["task"] == "perplexity":
        caption = (
            f"Perplexity of `{model}` on `{result['data']}` (protocol `{result['protocol']}`, stride "
            f"{result['stride']}{', S²-Attn' if result.get('s2') else ''})."
        )
        lines = ["| Context (tokens) | Perplexity | Windows | Scored tokens |", "|---:|---:|---:|---:|"]
        for row in result["results"]:
            lines.append(f"| {row['seq_len']} | {row['perplexity']:.3f} | {row['windows']} | {row['scored_tokens']} |")
        return caption + "\n\n" + "\n".join(lines) + "\n"
    if result["task"] == "passkey":
        lengths, labels, grid = passkey_grid(result)
        caption = f"Passkey retrieval accuracy of `{model}` ({_trials_note(result)}, greedy decoding, exact match)."
        header = "| Length (tokens) | " + " | ".join(f"depth {label}" for label in labels) + " | all |"
        lines = [header, "|---:|" + "---:|" * (len(labels) + 1)]
        overall = result["results"]["accuracy"]
        for column, length in enumerate(lengths):
            cells = " | ".join(_percent(grid[row][column]) for row in range(len(labels)))
            lines.append(f"| {length} | {cells} | {_percent(overall[str(length)])} |")
        return caption + "\n\n" + "\n".join(lines) + "\n"
    raise ValueError(f"Unknown evaluation task {result['task']!r}; expected 'perplexity' or 'passkey'.")


PLOTS_EXTRA = "pip install 'longlora-hub[plots]'"


def figure_class(purpose: str = "Plotting") -> type:
    r"""
    `matplotlib.figure.Figure`, imported only when a plot is asked for (matplotlib is the optional `plots` extra).

    Figures are made from this class, never through `pyplot`: no global figure registry, no backend chosen or
    switched, so a plot drawn from a notebook, a GUI or a test leaves the caller's matplotlib state alone.

    Raises:
        `ImportError`: If matplotlib is not installed; the message names the extra that installs it.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs matplotlib, an optional dependency of longlora-hub: `{PLOTS_EXTRA}` (or `pip install "
            "matplotlib`)."
        ) from error
    return Figure


def passkey_heatmap_figure(result: dict[str, Any]) -> Any:
    r"""
    The passkey heatmap as a `matplotlib.figure.Figure`: lengths on the x axis, needle depth on the y axis (0% at
    the top), the accuracy written in every cell, a colour bar, and a title naming the model. A depth bin no trial
    fell into keeps its row, hatched and marked "n/a", so the depth axis is never uneven.

    Raises:
        `ImportError`: If matplotlib is not installed (the `plots` extra).
    """
    Figure = figure_class("The passkey heatmap (--plot)")
    import numpy as np
    from matplotlib.patches import Rectangle

    lengths, labels, grid = passkey_grid(result)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    width = max(5.0, 1.0 + 0.9 * len(lengths))
    height = max(3.5, 1.6 + 0.55 * len(labels))
    figure = Figure(figsize=(width, height), dpi=120)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("Context length (tokens)")
    axes.set_ylabel("Needle depth in the prompt")
    model = str(result.get("model", ""))
    if result.get("adapter") and result.get("adapter") != model:
        model += " + adapter"
    # titles fit the figure's width (about 10 characters per inch at these sizes): a long path keeps its end
    room = int(width * 10) - len("Passkey retrieval: ")
    short = model if len(model) <= room else "…" + model[-(room - 1) :]
    figure.suptitle(f"Passkey retrieval: {short}", fontsize=11)
    subtitle = textwrap.fill(f"{_trials_note(result)}; greedy decoding, exact match", width=int(width * 11))
    axes.set_title(subtitle, fontsize=9)
    # thin white lines between the cells, so neighbouring cells of one colour stay apart
    axes.set_xticks(np.arange(len(lengths) + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(len(labels) + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="white", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    for row in range(len(labels)):
        for column in range(len(lengths)):
            value = values[row, column]
            if np.isnan(value):  # no trial here: hatched grey, so it never reads as a colour of the scale
                empty = Rectangle((column - 0.5, row - 0.5), 1, 1, facecolor="#eeeeee", edgecolor="#999999")
                empty.set_hatch("//")
                empty.set_label("no trial")
                axes.add_patch(empty)
                axes.text(column, row, "n/a", ha="center", va="center", color="#555555", fontsize=9)
                continue
            # white on the dark ends of the colour map, black on its light middle
            colour = "white" if value < 0.2 or value > 0.85 else "black"
            axes.text(column, row, f"{value:.0%}", ha="center", va="center", color=colour, fontsize=9)
    bar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    bar.set_label("accuracy")
    figure.tight_layout()
    return figure


def plot_passkey_heatmap(result: dict[str, Any], path: str | Path) -> Path:
    r"""
    Save the heatmap of [`passkey_heatmap_figure`] to `path` (any format matplotlib writes, from the suffix).

    Raises:
        `ImportError`: If matplotlib is not installed; the message names the `plots` extra.
    """
    figure = passkey_heatmap_figure(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


__all__ = [
    "PLOTS_EXTRA",
    "RESULT_FORMAT",
    "figure_class",
    "load_result",
    "make_result",
    "markdown_table",
    "passkey_grid",
    "passkey_heatmap_figure",
    "plot_passkey_heatmap",
    "save_result",
]
