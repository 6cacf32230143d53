"""The federated recipe: one YAML config, `key=value` overrides, CoMiGS or a baseline over Accelerate.

Launched as `recipes/federated.py` (a thin script around `main`) or `comigs run`:

    accelerate launch recipes/federated.py --config recipes/configs/demo.yaml
    accelerate launch --num_processes 2 recipes/federated.py --config recipes/configs/demo.yaml \
        strategy=fedavg rounds=5

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 ...` gives two processes on gloo. Clients are
spread over the processes; every process holds one frozen base. Outputs land in `output_dir` (see the README).
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator

from .config import config_to_dict, load_config
from .rounds import run_federated


def format_results(results: dict) -> str:
    """One line per client with its test perplexity and traffic, then the mean."""
    lines = [
        f"strategy={results['strategy']} rounds={results['rounds']} seed={results['seed']}",
        f"{'client':<24}{'experts':>8}{'test loss':>11}{'test ppl':>10}{'sent MiB':>10}{'recv MiB':>10}",
    ]
    for client in results["clients"]:
        lines.append(
            f"{client['name'][:23]:<24}{'1+' + str(client['num_specialists']):>8}"
            f"{client['test_loss']:>11.4f}{client['test_ppl']:>10.2f}"
            f"{client['bytes_sent'] / 2**20:>10.2f}{client['bytes_received'] / 2**20:>10.2f}"
        )
    lines.append(f"{'mean':<32}{'':>11}{results['mean_test_ppl']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value, dotted for sections: training.local_steps=5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error

    trackers = [t for t in cfg.trackers if t != "none"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=cfg.output_dir)
    accelerator.init_trackers(f"comigs-{cfg.strategy}", config=_flat(config_to_dict(cfg)))
    results = run_federated(cfg, accelerator)
    if accelerator.is_main_process:
        print(format_results(results))
        print(f"outputs: {cfg.output_dir}")
    accelerator.end_training()
    return results


def _flat(tree: dict, prefix: str = "") -> dict:
    # trackers take flat scalar hyper-parameters
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
