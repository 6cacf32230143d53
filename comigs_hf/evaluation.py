"""Evaluation of the client a model holds: the deterministic full split and the paper's protocol, in and out of
distribution.

Two protocols, reported side by side because they answer different questions:

* the **full split** runs every test block once (or the first `batches` micro-batches) and reports the perplexity of
  all its tokens, through the shipped `evaluate` metric: deterministic, the figure to trust;
* the **paper protocol** is the CoMiGS reference code's: `paper_batches` batches of `paper_batch_size` windows (one
  block's length of inputs, each scored on its next tokens), drawn at random positions of the test token stream,
  perplexity `e^(mean of the batch losses)`.
  The windows are seeded by the caller (by run, round and client), so before- and after-aggregation figures of one
  client and round see the same windows, and every transport sees the same ones.

The out-of-distribution test is the paper's second scenario: the same client evaluated on a uniform mixture of every
client's test split (see [`~comigs_hf.data.mixed_test_splits`]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .data import interleave_blocks
from .metrics import load_perplexity
from .modeling_comigs import CoMiGSForCausalLM
from .trainer import derived_seed


@dataclass
class EvaluationConfig:
    """What each evaluation measures; the defaults are the reference code's protocol next to the full split."""

    batches: int | None = field(
        default=None, metadata={"help": "Full split: micro-batches of test blocks per evaluation; None: all."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per evaluation forward."})
    paper_batches: int = field(
        default=100, metadata={"help": "Paper protocol: batches of random test windows; 0 skips the protocol."}
    )
    paper_batch_size: int = field(default=64, metadata={"help": "Paper protocol: windows per batch."})
    out_of_distribution: bool = field(
        default=True,
        metadata={"help": "Also evaluate every client on a uniform mixture of all clients' test splits."},
    )
    before_aggregation: bool = field(
        default=True,
        metadata={"help": "Also evaluate every client after its local steps, before the server aggregates."},
    )

    def __post_init__(self) -> None:
        problems = []
        if self.batches is not None and self.batches < 1:
            problems.append(f"batches must be >= 1 or null (whole test split), got {self.batches}.")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.paper_batches < 0:
            problems.append(f"paper_batches must be >= 0 (0 skips the paper protocol), got {self.paper_batches}.")
        if self.paper_batch_size < 1:
            problems.append(f"paper_batch_size must be >= 1, got {self.paper_batch_size}.")
        if problems:
            raise ValueError("\n".join(problems))


def evaluation_seed(seed: int, round_index: int, client_id: int) -> int:
    """The seed of a client's paper-protocol windows in one round, whichever transport evaluates it (distinct from
    every training seed of [`~comigs_hf.trainer.derived_seed`], whose client ids are -1 or more)."""
    return derived_seed(seed, round_index, -2 - client_id)


def _token_nll(
    model: CoMiGSForCausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    accelerator: Accelerator,
    routing_stats: bool = False,
):
    """Summed loss of `targets` `(batch_size, n)`, scored by the first n positions of `model(inputs)`, and the
    model output."""
    with accelerator.autocast():
        out = model(inputs, output_routing_stats=routing_stats)
    logits = out.logits[:, : targets.shape[1]].float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"), out


@torch.no_grad()
def evaluate_full_split(
    model: CoMiGSForCausalLM, blocks: torch.Tensor, cfg: EvaluationConfig, accelerator: Accelerator
) -> dict:
    """Loss and perplexity over every token of `blocks` (the first `cfg.batches` micro-batches), and routing shares.

    Returns:
        `dict` with `test_loss`, `test_ppl`, `test_tokens`, and `routing`: per layer, the share of token copies and of
        mixing weight that goes to the generalists (the rest goes to specialists).
    """
    perplexity = load_perplexity(keep_in_memory=True, process_id=0, num_process=1)
    if cfg.batches is not None:
        blocks = blocks[: cfg.batches * cfg.batch_size]
    num_generalists = model.config.num_generalists
    token_share, weight_share = None, None
    for micro in blocks.split(cfg.batch_size):
        micro = micro.to(accelerator.device)
        nll, out = _token_nll(model, micro, micro[:, 1:], accelerator, routing_stats=True)
        perplexity.add_batch(nll_sum=[nll.item()], num_tokens=[micro[:, 1:].numel()])
        tokens = torch.stack([s["tokens"][:num_generalists].sum() / s["tokens"].sum() for s in out.routing_stats])
        weights = torch.stack([s["weight"][:num_generalists].sum() / s["weight"].sum() for s in out.routing_stats])
        token_share = tokens if token_share is None else token_share + tokens
        weight_share = weights if weight_share is None else weight_share + weights
    result = perplexity.compute()
    num_batches = math.ceil(blocks.shape[0] / cfg.batch_size)
    return {
        "test_loss": result["mean_loss"],
        "test_ppl": result["perplexity"],
        "test_tokens": int(result["num_tokens"]),
        "routing": {
            "generalist_token_share": (token_share / num_batches).tolist(),
            "generalist_weight_share": (weight_share / num_batches).tolist(),
        },
    }


def check_paper_protocol(test_splits: Sequence[torch.Tensor], names: Sequence[str], cfg: EvaluationConfig) -> None:
    """Refuse, before any training, a test split too short for one paper-protocol window (a block and one token).

    Raises:
        `ValueError`: naming the client, its test blocks and what to change.
    """
    if not cfg.paper_batches:
        return
    for name, blocks in zip(names, test_splits):
        if blocks.numel() < blocks.shape[1] + 1:
            raise ValueError(
                f"Client {name!r} has {blocks.shape[0]} test block(s) of {blocks.shape[1]} tokens: the paper "
                "protocol's windows need a block and one more token. Raise data.test_fraction, lower "
                "data.block_size, or set evaluation.paper_batches=0."
            )


@torch.no_grad()
def evaluate_random_windows(
    model: CoMiGSForCausalLM,
    blocks: torch.Tensor | Sequence[torch.Tensor],
    cfg: EvaluationConfig,
    accelerator: Accelerator,
    seed: int,
) -> dict:
    """The reference code's test figure: random windows of the test token stream, `e^(mean batch loss)`.

    Each of `cfg.paper_batches` batches holds `cfg.paper_batch_size` windows starting at uniformly drawn positions
    of the stream `blocks.flatten()`: `L = blocks.shape[1]` input tokens, each scored on the token after it (the
    reference's `x = data[i:i+L]`, `y = data[i+1:i+1+L]`). The batch loss is the mean over its tokens; the figure
    is the exponential of the mean batch loss, as the reference computes it. Given several splits (the
    out-of-distribution mixture), each window first draws its split uniformly, so no window crosses from one
    client's text into another's.

    Returns:
        `dict` with `paper_test_loss` (the mean batch loss) and `paper_test_ppl`.
    """
    splits = [blocks] if isinstance(blocks, torch.Tensor) else list(blocks)
    if len({split.shape for split in splits}) != 1:
        raise ValueError(f"The paper protocol's splits must have one shape, got {[tuple(s.shape) for s in splits]}.")
    streams, length = torch.stack([split.flatten() for split in splits]), splits[0].shape[1]  # (S, N), L
    if streams.shape[1] < length + 1:
        raise ValueError(f"A test split of {streams.shape[1]} tokens is shorter than one window ({length} + 1).")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(length + 1)  # L inputs and the token after the last
    batch_losses = []
    for _ in range(cfg.paper_batches):
        size = (cfg.paper_batch_size,)
        which = torch.randint(0, len(splits), size, generator=generator) if len(splits) > 1 else torch.zeros(size)
        starts = torch.randint(0, streams.shape[1] - length, size, generator=generator)  # the reference's draw
        windows = streams[which.long()[:, None], starts[:, None] + offsets]  # (paper_batch_size, L + 1)
        total = 0.0
        for micro in windows.split(cfg.batch_size):
            micro = micro.to(accelerator.device)
            total += _token_nll(model, micro[:, :-1], micro[:, 1:], accelerator)[0].item()  # L inputs, L targets
        batch_losses.append(total / (windows.shape[0] * length))
    mean_loss = sum(batch_losses) / len(batch_losses)
    return {"paper_test_loss": mean_loss, "paper_test_ppl": math.exp(mean_loss)}


def evaluate_client(
    model: CoMiGSForCausalLM,
    test: torch.Tensor,
    cfg: EvaluationConfig,
    accelerator: Accelerator,
    *,
    seed: int,
    mixed_test: Sequence[torch.Tensor] | None = None,
) -> dict:
    """Every test figure of the client `model` holds, under both protocols, in and (given `mixed_test`) out of
    distribution.

    Args:
        model ([`CoMiGSForCausalLM`]): holds the client (see [`~comigs_hf.trainer.activate_client`]).
        test (`torch.LongTensor` of shape `(num_blocks, block_size)`): the client's test split.
        cfg ([`EvaluationConfig`]): what to measure.
        accelerator (`Accelerator`): device and autocast.
        seed (`int`): seed of the paper protocol's windows.
        mixed_test (`Sequence[torch.LongTensor]`, *optional*): every client's part of the out-of-distribution
            mixture, as many blocks each (see [`~comigs_hf.data.mixed_test_splits`]): interleaved for the full
            split, drawn from one split per window for the paper protocol.

    Returns:
        `dict`: [`evaluate_full_split`]'s keys and, with `cfg.paper_batches`, `paper_test_loss` and
        `paper_test_ppl`; the same figures on `mixed_test` prefixed `ood_` (routing shares only in distribution).
    """
    model.eval()
    try:
        metrics = evaluate_full_split(model, test, cfg, accelerator)
        if cfg.paper_batches:
            metrics.update(evaluate_random_windows(model, test, cfg, accelerator, seed))
        if mixed_test is not None and cfg.out_of_distribution:
            ood = evaluate_full_split(model, interleave_blocks(mixed_test), cfg, accelerator)
            ood.pop("routing")
            if cfg.paper_batches:
                ood.update(evaluate_random_windows(model, mixed_test, cfg, accelerator, seed))
            metrics.update({f"ood_{key}": value for key, value in ood.items()})
    finally:
        model.train()
    return metrics


__all__ = [
    "EvaluationConfig",
    "check_paper_protocol",
    "evaluate_client",
    "evaluate_full_split",
    "evaluate_random_windows",
    "evaluation_seed",
]
