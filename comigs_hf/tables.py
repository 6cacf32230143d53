"""Comparison tables: every strategy x seed of a table config, run (or skipped, or resumed), then summarised.

A table config names one recipe and its columns, each a set of `key=value` overrides of that recipe:

```yaml
title: Table 1, homogeneous experts
recipe: ../configs/agnews_gpt2_comigs.yaml     # relative to this file
overrides: [rounds=20]                          # applied to every run
seeds: [0, 1, 2]
num_processes: 1                                # accelerate processes per run
columns:
  - {name: local, overrides: [strategy=local]}
  - {name: comigs, overrides: [strategy=comigs]}
```

[`run_table`] runs column `c` with seed `s` into `OUTPUT/c/seed-s/`: a run whose `results.json` exists is skipped, an
interrupted one resumes from its last checkpoint, and a folder holding a run of another configuration is refused
(nothing saved is overwritten). [`write_table`] then writes `OUTPUT/table.md` and `OUTPUT/table.csv` (per client and
mean, each test figure as mean ± standard deviation over the seeds, in and out of distribution, bytes sent) and
`OUTPUT/curves.csv` / `OUTPUT/curves.png` (mean test perplexity per round per column).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import config_to_dict, load_config
from .transports.accelerate import differing_keys

logger = logging.getLogger(__name__)

# (results key, heading): the figures of a table, those a run does not report left out
FIGURES = (
    ("test_ppl", "in distribution, full split"),
    ("ood_test_ppl", "out of distribution (all clients' test data), full split"),
    ("paper_test_ppl", "in distribution, paper protocol (random windows, e^mean batch loss)"),
    ("ood_paper_test_ppl", "out of distribution, paper protocol"),
    ("test_ppl_before_aggregation", "in distribution, full split, after local training and before aggregation"),
)
MIXED_PRECISIONS = ("no", "fp16", "bf16", "fp8")


@dataclass
class TableColumn:
    """One column: a name (its output folder) and the overrides that make the recipe this strategy."""

    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class TableConfig:
    """A comparison table: one recipe, the columns, the seeds and how each run is launched."""

    title: str
    recipe: str
    columns: list[TableColumn]
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_processes: int = 1
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        problems = []
        if not self.columns:
            problems.append("columns: a table needs at least one column.")
        names = [column.name for column in self.columns]
        if len(set(names)) != len(names):
            problems.append(f"columns: names must be unique, got {names}.")
        bad = [name for name in names if not name or name != Path(name).name or name.startswith(".")]
        if bad:
            problems.append(f"columns: names become folder names and may not hold a path, got {bad}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: give one or more distinct seeds, got {self.seeds}.")
        if self.num_processes < 1:
            problems.append(f"num_processes must be >= 1, got {self.num_processes}.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}.")
        if problems:
            raise ValueError("\n".join(problems))


def load_table_config(path: str | os.PathLike) -> TableConfig:
    """Read a table config; `recipe` is resolved relative to the file.

    Raises:
        `ValueError`: an unknown or missing key, or a value the table cannot use, named.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a table config is a YAML mapping, got {type(raw).__name__}.")
    known = {f.name for f in dataclasses.fields(TableConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}.")
    missing = sorted({"title", "recipe", "columns"} - set(raw))
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}.")
    for key in ("overrides", "seeds"):
        value = raw.get(key, [])
        kind = str if key == "overrides" else int
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{path}: {key} must be a list of {kind.__name__}s, got {value!r}.")
    if not isinstance(raw["columns"], list):
        raise ValueError(f"{path}: columns must be a list of {{name, overrides}} mappings.")
    columns = []
    for index, column in enumerate(raw["columns"]):
        if not isinstance(column, dict) or set(column) - {"name", "overrides"} or "name" not in column:
            raise ValueError(f"{path}: columns[{index}] must be a mapping with `name` and optional `overrides`.")
        if not isinstance(column.get("overrides") or [], list):
            raise ValueError(f"{path}: columns[{index}].overrides must be a list of KEY=VALUE strings.")
        columns.append(TableColumn(str(column["name"]), [str(o) for o in column.get("overrides") or []]))
    recipe = Path(raw["recipe"])
    recipe = recipe if recipe.is_absolute() else (path.parent / recipe).resolve()
    if not recipe.is_file():
        raise ValueError(f"{path}: recipe {raw['recipe']!r} does not exist (looked for {recipe}).")
    return TableConfig(**{**raw, "recipe": str(recipe), "columns": columns})


