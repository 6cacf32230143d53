"""Memory and time of the Accelerate rounds against the number of clients, with the same work per round.

Run `python benchmarks/clients_memory.py` (or `--clients 4 64 256 1024`). Each number of clients N runs in a process of
its own: a GPT-2 124M-shaped base (GPT-2's config, random weights, built in code) over one fixed corpus of word-level
documents split iid over the N clients, 2 rounds of 4 clients drawn each round (`clients_per_round=4`, 1 local step
of 4 x 32 tokens), so that every N trains the same 8 client-rounds; every client is evaluated after the last round,
on its in-distribution test split (the paper's protocol evaluates every client). Printed: the process's peak
resident set (`ru_maxrss`) and its ratio to the smallest N's, the run's wall time, the part of it spent evaluating
(which grows with N, one client after the other) and the rest (base, data, the 8 client-rounds, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = 64  # the corpus's vocabulary: words of four domains, word-level tokenizer


def write_world(root: Path, documents: int = 8192, length: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A GPT-2 124M-shaped base with a word-level tokenizer, and `documents` documents of `length` words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    rng = random.Random(seed)
    vocabulary = [f"w{index}" for index in range(WORDS)]
    data = root / "corpus.jsonl"
    with open(data, "w") as handle:
        for _ in range(documents):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(length))}) + "\n")
    vocab = {"<eos>": 0, "<unk>": 1, **{word: index + 2 for index, word in enumerate(vocabulary)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    base = root / "base"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(base)  # 124M parameters, GPT-2's vocabulary size
    tokenizer.save_pretrained(base)
    return base, data


def child(num_clients: int, base: str, data: str, output: str) -> dict:
    from accelerate import Accelerator

    from comigs_hf.config import load_config
    from comigs_hf.recipe import run
    from comigs_hf.transports import accelerate as rounds

    overrides = {
        "model.base_model": base,
        "data.dataset": "json",
        "data.data_files": data,
        "data.partition": "iid",
        "data.num_clients": num_clients,
        "data.block_size": 32,
        "data.cache_dir": f"{output}/data-cache",
        "training.local_steps": 1,
        "training.batch_size": 4,
        "training.micro_batch_size": 4,
        "evaluation.paper_batches": 0,
        "evaluation.out_of_distribution": False,
        "evaluation.before_aggregation": False,
        "evaluation.batches": 1,
        "rounds": 2,
        "eval_every": 2,
        "clients_per_round": 4,
        "output_dir": f"{output}/run",
        "trackers": "[none]",
        "plots": False,
        "save_models": False,
    }
    cfg = load_config(None, [f"{key}={value}" for key, value in overrides.items()])
    evaluating = [0.0]
    evaluate_clients = rounds.evaluate_clients

    def timed(*args, **kwargs):  # the evaluation of every client, apart from the rounds' own work
        started = time.perf_counter()
        try:
            return evaluate_clients(*args, **kwargs)
        finally:
            evaluating[0] += time.perf_counter() - started

    rounds.evaluate_clients = timed
    started = time.perf_counter()
    results = run(cfg, Accelerator(cpu=True))
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    trained = sum(client["rounds_trained"] for client in results["clients"])
    return {
        "clients": num_clients,
        "peak_rss_bytes": peak,
        "wall_s": wall,
        "evaluation_s": evaluating[0],
        "client_rounds": trained,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 64, 256, 1024])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), *args.child[1:])))
        return []
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base, data = write_world(Path(root))
        for num_clients in args.clients:
            output = Path(root) / f"n{num_clients}"
            command = [sys.executable, __file__, "--child", str(num_clients), str(base), str(data), str(output)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print("GPT-2 124M-shaped base, 2 rounds x 4 clients, every client evaluated after the last round; cpu")
    print(
        f"{'clients':>8}{'peak RSS GB':>13}{'x first':>9}{'wall s':>9}{'evaluation s':>14}{'rest s':>8}{'rounds':>8}"
    )
    for row in rows:
        print(
            f"{row['clients']:>8}{row['peak_rss_bytes'] / 1e9:>13.2f}"
            f"{row['peak_rss_bytes'] / first['peak_rss_bytes']:>9.2f}{row['wall_s']:>9.1f}"
            f"{row['evaluation_s']:>14.1f}{row['wall_s'] - row['evaluation_s']:>8.1f}{row['client_rounds']:>8}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
