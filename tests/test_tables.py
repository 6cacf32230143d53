"""`comigs table`: every column x seed run once, finished runs skipped, interrupted ones resumed, other runs' folders
refused, and the tables and curves written from what the runs measured; every shipped table config validates."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import yaml
from federated_setup import tiny_overrides

from comigs_hf.cli import main as comigs
from comigs_hf.tables import load_table_config, run_table
from comigs_hf.transports import accelerate as rounds_module

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted((ROOT / "recipes" / "tables").glob("*.yaml"))


def tiny_table(world, tmp_path) -> Path:
    """A table of the tiny world's recipe: two columns, two rounds, two seeds."""
    overrides = tiny_overrides(*world, tmp_path / "unused", rounds=2, save_models=False)
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    (tmp_path / "recipe.yaml").write_text("strategy: comigs\n")
    path = tmp_path / "tiny_table.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "title": "tiny",
                "recipe": "recipe.yaml",
                "overrides": overrides,
                "seeds": [0, 1],
                "columns": [
                    {"name": "local", "overrides": ["strategy=local"]},
                    {"name": "comigs", "overrides": ["strategy=comigs"]},
                ],
            }
        )
    )
    return path


def test_the_table_runs_every_column_and_seed_then_writes_tables_and_curves(world, tmp_path):
    out = tmp_path / "out"
    assert comigs(["table", "--config", str(tiny_table(world, tmp_path)), "--output", str(out)]) == 0
    for column in ("local", "comigs"):
        for seed in (0, 1):
            results = json.loads((out / column / f"seed-{seed}" / "results.json").read_text())
            assert (results["strategy"], results["seed"]) == (column, seed)
    markdown = (out / "table.md").read_text()
    assert "| client | local | comigs |" in markdown and "out of distribution" in markdown and " ± " in markdown
    rows = list(csv.DictReader(open(out / "table.csv")))
    mean = [r for r in rows if r["column"] == "comigs" and r["client"] == "mean" and r["figure"] == "test_ppl"]
    seeds = [json.loads((out / "comigs" / f"seed-{s}" / "results.json").read_text())["mean_test_ppl"] for s in (0, 1)]
    assert float(mean[0]["mean"]) == pytest.approx(sum(seeds) / 2) and mean[0]["seeds"] == "2"
    curves = list(csv.DictReader(open(out / "curves.csv")))
    assert [(c["column"], c["round"]) for c in curves] == [
        ("local", "1"),
        ("local", "2"),
        ("comigs", "1"),
        ("comigs", "2"),
    ]


def test_finished_runs_are_skipped_and_an_interrupted_one_resumes(world, tmp_path, monkeypatch):
    table, out = load_table_config(tiny_table(world, tmp_path)), tmp_path / "out"
    original = rounds_module.save_checkpoint
    saved = []

    def interrupt_after_round_one(federation, round_index, accelerator):
        original(federation, round_index, accelerator)
        saved.append((federation.strategy.name, federation.plan.seed, round_index))
        if (federation.strategy.name, federation.plan.seed, round_index) == ("comigs", 1, 1):
            raise KeyboardInterrupt  # the run is killed after its first checkpoint

    monkeypatch.setattr(rounds_module, "save_checkpoint", interrupt_after_round_one)
    with pytest.raises(KeyboardInterrupt):
        run_table(table, out)
    assert not (out / "comigs" / "seed-1" / "results.json").exists()
    saved.clear()
    run_table(table, out)
    # the three finished runs are not run again; the interrupted one continues from round 2
    assert saved == [("comigs", 1, 2)]
    assert (out / "comigs" / "seed-1" / "results.json").is_file()


