"""Time and traffic per round of one recipe over Accelerate (`comigs run`) and Flower's simulation engine
(`comigs flower-sim`).

Run `python benchmarks/transports.py` (default: the offline demo recipe). Each transport runs as a whole process at
two round counts, the runs interleaved (A B A B ...) so that the machine's drift falls on both; a round's cost is the
slope, `(median T(long) - median T(short)) / (long - short)`, which leaves out what both counts pay once (imports,
loading the base and the data, Ray's start, writing the outputs). Bytes per round are the shared tensors each way as
`results.json` counts them (the same on both transports: only the strategy's shared tensors travel), and for Flower
also the `ArrayRecord` bytes the messages carry for them (each array serialised with its header).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {"accelerate": ["run"], "flower": ["flower-sim"]}


def run_once(transport: str, config: str, rounds: int, output: Path, overrides: list[str]) -> tuple[float, dict]:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "comigs_hf.cli", *COMMANDS[transport], "--config", config]
    command += [f"rounds={rounds}", f"output_dir={output}", "plots=false", "trackers=[]", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    return elapsed, json.loads((output / "results.json").read_text())


def array_record_bytes(output: Path) -> tuple[int, int]:
    """The shared state's tensor bytes and the bytes of the `ArrayRecord` carrying it (the global generalist as
    saved: the tensors that travel each way)."""
    from safetensors.torch import load_file

    from comigs_hf.transports.flower import shared_to_arrays

    tensors = {}
    for path in sorted(output.glob("global_generalist/**/*.safetensors")):
        tensors.update({f"{path.parent.name}/{key}": value for key, value in load_file(path).items()})
    arrays = shared_to_arrays(tensors)
    return sum(t.numel() * t.element_size() for t in tensors.values()), sum(len(a.data) for a in arrays.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/demo.yaml")
    parser.add_argument("--rounds", type=int, nargs=2, default=(1, 5), metavar=("SHORT", "LONG"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both transports")
    args = parser.parse_args()
    short, long = args.rounds
    if not 1 <= short < long:
        raise SystemExit(f"--rounds needs 1 <= SHORT < LONG, got {short} {long}.")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="comigs-transports-"))
    times: dict[tuple[str, int], list[float]] = {}
    results: dict[tuple[str, int], dict] = {}
    try:
        for repeat in range(args.repeats):
            for rounds in (short, long):
                for transport in COMMANDS:
                    output = work / f"{transport}-{rounds}"
                    elapsed, result = run_once(transport, args.config, rounds, output, args.overrides)
                    times.setdefault((transport, rounds), []).append(elapsed)
                    results[transport, rounds] = result
                    print(f"repeat {repeat}: {transport:10s} rounds={rounds}: {elapsed:.1f} s", flush=True)
        tensor_bytes, record_bytes = array_record_bytes(work / f"flower-{long}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {}
    for transport in COMMANDS:
        t_short = statistics.median(times[transport, short])
        t_long = statistics.median(times[transport, long])
        clients = results[transport, long]["clients"]
        sent = sum(c["bytes_sent"] for c in clients) / long
        received = sum(c["bytes_received"] for c in clients) / long
        figures[transport] = {
            "per_round_s": (t_long - t_short) / (long - short),
            "fixed_s": t_short - (t_long - t_short) / (long - short) * short,
            f"total_{long}_rounds_s": t_long,
            "bytes_sent_per_round": sent,
            "bytes_received_per_round": received,
            "mean_test_ppl": results[transport, long]["mean_test_ppl"],
        }
    figures["flower"]["array_record_overhead"] = record_bytes / tensor_bytes if tensor_bytes else None
    print(f"\n{args.config}, {len(clients)} clients, medians of {args.repeats} runs at {short} and {long} rounds")
    print("| transport | s per round | fixed s | bytes sent per round | bytes received per round | mean test ppl |")
    print("|---|---|---|---|---|---|")
    for transport, row in figures.items():
        print(
            f"| {transport} | {row['per_round_s']:.2f} | {row['fixed_s']:.1f} | {row['bytes_sent_per_round']:,.0f} | "
            f"{row['bytes_received_per_round']:,.0f} | {row['mean_test_ppl']:.4f} |"
        )
    ratio = figures["flower"]["per_round_s"] / figures["accelerate"]["per_round_s"]
    print(f"Flower / Accelerate per round: {ratio:.2f}x")
    if figures["flower"]["array_record_overhead"] is not None:
        print(f"ArrayRecord bytes / tensor bytes: {figures['flower']['array_record_overhead']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
