"""A tiny federated world built in code: a word-level tokenizer, a tiny GPT-2 base and 4 clients' text in jsonl."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from conftest import tiny_gpt2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from comigs_hf.tables import free_port

DOMAINS = {
    "sports": "goal match team score league coach win player ball season",
    "finance": "market stock price bank rate profit trade fund bond asset",
    "science": "atom cell energy gene theory data orbit lab protein quantum",
    "cooking": "salt oven butter flour sauce bake onion garlic pan spice",
}
COMMON = "the a of and to in is with for on"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "federated.py"


def write_tiny_world(root: Path, docs_per_domain: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Returns `(base_dir, data_file)`; each domain has its own words plus common ones, so the clients differ."""
    rng = random.Random(seed)
    records = []
    for domain, words in DOMAINS.items():
        vocabulary = words.split() + COMMON.split()
        for _ in range(docs_per_domain):
            records.append({"text": " ".join(rng.choice(vocabulary) for _ in range(40)), "domain": domain})
    data_file = root / "world.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in records))

    vocab = {"<eos>": 0, "<unk>": 1}
    for word in sorted({w for words in DOMAINS.values() for w in words.split()} | set(COMMON.split())):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    base = tiny_gpt2(seed, vocab_size=len(vocab))
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir, data_file


def tiny_overrides(base_dir: Path, data_file: Path, output_dir: Path, **extra) -> list[str]:
    """`key=value` overrides that make any recipe run in seconds on the tiny world."""
    values = {
        "model.base_model": str(base_dir),
        "model.lora_r": 4,
        "data.dataset": "json",
        "data.data_files": str(data_file),
        "data.partition": "column",
        "data.partition_column": "domain",
        "data.block_size": 16,
        "data.validation_fraction": 0.2,
        "data.test_fraction": 0.2,
        "data.cache_dir": str(output_dir.parent / "data-cache"),
        "training.local_steps": 2,
        "training.router_update_every": 2,
        "training.router_steps": 1,
        "training.batch_size": 4,
        "training.micro_batch_size": 2,
        "evaluation.batch_size": 16,
        "evaluation.paper_batches": 2,
        "evaluation.paper_batch_size": 4,
        "rounds": 3,
        "eval_every": 1,
        "output_dir": str(output_dir),
        "trackers": "[none]",
        "plots": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def launch(world, output_dir, num_processes=1, direct=False, **extra) -> subprocess.Popen:
    """The recipe through `accelerate launch`, or (`direct`) as the one process to kill."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    ]
    if num_processes > 1:
        # with Accelerator(cpu=True): N CPU processes on gloo. Each job on its own port: two jobs launched at once
        # by two test workers would otherwise meet at the default 29500 and join each other's process group
        launcher += ["--multi_gpu", "--main_process_port", str(free_port())]
    if direct:
        launcher = [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [*launcher, str(RECIPE), *tiny_overrides(*world, output_dir, **extra)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-4000:]
    return output
