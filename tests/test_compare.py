"""recipes/compare.py prints what the runs measured, one column per run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import compare  # noqa: E402


def write_run(directory: Path, strategy: str, ppls: list[float]) -> Path:
    directory.mkdir()
    clients = [{"name": f"client-{i}", "test_ppl": p, "bytes_sent": 2**20} for i, p in enumerate(ppls)]
    (directory / "results.json").write_text(
        json.dumps({"strategy": strategy, "clients": clients, "mean_test_ppl": sum(ppls) / len(ppls)})
    )
    return directory


def test_comparison_table_lists_every_client_and_the_mean_per_run(tmp_path, capsys):
    runs = [write_run(tmp_path / "a", "comigs", [10.0, 20.0]), write_run(tmp_path / "b", "local", [12.5, 30.0])]
    compare.main([str(r) for r in runs])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["comigs", "local"]
    assert lines[2].split() == ["client-0", "10.00", "12.50"]
    assert lines[5].split() == ["mean", "15.00", "21.25"]


def test_missing_results_name_the_run(tmp_path):
    with pytest.raises(SystemExit, match="results.json does not exist"):
        compare.main([str(tmp_path / "nowhere")])
