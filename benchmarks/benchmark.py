"""Speed and memory of a CoMiGS training step against a plain PEFT LoRA step, and generation against the bare base.

Run `python benchmarks/benchmark.py` (or `make bench`). Every variant runs in its own fresh process so
that peak memory is its own; the table prints medians and ratios to the PEFT single-LoRA baseline of the same rank on
the same base. On CPU, "peak memory" is the growth of the process's peak resident set over the training steps (model
and batch already built), measured in a second run of each variant in which glibc maps every large block separately
and returns it when freed, so that the resident set follows the live tensors; on CUDA it is
`torch.cuda.max_memory_allocated` during the steps. "Saved" is the exact size
of the tensors autograd keeps for backward in one forward (activation memory), which does not depend on the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = {
    "peft-lora": None,
    "comigs-1G1S-top2": dict(num_generalists=1, num_specialists=1, top_k=2),
    "comigs-1G3S-top2": dict(num_generalists=1, num_specialists=3, top_k=2),
    "comigs-1G3S-top1": dict(num_generalists=1, num_specialists=3, top_k=1),
    # the same top-2 mixture keeping its activations instead of recomputing them: the speed/memory trade-off
    "comigs-1G1S-top2-keep": dict(num_generalists=1, num_specialists=1, top_k=2, recompute_activation=False),
}


def build_base(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.hidden // 64,
        n_positions=max(args.seq, 256),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(args.device, getattr(torch, args.dtype))


def build_variant(name: str, args: argparse.Namespace):
    base = build_base(args)
    if VARIANTS[name] is None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            use_rslora=True,
            target_modules=r".*\.mlp\.(c_fc|c_proj)",
            fan_in_fan_out=True,
        )
        return get_peft_model(base, config)
    from comigs_hf import CoMiGSForCausalLM

    return CoMiGSForCausalLM.from_base(base, lora_r=args.rank, lora_alpha=2 * args.rank, **VARIANTS[name])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_step(name: str, args: argparse.Namespace) -> dict:
    """Median seconds of forward + backward + AdamW step, and peak memory of the steps, for one variant."""
    model = build_variant(name, args).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    times = []
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - allocated_before
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    return {
        "variant": name,
        "step_s": statistics.median(times),
        "peak_bytes": peak,
        "saved_bytes": saved_activation_bytes(model, batch),
    }


def saved_activation_bytes(model, batch: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward: the activation memory of a step,
    exact and independent of the allocator (the resident-set peak above also counts allocator slack)."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def measure_generation(name: str, args: argparse.Namespace) -> dict:
    """Greedy tokens per second with the KV cache, batch 1, for the bare base or a CoMiGS variant."""
    model = (build_base(args) if name == "base" else build_variant(name, args)).eval()
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
    rates = []
    with torch.no_grad():
        for run in range(4):
            _sync(args.device)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            _sync(args.device)
            if run:
                rates.append(args.new_tokens / (time.perf_counter() - start))
    return {"variant": name, "tokens_per_s": statistics.median(rates)}


def _run_child(args: argparse.Namespace, mode: str, variant: str, live_memory: bool = False) -> dict:
    env = dict(os.environ)
    if live_memory:
        # glibc keeps freed blocks and the resident set then remembers every past fragment; with large blocks mapped
        # and unmapped one by one, the peak resident set follows the peak of live tensors (as max_memory_allocated)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--variant",
        variant,
        *[f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "variant", "json")],
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", choices=["step", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure = measure_step if args.child == "step" else measure_generation
        print(json.dumps(measure(args.variant, args)))
        return {}

    print(
        f"GPT-2-shaped base: {args.layers} layers, d={args.hidden}, vocab {args.vocab}, seq {args.seq}, "
        f"batch {args.batch}, LoRA r={args.rank}; {args.device}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    steps = {v: _run_child(args, "step", v) for v in VARIANTS}
    if not args.device.startswith("cuda"):
        for variant, row in steps.items():
            row["peak_bytes"] = _run_child(args, "step", variant, live_memory=True)["peak_bytes"]
    baseline = steps["peft-lora"]
    ratio = f"{'x PEFT':>9}"
    print(f"\n{'training step':<24}{'median s':>10}{ratio}{'peak MiB':>11}{ratio}{'saved MiB':>11}{ratio}")
    for name, row in steps.items():
        print(
            f"{name:<24}{row['step_s']:>10.4f}{row['step_s'] / baseline['step_s']:>9.2f}"
            f"{row['peak_bytes'] / 2**20:>11.1f}{row['peak_bytes'] / baseline['peak_bytes']:>9.2f}"
            f"{row['saved_bytes'] / 2**20:>11.1f}{row['saved_bytes'] / baseline['saved_bytes']:>9.2f}"
        )
    generation = {v: _run_child(args, "generate", v) for v in ("base", "peft-lora", "comigs-1G3S-top2")}
    print(f"\n{'generation':<24}{'tokens/s':>10}{'x base':>9}")
    for name, row in generation.items():
        print(
            f"{name:<24}{row['tokens_per_s']:>10.1f}{row['tokens_per_s'] / generation['base']['tokens_per_s']:>9.2f}"
        )
    figures = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "variant", "json")},
        "steps": steps,
        "generation": generation,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main()