def run_overrides(table: TableConfig, column: TableColumn, seed: int, output: Path, extra: Sequence[str]) -> list[str]:
    """The recipe overrides of one run: the table's, the column's, the command line's, then seed and folder."""
    return [*table.overrides, *column.overrides, *extra, f"seed={seed}", f"output_dir={output}", "resume=true"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for the process group of a job launched with several processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(table: TableConfig, overrides: list[str]) -> None:
    if table.num_processes == 1 and table.mixed_precision == "no":
        from .recipe import main as recipe_main  # in this process: no second start-up

        recipe_main(["--config", table.recipe, *overrides])
        return
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    command += ["--num_processes", str(table.num_processes), "--mixed_precision", table.mixed_precision]
    command += ["--dynamo_backend", "no"]
    if table.num_processes > 1:
        # a port of its own: two tables run at once would otherwise meet at accelerate's default 29500 and join each
        # other's process group
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    command += ["--module", "comigs_hf.recipe", "--config", table.recipe, *overrides]
    subprocess.run(command, check=True)


def run_table(
    table: TableConfig,
    output: str | os.PathLike,
    *,
    seeds: Sequence[int] | None = None,
    extra_overrides: Sequence[str] = (),
    launch: Callable[[TableConfig, list[str]], None] | None = None,
) -> list[tuple[str, int, Path]]:
    """Run every column x seed not finished yet; returns `(column, seed, run folder)` for all of them.

    Every run's config is checked before the first starts. A finished run (its `results.json` written) is skipped; an
    interrupted one resumes from its last checkpoint (`resume=true`). Each run folder keeps the config it was started
    with in `table_run.json`, and a folder started with another config is refused, naming the keys that differ.
    `launch(table, overrides)` runs one (default: in this process when the table asks for one process without mixed
    precision, else through `accelerate launch --module comigs_hf.recipe`).

    Raises:
        `ValueError`: a run config the recipe rejects, or a run folder of another configuration.
    """
    output, launch = Path(output), launch or _launch
    seeds = list(seeds) if seeds else list(table.seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}.")
    runs = []
    for column in table.columns:
        for seed in seeds:
            directory = output / column.name / f"seed-{seed}"
            overrides = run_overrides(table, column, seed, directory, extra_overrides)
            try:
                config = config_to_dict(load_config(table.recipe, overrides))
            except ValueError as error:
                raise ValueError(f"column {column.name!r}, seed {seed}: {error}") from None
            _check_same_run(directory, config, column.name, seed)
            runs.append((column, seed, directory, overrides, config))
    for column, seed, directory, overrides, config in runs:
        if (directory / "results.json").is_file():
            logger.info("%s seed %d: finished, skipped", column.name, seed)
            continue
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "table_run.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        logger.info("%s seed %d: running into %s", column.name, seed, directory)
        launch(table, overrides)
    return [(column.name, seed, directory) for column, seed, directory, _, _ in runs]


def _check_same_run(directory: Path, config: dict, column: str, seed: int) -> None:
    recorded = directory / "table_run.json"
    if not recorded.is_file():
        if directory.exists() and any(directory.iterdir()):
            raise ValueError(
                f"{directory} (column {column!r}, seed {seed}) holds files but no table_run.json: not a run of this "
                "table; move it or choose another --output."
            )
        return
    before = json.loads(recorded.read_text())
    differ = differing_keys(before, config, ignore=frozenset({"resume"}))
    if differ:
        raise ValueError(
            f"{directory} (column {column!r}, seed {seed}) holds a run started with another config (differing keys: "
            f"{', '.join(differ)}); move it or choose another --output."
        )


# ---- summaries -----------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def summarise_table(runs: list[tuple[str, int, Path]]) -> dict:
    """Per column: the runs' `results.json`, and their `curves.csv` rows with a test perplexity."""
    columns: dict[str, dict] = {}
    for name, seed, directory in runs:
        results = json.loads((directory / "results.json").read_text())
        with open(directory / "curves.csv", newline="") as handle:
            curves = [row for row in csv.DictReader(handle) if row.get("test_ppl")]
        column = columns.setdefault(name, {"results": [], "curves": [], "seeds": []})
        column["results"].append(results)
        column["curves"].append(curves)
        column["seeds"].append(seed)
    return columns


def write_table(runs: list[tuple[str, int, Path]], output: str | os.PathLike, title: str) -> str:
    """Write `table.md`, `table.csv`, `curves.csv` and (with matplotlib) `curves.png` into `output`; returns the
    Markdown."""
    output = Path(output)
    columns = summarise_table(runs)
    names = list(columns)
    first = columns[names[0]]["results"][0]
    clients = [client["name"] for client in first["clients"]]
    seeds = sorted({seed for column in columns.values() for seed in column["seeds"]})
    lines = [f"# {title}", "", f"Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds.", ""]
    rows = []
    for key, heading in FIGURES:
        if not all(key in client for column in columns.values() for r in column["results"] for client in r["clients"]):
            continue
        lines += [f"**Test perplexity, {heading}**", "", "| client | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for index, client in enumerate([*clients, "mean"]):
            cells = []
            for name in names:
                if client == "mean":
                    values = [sum(c[key] for c in r["clients"]) / len(r["clients"]) for r in columns[name]["results"]]
                else:
                    values = [r["clients"][index][key] for r in columns[name]["results"]]
                cells.append(_cell(values))
                mean, std = _mean_std(values)
                rows.append([name, client, key, mean, "" if std is None else std, len(values)])
            lines.append(f"| {client if client != 'mean' else '**mean**'} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Communication** (whole run, all clients)", "", "| | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for key, label, scale in (
        ("bytes_sent", "MiB sent", 2**-20),
        ("params_sent", "parameters sent", 1),
        ("expert_params_sent", "of which expert parameters", 1),
    ):
        cells = []
        for name in names:
            values = [sum(c.get(key, 0) for c in r["clients"]) * scale for r in columns[name]["results"]]
            mean = sum(values) / len(values)  # the same for every seed: what is sent does not depend on it
            cells.append(f"{mean:,.2f}" if scale != 1 else f"{round(mean):,}")
            rows.append([name, "all", key, mean, "", len(values)])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    curves = _mean_curves(columns)
    lines += ["", "**Mean test perplexity per evaluated round** (in distribution, full split)", ""]
    lines += ["| round | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    by_round = {name: {point[0]: point[1] for point in points} for name, points in curves.items()}
    for round_index in sorted({r for points in by_round.values() for r in points}):
        cells = [f"{by_round[name][round_index]:.2f}" if round_index in by_round[name] else "" for name in names]
        lines.append(f"| {round_index} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(markdown)
    with open(output / "table.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["column", "client", "figure", "mean", "std", "seeds"])
        writer.writerows(rows)
    with open(output / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["column", "round", "mean_test_ppl", "mean_ood_test_ppl"])
        for name, points in curves.items():
            writer.writerows([name, *point] for point in points)
    if importlib.util.find_spec("matplotlib") is not None:
        _plot_curves(curves, output / "curves.png", title)
    else:
        logger.warning("matplotlib is not installed (pip install 'comigs-hf[plots]'): no curves.png written.")
    return markdown


def _mean_curves(columns: dict) -> dict[str, list[tuple[int, float, float | str]]]:
    """Per column and evaluated round: the mean over clients and seeds of the test perplexity (and OOD, if any)."""
    curves = {}
    for name, column in columns.items():
        by_round: dict[int, list[tuple[float, float | None]]] = {}
        for rows in column["curves"]:
            for round_index in sorted({int(row["round"]) for row in rows}):
                at = [row for row in rows if int(row["round"]) == round_index]
                ood = [float(r["ood_test_ppl"]) for r in at if r.get("ood_test_ppl")]
                by_round.setdefault(round_index, []).append(
                    (sum(float(r["test_ppl"]) for r in at) / len(at), sum(ood) / len(ood) if ood else None)
                )
        curves[name] = [
            (
                round_index,
                sum(p for p, _ in points) / len(points),
                sum(o for _, o in points) / len(points) if all(o is not None for _, o in points) else "",
            )
            for round_index, points in sorted(by_round.items())
        ]
    return curves


def _plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axis.set(title=title, xlabel="round", ylabel="mean test perplexity (in distribution)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = ["TableColumn", "TableConfig", "load_table_config", "run_table", "summarise_table", "write_table"]
