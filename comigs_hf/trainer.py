"""One client's local work: the bi-level alternating steps and its evaluation.

CoMiGS solves a bi-level problem: the experts minimise the training loss, the router minimises the loss on a separate
validation split. Locally this is an alternation: expert steps on train batches with the router frozen, and every
`router_update_every` expert steps, `router_steps` router steps on validation batches with the experts frozen. The two
groups have separate AdamW optimisers; the experts' learning rate follows a cosine from `learning_rate` to
`learning_rate * min_lr_ratio` over all expert steps of the run, the router's is constant.

Nothing here talks to other processes: `rounds.py` owns every collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from .config import TrainingSection
from .data import ClientData
from .modeling_comigs import CoMiGSForCausalLM

EXPERT_ROLES = ("generalist", "specialist")


@dataclass
class ClientState:
    """Everything private to one client between rounds, held on CPU while another client uses the model.

    Args:
        client_id (`int`): position of the client in the partition.
        name (`str`): its data partition's name.
        num_specialists (`int`): specialists this client can afford.
        parameters (`dict[str, torch.Tensor]`): all its expert and router tensors (shared ones are overwritten by the
            global state at the start of each round).
        expert_optimizer (`dict`): AdamW state of the experts; empty before the first step.
        router_optimizer (`dict`): AdamW state of the router.
        expert_steps (`int`): expert steps done so far (drives the cosine schedule and the router phases).
        router_steps (`int`): router steps done so far.
        generator (`torch.Tensor`): state of the client's batch-sampling generator.
    """

    client_id: int
    name: str
    num_specialists: int
    parameters: dict[str, torch.Tensor]
    expert_optimizer: dict = field(default_factory=dict)
    router_optimizer: dict = field(default_factory=dict)
    expert_steps: int = 0
    router_steps: int = 0
    generator: torch.Tensor | None = None

    def to_checkpoint(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_checkpoint(cls, data: dict) -> ClientState:
        return cls(**data)


@dataclass
class LocalResult:
    """What one client's round produced: its training losses and tokens (the aggregation weight)."""

    train_tokens: int
    train_loss: float
    router_loss: float | None


