"""Print one table of per-client and mean test perplexity for several finished runs.

    python recipes/compare.py outputs/demo/comigs outputs/demo/local outputs/demo/fedavg

Every figure is read from each run's `results.json`: whatever that run measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def comparison_table(runs: list[dict]) -> str:
    names = [client["name"] for client in runs[0]["clients"]]
    header = f"{'test perplexity':<22}" + "".join(f"{run['strategy']:>12}" for run in runs)
    lines = [header, "-" * len(header)]
    for index, name in enumerate(names):
        lines.append(f"{name[:21]:<22}" + "".join(f"{run['clients'][index]['test_ppl']:>12.2f}" for run in runs))
    lines.append("-" * len(header))
    lines.append(f"{'mean':<22}" + "".join(f"{run['mean_test_ppl']:>12.2f}" for run in runs))
    sent = "".join(f"{sum(c['bytes_sent'] for c in run['clients']) / 2**20:>12.2f}" for run in runs)
    lines.append(f"{'MiB sent (all clients)':<22}" + sent)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    directories = [Path(arg) for arg in (argv if argv is not None else sys.argv[1:])]
    if not directories:
        raise SystemExit("usage: python recipes/compare.py RUN_DIR [RUN_DIR ...]")
    runs = []
    for directory in directories:
        path = directory / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist (did the run finish?)")
        runs.append(json.loads(path.read_text()))
    table = comparison_table(runs)
    print(table)
    return table


if __name__ == "__main__":
    main()
