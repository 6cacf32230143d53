"""The client step of the round protocol: one client's round in, one [`ClientUpdate`] out.

CoMiGS solves a bi-level problem: the experts minimise the training loss, the router minimises the loss on a separate
validation split. Locally this is an alternation: expert steps on train batches with the router frozen, and every
`router_update_every` expert steps, `router_steps` router steps on validation batches with the experts frozen. The two
groups have separate AdamW optimisers; the experts' learning rate follows a cosine from `learning_rate` to
`learning_rate * min_lr_ratio` over all expert steps of the run, the router's is constant. The strategy's
`router_training` picks the variant: the same alternation on the train split, the router trained jointly with the
experts in one optimiser (both on the cosine), or no router at all.

Every transport (Accelerate, the Hub, Flower) runs a client's round through `comigs_hf.client.Client`, whose client
step calls [`train_client_round`] and sends the server the [`ClientUpdate`] it returns; nothing here talks to other
processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .configuration_comigs import EXPERT_ROLES
from .data import ClientData
from .modeling_comigs import CoMiGSForCausalLM
from .strategies import lora_factor


@dataclass
class TrainingConfig:
    """Optimisation of one client per round; defaults follow the CoMiGS reference implementation."""

    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of the expert optimiser."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the experts."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas (a YAML list)."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay of the expert lr to learning_rate * min_lr_ratio over the run."}
    )
    router_learning_rate: float = field(default=2e-3, metadata={"help": "Constant learning rate of the router."})
    local_steps: int = field(default=10, metadata={"help": "Expert optimiser steps per client per round."})
    router_update_every: int = field(
        default=30, metadata={"help": "Expert steps between router phases, counted over the whole run."}
    )
    router_steps: int = field(default=10, metadata={"help": "Router optimiser steps per router phase; 0: frozen."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per optimiser step."})
    micro_batch_size: int = field(
        default=8, metadata={"help": "Sequences per forward; batch_size / micro_batch_size accumulation steps."}
    )
    reference_gradient_leak: bool = field(
        default=False,
        metadata={
            "help": "Reproduce the reference code's zero_grad: alternating steps leave the other group's gradients "
            "to be summed into its next step (kept per client across rounds)."
        },
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm; None: no clipping."})

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        problems = []
        for key in ("learning_rate", "router_learning_rate"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"{key} must be a finite number > 0, got {value}.")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}.")
        for index, beta in enumerate(self.adam_betas):
            if not 0 <= beta < 1:
                problems.append(f"adam_betas[{index}] must be in [0, 1), got {beta}.")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if self.local_steps < 1:
            problems.append(f"local_steps must be >= 1, got {self.local_steps}.")
        if self.router_steps < 0:
            problems.append(f"router_steps must be >= 0 (0 freezes the router), got {self.router_steps}.")
        elif self.router_steps > 0 and self.router_update_every < 1:
            problems.append(
                f"router_update_every must be >= 1 when router_steps={self.router_steps} > 0, got "
                f"{self.router_update_every}."
            )
        if self.batch_size < 1 or self.micro_batch_size < 1:
            problems.append(
                f"batch_size and micro_batch_size must be >= 1, got {self.batch_size} and {self.micro_batch_size}."
            )
        elif self.batch_size % self.micro_batch_size != 0:
            problems.append(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size} "
                "(gradient accumulation)."
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}.")
        if problems:
            raise ValueError("\n".join(problems))


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
        top_k (`int`, *optional*): experts it mixes per token; `None` keeps the model's.
        leaked_gradients (`dict[str, torch.Tensor]`): with `reference_gradient_leak`, the gradients its last round
            left behind, summed into its next steps as the reference code does.
        lora_ranks (`dict[str, int]`): the expert adapters whose rank is below the model's, keyed by their `lora_A`
            parameter name: the client's own rank (`model.lora_r` per client) or a rank HetLoRA's self-pruning cut
            (see [`truncate_to_ranks`]).
        expert_weights (`list[float]`, *optional*): FD-LoRA's fusion weights of its experts, chosen after the last
            round; `None`: the model's mixing (training always starts from it again).
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
    top_k: int | None = None
    leaked_gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_ranks: dict[str, int] = field(default_factory=dict)
    expert_weights: list[float] | None = None

    def to_checkpoint(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_checkpoint(cls, data: dict) -> ClientState:
        return cls(**data)


@dataclass
class ClientUpdate:
    """What one client sends the server after its round: the only thing that leaves a client.

    Args:
        client_id (`int` or `str`): the client's position in the partition (Accelerate, Flower) or its folder name in
            a Hub repo.
        round (`int`): the round trained, from 1.
        shared (`dict[str, torch.Tensor]`): the strategy's shared tensors after local training, on CPU.
        train_tokens (`int`): tokens in the client's training split, its aggregation weight under the
            `"train_tokens"` weighting (FedAvg's example count).
        metrics (`dict[str, float | int | None]`): `train_loss` and `router_loss` (the round's mean losses, `None`
            without a router phase) and `tokens_seen` (the round's expert-step tokens, local steps x batch x block).
    """

    client_id: int | str
    round: int
    shared: dict[str, torch.Tensor]
    train_tokens: int
    metrics: dict[str, float | int | None] = field(default_factory=dict)


def derived_seed(seed: int, round_index: int, client_id: int) -> int:
    """A seed for one (round, client) pair, the same whichever process or transport runs the client."""
    return (seed * 1_000_003 + round_index * 10_007 + client_id + 1) % (2**63)


def cosine_learning_rate(step: int, total_steps: int, peak: float, min_ratio: float) -> float:
    """Cosine decay from `peak` at step 0 to `peak * min_ratio` at `total_steps`."""
    progress = min(step / max(total_steps, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- local training ------------------------------------------------------------------------------------------------
def _sample(blocks: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return blocks[torch.randint(0, blocks.shape[0], (count,), generator=generator)]


def _optimizers(
    model: CoMiGSForCausalLM, state: ClientState, cfg: TrainingConfig, joint: bool, frozen: frozenset[str]
):
    """The expert and router AdamW optimisers; `joint` makes one optimiser of both (the router a second group);
    LoRA factors in `frozen` are in neither."""
    experts = [p for n, p in model.named_parameters_by_role(*EXPERT_ROLES) if lora_factor(n) not in frozen]
    routers = [p for _, p in model.named_parameters_by_role("router")]
    betas, decay = cfg.adam_betas, cfg.weight_decay
    groups = [{"params": experts, "lr": cfg.learning_rate}]
    if joint:
        groups.append({"params": routers, "lr": cfg.router_learning_rate})
    expert_optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, weight_decay=decay)
    router_optimizer = torch.optim.AdamW(routers, lr=cfg.router_learning_rate, betas=betas, weight_decay=decay)
    if state.expert_optimizer:
        expert_optimizer.load_state_dict(state.expert_optimizer)
    if state.router_optimizer and not joint:
        router_optimizer.load_state_dict(state.router_optimizer)
    return experts, routers, expert_optimizer, router_optimizer


# One model serves every client of a process, each with its own optimisers, so the model is never `prepare`d: the
# processes split the clients (data parallel over clients), which sharding engines would not know about.
SUPPORTED_DISTRIBUTED_TYPES = frozenset(
    t for t in DistributedType if t == DistributedType.NO or t.value.startswith("MULTI_")
)
SUPPORTED_MIXED_PRECISIONS = ("no", "fp16", "bf16")


def check_accelerator(accelerator: Accelerator, cfg: TrainingConfig, model: CoMiGSForCausalLM | None = None) -> None:
    """Refuse, by name, the Accelerate setups the client rounds cannot run correctly.

    Raises:
        `ValueError`: a sharding or compiler backend (FSDP, DeepSpeed, Megatron-LM, XLA, ...), fp8, the reference's
        gradient leak under a fp16 loss scale (its leaked gradients would be unscaled with another step's scale), or
        a fp16 loss scale over adapters held in float16 (which the scaler cannot unscale).
    """
    problems = []
    half = model is not None and any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad)
    if accelerator.scaler is not None and half:
        problems.append(
            "fp16 mixed precision needs float32 adapters, but this model's are float16 (model.dtype float16 with "
            "model.upcast_adapters false): set upcast_adapters true or use bf16."
        )
    if accelerator.distributed_type not in SUPPORTED_DISTRIBUTED_TYPES:
        supported = ", ".join(sorted(t.value for t in SUPPORTED_DISTRIBUTED_TYPES))
        problems.append(
            f"Accelerate's distributed type {accelerator.distributed_type.value} is not supported: every process "
            f"holds one frozen base and trains its share of the clients in turn (supported: {supported})."
        )
    if accelerator.mixed_precision not in SUPPORTED_MIXED_PRECISIONS:
        problems.append(
            f"mixed precision {accelerator.mixed_precision!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_MIXED_PRECISIONS)}."
        )
    if accelerator.scaler is not None and cfg.reference_gradient_leak:
        problems.append(
            "training.reference_gradient_leak cannot run under fp16 loss scaling: the leaked gradients would be "
            "unscaled with a later step's scale. Use bf16 or full precision."
        )
    if problems:
        raise ValueError("\n".join(problems))


def _accumulated_step(model, optimizer, params, blocks, cfg, accelerator, generator, penalty=None) -> float:
    """One optimiser step over `batch_size` sequences as micro-batches; returns the mean loss. `penalty` (a
    regulariser of the parameters alone, such as HetLoRA's tail norms) is added once per step, not reported.

    Under fp16 `accelerator.backward` scales the loss: the gradients are unscaled before clipping, and a step whose
    gradients overflowed is skipped (the scaler lowers its scale), as a prepared optimiser would do.
    """
    batch = _sample(blocks, cfg.batch_size, generator).to(accelerator.device)
    micro_batches = batch.split(cfg.micro_batch_size)
    total = 0.0
    for micro in micro_batches:
        with accelerator.autocast():
            loss = model(micro, labels=micro).loss / len(micro_batches)
        accelerator.backward(loss)
        total += loss.item()
    if penalty is not None:
        accelerator.backward(penalty())
    scaler = accelerator.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # only this optimiser's gradients: under the reference's leak the other group's keep accumulating
    optimizer.zero_grad(set_to_none=True)
    return total


def _set_trainable(params: list[torch.nn.Parameter], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)


def train_client_round(
    model: CoMiGSForCausalLM,
    state: ClientState,
    data: ClientData,
    cfg: TrainingConfig,
    total_expert_steps: int,
    accelerator: Accelerator,
    router_training: str = "validation",
    frozen_factors: frozenset[str] = frozenset(),
    penalty: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float | None]:
    """The local steps of one round; the model must hold the client (see [`activate_client`]). LoRA factors in
    `frozen_factors` (the strategy's) take no step and no gradient; `penalty`, a regulariser of the experts'
    parameters (see `rank_pruning_penalty`), is added to every expert step's loss.

    With `router_training` `"validation"` or `"train"`, expert steps (router frozen) alternate with router phases on
    that split (experts frozen); `"joint"` steps experts and router together on the train split in one optimiser;
    `"none"` steps the experts only. With `cfg.reference_gradient_leak` nothing is frozen during the alternation and
    each optimiser clears only its own gradients, as in the reference code: the router's first step of a phase also
    sums the train-split gradients of the expert steps since the last phase, and the first expert step after a phase
    the phase's validation gradients. Those left over at the end of the round stay with the client.

    Updates `state`'s optimisers, counters, generator and leaked gradients, not its parameters.

    Returns:
        `dict`: `train_loss` (mean over the expert steps) and `router_loss` (mean over the router steps, `None`
        when no router phase fell in this round).
    """
    generator = torch.Generator()
    if state.generator is not None:
        generator.set_state(state.generator)
    joint = router_training == "joint"
    alternating = router_training in ("validation", "train") and cfg.router_steps > 0
    leak = cfg.reference_gradient_leak and alternating
    experts, routers, expert_optimizer, router_optimizer = _optimizers(model, state, cfg, joint, frozen_factors)
    frozen = [p for n, p in model.named_parameters_by_role(*EXPERT_ROLES) if lora_factor(n) in frozen_factors]
    _set_trainable(frozen, False)
    router_blocks = data.validation if router_training == "validation" else data.train
    names = {param: name for name, param in model.named_parameters()}
    leaked = state.leaked_gradients if leak else {}
    for param in experts + routers:  # the model is shared by a process's clients: start from this client's own
        param.grad = leaked[names[param]].to(param.device) if names[param] in leaked else None
    expert_params = experts + routers if joint else experts
    model.train()
    expert_losses, router_losses = [], []
    for _ in range(cfg.local_steps):
        # expert step: the router frozen unless it trains jointly (or leaks)
        _set_trainable(experts, True)
        _set_trainable(routers, joint or leak)
        factor = cosine_learning_rate(state.expert_steps, total_expert_steps, 1.0, cfg.min_lr_ratio)
        for group, peak in zip(expert_optimizer.param_groups, (cfg.learning_rate, cfg.router_learning_rate)):
            group["lr"] = peak * factor
        expert_losses.append(
            _accumulated_step(model, expert_optimizer, expert_params, data.train, cfg, accelerator, generator, penalty)
        )
        state.expert_steps += 1
        if alternating and state.expert_steps % cfg.router_update_every == 0:
            # router phase: experts frozen (unless they leak)
            _set_trainable(experts, leak)
            _set_trainable(routers, True)
            for _ in range(cfg.router_steps):
                router_losses.append(
                    _accumulated_step(model, router_optimizer, routers, router_blocks, cfg, accelerator, generator)
                )
                state.router_steps += 1
    state.leaked_gradients = (
        {names[p]: p.grad.detach().cpu().clone() for p in experts + routers if p.grad is not None} if leak else {}
    )
    for param in experts + routers:
        param.grad = None
    _set_trainable(experts + routers + frozen, True)
    state.expert_optimizer = expert_optimizer.state_dict()
    state.router_optimizer = {} if joint else router_optimizer.state_dict()
    state.generator = generator.get_state()
    return {
        "train_loss": sum(expert_losses) / len(expert_losses),
        "router_loss": sum(router_losses) / len(router_losses) if router_losses else None,
    }


__all__ = [
    "ClientState",
    "ClientUpdate",
    "TrainingConfig",
    "check_accelerator",
    "cosine_learning_rate",
    "derived_seed",
    "train_client_round",
]