def cosine_learning_rate(step: int, total_steps: int, peak: float, min_ratio: float) -> float:
    """Cosine decay from `peak` at step 0 to `peak * min_ratio` at `total_steps`."""
    progress = min(step / max(total_steps, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _sample(blocks: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return blocks[torch.randint(0, blocks.shape[0], (count,), generator=generator)]


def activate_client(model: CoMiGSForCausalLM, state: ClientState, shared: dict[str, torch.Tensor]) -> None:
    """Swap a client into the model: its expert count, its private tensors, then the global shared ones."""
    model.set_num_specialists(state.num_specialists)
    model.load_role_state_dict({**state.parameters, **shared})


def _optimizers(model: CoMiGSForCausalLM, state: ClientState, cfg: TrainingSection):
    experts = [p for _, p in model.named_parameters_by_role(*EXPERT_ROLES)]
    routers = [p for _, p in model.named_parameters_by_role("router")]
    expert_optimizer = torch.optim.AdamW(
        experts, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    router_optimizer = torch.optim.AdamW(
        routers, lr=cfg.router_learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
    )
    if state.expert_optimizer:
        expert_optimizer.load_state_dict(state.expert_optimizer)
    if state.router_optimizer:
        router_optimizer.load_state_dict(state.router_optimizer)
    return experts, routers, expert_optimizer, router_optimizer


def _accumulated_step(model, optimizer, params, blocks, cfg, accelerator, generator) -> float:
    """One optimiser step over `batch_size` sequences as micro-batches; returns the mean loss."""
    batch = _sample(blocks, cfg.batch_size, generator).to(accelerator.device)
    micro_batches = batch.split(cfg.micro_batch_size)
    total = 0.0
    for micro in micro_batches:
        with accelerator.autocast():
            loss = model(micro, labels=micro).loss / len(micro_batches)
        accelerator.backward(loss)
        total += loss.item()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train_client_round(
    model: CoMiGSForCausalLM,
    state: ClientState,
    data: ClientData,
    cfg: TrainingSection,
    total_expert_steps: int,
    accelerator: Accelerator,
) -> LocalResult:
    """Run one round of the client's alternating expert/router steps; the model must hold the client (see
    [`activate_client`]). Updates `state`'s optimiser, counters and generator, not its parameters."""
    generator = torch.Generator()
    if state.generator is not None:
        generator.set_state(state.generator)
    experts, routers, expert_optimizer, router_optimizer = _optimizers(model, state, cfg)
    router_blocks = data.train if cfg.router_on_train else data.validation
    model.train()
    expert_losses, router_losses = [], []
    for _ in range(cfg.local_steps):
        # expert step: router frozen
        _set_trainable(experts, True)
        _set_trainable(routers, False)
        lr = cosine_learning_rate(state.expert_steps, total_expert_steps, cfg.learning_rate, cfg.min_lr_ratio)
        for group in expert_optimizer.param_groups:
            group["lr"] = lr
        expert_losses.append(
            _accumulated_step(model, expert_optimizer, experts, data.train, cfg, accelerator, generator)
        )
        state.expert_steps += 1
        if cfg.router_steps and state.expert_steps % cfg.router_update_every == 0:
            # router phase on held-out data: experts frozen
            _set_trainable(experts, False)
            _set_trainable(routers, True)
            for _ in range(cfg.router_steps):
                router_losses.append(
                    _accumulated_step(model, router_optimizer, routers, router_blocks, cfg, accelerator, generator)
                )
                state.router_steps += 1
    _set_trainable(experts + routers, True)
    state.expert_optimizer = expert_optimizer.state_dict()
    state.router_optimizer = router_optimizer.state_dict()
    state.generator = generator.get_state()
    return LocalResult(
        train_tokens=cfg.local_steps * cfg.batch_size * data.train.shape[1],
        train_loss=sum(expert_losses) / len(expert_losses),
        router_loss=sum(router_losses) / len(router_losses) if router_losses else None,
    )


def _set_trainable(params: list[torch.nn.Parameter], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)


@torch.no_grad()
def evaluate_client(
    model: CoMiGSForCausalLM, blocks: torch.Tensor, cfg: TrainingSection, accelerator: Accelerator, perplexity
) -> dict:
    """Test loss and perplexity (through the shipped `evaluate` metric) and routing shares of the held client.

    Returns:
        `dict` with `test_loss`, `test_ppl`, `test_tokens`, and `routing`: per layer, the share of token copies and
        of mixing weight that goes to the generalists (the rest goes to specialists).
    """
    model.eval()
    if cfg.eval_batches is not None:
        blocks = blocks[: cfg.eval_batches * cfg.micro_batch_size]
    num_generalists = model.config.num_generalists
    token_share, weight_share = None, None
    for micro in blocks.split(cfg.micro_batch_size):
        micro = micro.to(accelerator.device)
        with accelerator.autocast():
            out = model(micro, output_routing_stats=True)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), micro[:, 1:].flatten(), reduction="sum")
        perplexity.add_batch(nll_sum=[nll.item()], num_tokens=[micro[:, 1:].numel()])
        tokens = torch.stack([s["tokens"][:num_generalists].sum() / s["tokens"].sum() for s in out.routing_stats])
        weights = torch.stack([s["weight"][:num_generalists].sum() / s["weight"].sum() for s in out.routing_stats])
        token_share = tokens if token_share is None else token_share + tokens
        weight_share = weights if weight_share is None else weight_share + weights
    result = perplexity.compute()
    num_batches = math.ceil(blocks.shape[0] / cfg.micro_batch_size)
    model.train()
    return {
        "test_loss": result["mean_loss"],
        "test_ppl": result["perplexity"],
        "test_tokens": int(result["num_tokens"]),
        "routing": {
            "generalist_token_share": (token_share / num_batches).tolist(),
            "generalist_weight_share": (weight_share / num_batches).tolist(),
        },
    }