def test_a_folder_of_another_run_is_refused_before_anything_runs(world, tmp_path):
    table, out = load_table_config(tiny_table(world, tmp_path)), tmp_path / "out"
    calls = []
    run_table(table, out, seeds=[0], launch=lambda t, o: calls.append(o))
    with pytest.raises(ValueError, match="another config \\(differing keys: rounds\\)"):
        run_table(table, out, seeds=[0], extra_overrides=["rounds=3"], launch=lambda t, o: calls.append(o))
    assert len(calls) == 2  # only the first call launched anything


def test_repeated_seeds_are_refused(world, tmp_path):
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_table(load_table_config(tiny_table(world, tmp_path)), tmp_path / "out", seeds=[0, 0], launch=print)


def test_columns_runs_and_tabulates_only_the_named_columns(world, tmp_path, monkeypatch, capsys):
    launched = []
    monkeypatch.setattr("comigs_hf.tables._launch", lambda table, overrides: launched.append(overrides))
    monkeypatch.setattr("comigs_hf.tables.write_table", lambda runs, output, title: str([r[:2] for r in runs]))
    config, out = str(tiny_table(world, tmp_path)), str(tmp_path / "out")
    assert comigs(["table", "--config", config, "--output", out, "--seeds", "1", "--columns", "comigs"]) == 0
    assert "[('comigs', 1)]" in capsys.readouterr().out and len(launched) == 1
    with pytest.raises(SystemExit):
        comigs(["table", "--config", config, "--output", out, "--columns", "fedprox"])
    assert (
        "['fedprox'] are not columns of tiny_table.yaml (its columns: ['local', 'comigs'])" in capsys.readouterr().err
    )


def test_a_bad_column_is_refused_naming_it_before_anything_runs(world, tmp_path):
    table = load_table_config(tiny_table(world, tmp_path))
    table.columns[1].overrides.append("strategy=scaffold")
    calls = []
    with pytest.raises(ValueError, match="column 'comigs', seed 0: .*Unknown strategy 'scaffold'"):
        run_table(table, tmp_path / "out", launch=lambda t, o: calls.append(o))
    assert calls == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"colums": []}, "unknown key\\(s\\) \\['colums'\\]"),
        ({"columns": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
        ({"columns": [{"name": "../up"}]}, "may not hold a path"),
        ({"seeds": []}, "seeds: give one or more distinct seeds"),
        ({"recipe": "missing.yaml"}, "recipe 'missing.yaml' does not exist"),
        ({"overrides": "rounds=5"}, "overrides must be a list of strs"),
        ({"seeds": 0}, "seeds must be a list of ints"),
        ({"columns": {"name": "a"}}, "columns must be a list"),
    ],
)
def test_bad_table_configs_are_refused_naming_the_key(world, tmp_path, edit, message):
    path = tiny_table(world, tmp_path)
    raw = {**yaml.safe_load(path.read_text()), **edit}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_table_config(path)


def documented_table_commands(path: Path) -> list[list[str]]:
    lines, commands, current = (
        [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")],
        [],
        "",
    )
    for line in lines:
        current += " " + line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.split()[:2] == ["comigs", "table"]:
            commands.append(shlex.split(current))
        current = ""
    return commands


@pytest.mark.parametrize("path", TABLES, ids=[path.name for path in TABLES])
def test_every_shipped_table_and_its_documented_commands_validate_every_run(path, tmp_path, monkeypatch):
    commands = documented_table_commands(path)
    assert commands, f"{path.name} documents no `comigs table` command"
    monkeypatch.chdir(ROOT)
    launched = []
    monkeypatch.setattr("comigs_hf.tables._launch", lambda table, overrides: launched.append(overrides))
    monkeypatch.setattr("comigs_hf.tables.write_table", lambda runs, output, title: "")
    for command in commands:
        output = command.index("--output") + 1
        command[output] = str(tmp_path / Path(command[output]).name)
        if "--seeds" not in command:  # the seed changes no check: one is enough to validate every column
            command[2:2] = ["--seeds", "0"]
        assert comigs(command[1:]) == 0, command
    table = load_table_config(path)
    assert launched and len(launched) >= len(table.columns)
