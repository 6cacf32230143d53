"""What a federation costs beside local compute: one recipe's Accelerate rounds timed phase by phase.

Run `python benchmarks/round_overhead.py` (default: the offline demo recipe, 3 rounds, in this process). The
package's own functions are wrapped with timers for the run:

* local compute: every optimiser step of every client (forward, backward, clipping, the optimiser's step);
* swap: a client swapped into the model and its trained tensors taken out (`run_client_round` beside its steps:
  loading the client's tensors, its optimisers' states in and out, splitting shared from private);
* client state: a client's private state read from disk and saved after its round (`Client.latest_state`,
  `Client._save`), the price of holding one client in memory at a time;
* exchange, aggregation, checkpoint: the round's end;
* evaluation, timed apart: it measures the run, the federation does not need it.

The federation's own work (swap, client state, exchange, aggregation, checkpoint) is printed as a share of local
compute.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict

from accelerate import Accelerator

import comigs_hf.client as client
import comigs_hf.trainer as trainer
import comigs_hf.transports.accelerate as rounds
from comigs_hf.config import load_config
from comigs_hf.recipe import run

PHASES = ("local compute", "swap", "client state", "exchange", "aggregation", "checkpoint", "evaluation")
OVERHEAD = ("swap", "client state", "exchange", "aggregation", "checkpoint")


class PhaseTimer:
    """Seconds spent in wrapped functions, by phase; an inner phase's time is taken out of the outer one's."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._stack: list[list] = []

    def wrap(self, module, name: str, phase: str) -> None:
        function = getattr(module, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._stack.append([phase, time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                phase_, started, inner = self._stack.pop()
                elapsed = time.perf_counter() - started
                self.seconds[phase_] += elapsed - inner
                if self._stack:
                    self._stack[-1][2] += elapsed

        setattr(module, name, timed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args(argv)
    timer = PhaseTimer()
    timer.wrap(client, "run_client_round", "swap")  # what its steps do not take is the client's swap in and out
    timer.wrap(trainer, "_accumulated_step", "local compute")
    timer.wrap(client.Client, "latest_state", "client state")
    timer.wrap(client.Client, "_save", "client state")
    timer.wrap(client.Client, "_test_metrics", "evaluation")
    timer.wrap(rounds, "_exchange", "exchange")
    timer.wrap(rounds, "server_step", "aggregation")
    timer.wrap(rounds, "save_checkpoint", "checkpoint")
    timer.wrap(rounds, "evaluate_clients", "evaluation")
    with tempfile.TemporaryDirectory() as output:
        overrides = [f"rounds={args.rounds}", f"output_dir={output}", "plots=false", "trackers=[]", *args.overrides]
        cfg = load_config(args.config, overrides)
        started = time.perf_counter()
        run(cfg, Accelerator(cpu=True))
        total = time.perf_counter() - started
    seconds = {phase: timer.seconds[phase] for phase in PHASES}
    compute = seconds["local compute"]
    federation = sum(seconds[p] for p in OVERHEAD)
    print(
        f"{args.config}, strategy {cfg.strategy}, {args.rounds} rounds: {total:.1f} s in all (base and data included)"
    )
    print(f"{'phase':<16}{'s per round':>12}{'x compute':>11}")
    for phase in PHASES:
        print(f"{phase:<16}{seconds[phase] / args.rounds:>12.3f}{seconds[phase] / compute:>10.1%}")
    print(
        f"{'federation':<16}{federation / args.rounds:>12.3f}{federation / compute:>10.1%}  ({' + '.join(OVERHEAD)})"
    )
    figures = {"rounds": args.rounds, "seconds": seconds, "federation_share": federation / compute}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main()
