"""CoMiGS layers, as the method defines them: the token router, LoRA-carrying projections and the mixture MLP.

Every expert is the whole base MLP with its own LoRA adapter on each target projection. A token router per mixture
scores the experts, keeps the top-k and mixes their outputs; the mixture's eager forward ([`CoMiGSMoeMLP`]) is that
definition, a loop over the experts in which each one runs the whole MLP on the tokens that chose it. It is the
reference for the fast layouts of `experts_comigs.py`, which compute the same function without running the base once
per expert, and which the config's `experts_implementation` picks (`"auto"` by default, see
[`~experts_comigs.EXPERTS_IMPLEMENTATIONS`]), as transformers' MoE models pick theirs.

This file travels with saved models as remote code: it imports only the standard library, torch and its sibling
`experts_comigs.py`.

Legend for shape comments: B batch, T tokens, N = B*T, H hidden, E experts, K chosen experts per token (top-k),
R LoRA rank, O output features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts_comigs import CoMiGSPairProjection, paired_experts_forward, wrap_pair_activations


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to` that costs nothing when the dtype already matches (decoding calls it per token and layer)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@dataclass
class CoMiGSRouting:
    """The routing decision of one mixture for one forward pass.

    Attributes:
        router_logits (`torch.Tensor` of shape `(batch_size, sequence_length, num_experts)`): raw router scores.
        expert_index (`torch.LongTensor` of shape `(batch_size, sequence_length, top_k)`): chosen experts.
        expert_weight (`torch.Tensor` of shape `(batch_size, sequence_length, top_k)`): mixing weights.
        sums_to_one (`bool`): each token's weights sum to 1 by construction (a softmax over the chosen logits, 1/E
            each, a forced expert), so the mixture need not carry their sum.
    """

    router_logits: torch.Tensor
    expert_index: torch.LongTensor
    expert_weight: torch.Tensor
    sums_to_one: bool = False

    def normalized_weight(self) -> torch.Tensor:
        """`expert_weight` divided by each token's total, `(batch_size, sequence_length, top_k)`."""
        if self.sums_to_one:
            return self.expert_weight
        return self.expert_weight / self.expert_weight.sum(dim=-1, keepdim=True)


class CoMiGSRoutingState:
    """Shared between a model and its mixtures: the forced expert (if any) and the routings recorded this pass."""

    def __init__(self):
        self.forced_expert: int | None = None
        # fixed per-expert weights of uniform mixing (FD-LoRA's fusion); None: 1/E each
        self.expert_weights: list[float] | None = None
        self.records: list[CoMiGSRouting] = []
        # decoder blocks' outputs of this pass, kept only while the reference balancing loss needs them
        self.block_outputs: list[torch.Tensor] | None = None
        # each mixture projection's stacked expert factors, kept for one `generate()` call; None: stacked per call
        self.stacked_factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None


class CoMiGSActiveRouting:
    """What a mixture's projections follow during its call (a plain object: setting it per call costs nothing, unlike
    an `nn.Module` attribute): the expert the eager loop runs, or a fast layout's pairs."""

    __slots__ = ("expert", "pairs")

    def __init__(self):
        self.expert: str | None = None
        self.pairs = None  # an `experts_comigs.CoMiGSPairs` for the duration of a fast layout's call


class CoMiGSRouter(nn.Module):
    """Token-level linear router: scores every expert, keeps the top-k, mixes with softmax weights.

    With `top_k > 1` the weights are a softmax over the k chosen logits. With `top_k == 1` the weight is the chosen
    expert's softmax probability over all experts, so the LM loss still sends a gradient into the router. With
    `mixing="uniform"` every expert is chosen with weight 1/E, or the given `expert_weights`, and the scores are
    unused (a mixture without router).
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, device=None, dtype=None, mixing: str = "router"
    ):
        super().__init__()
        self.top_k = top_k
        self.mixing = mixing
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        forced_expert: int | None = None,
        expert_weights: list[float] | None = None,
    ) -> CoMiGSRouting:
        dtype, router = hidden_states.dtype, self.weight  # dtype: of the mixing weights
        router_logits = F.linear(_as(hidden_states, router.dtype), router)  # (B, T, E)
        if forced_expert is not None:
            index = torch.full((*router_logits.shape[:-1], 1), forced_expert, device=router_logits.device)
            weight = torch.ones(index.shape, dtype=dtype, device=router_logits.device)
            return CoMiGSRouting(router_logits, index, weight, sums_to_one=True)
        if self.mixing == "uniform":
            num_experts = router.shape[0]
            index = torch.arange(num_experts, device=router_logits.device).expand(*router_logits.shape[:-1], -1)
            if expert_weights is None:
                weight = torch.full(index.shape, 1.0 / num_experts, dtype=dtype, device=index.device)
            else:  # fixed fusion weights, the same for every token
                fixed = torch.tensor(expert_weights, dtype=dtype, device=index.device)  # (E,)
                weight = fixed.expand(index.shape)
            # (B, T, E) pairs
            return CoMiGSRouting(router_logits.detach(), index, weight, sums_to_one=expert_weights is None)
        # routing decisions in float32: bf16 logits make near-ties flip and softmax lose mass
        logits32 = router_logits if router_logits.dtype == torch.float32 else router_logits.float()
        top_logits, index = logits32.topk(self.top_k, dim=-1)  # (B, T, K)
        if self.top_k == 1:
            weight = logits32.softmax(dim=-1).gather(-1, index)
        else:
            weight = top_logits.softmax(dim=-1)
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        return CoMiGSRouting(router_logits, index, weight, sums_to_one=self.top_k > 1)


class CoMiGSLoraLinear(CoMiGSPairProjection, nn.Module):
    """A frozen projection (`nn.Linear` or GPT-2's `Conv1D`) plus LoRA adapters kept in PEFT's layout.

    `lora_A[name]` is `nn.Linear(in, R)` and `lora_B[name]` is `nn.Linear(R, out)`, keyed by expert name, exactly as a
    PEFT `LoraLayer` keys them by adapter name, and it computes what PEFT's LoRA layer computes:
    `base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`, with the expert its mixture runs now (`role` `"input"`
    or `"output"`, the first and last projections of a mixture MLP) or with its one adapter (`role="shared"`: the
    optional attention adapter). Under a fast experts implementation the mixture lays out token/expert pairs instead
    and the projection follows them (see `experts_comigs.CoMiGSPairProjection`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_names: list[str],
        r: int,
        scaling: float,
        dropout: float,
        role: str,
        base_path: str,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # the adapters' dtype: given (float32 on a half-precision base, see `upcast_adapters`), else the base's, or
        # float32 when the base stores integers (a quantised layer)
        self.adapter_dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        self.role = role
        # path of the wrapped projection inside the unwrapped base model, used for PEFT key names
        self.base_path = base_path
        self.r = r
        self.scaling = scaling
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            # as PEFT: nn.Linear and the quantised linears (whose weight holds packed integers) say their features
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.set_adapters(adapter_names)
        # set by the mixture this projection belongs to ("input" and "output" roles)
        self.active: CoMiGSActiveRouting | None = None
        self.routing_state: CoMiGSRoutingState | None = None

    # transformers' `_init_weights` of some bases (GPT-2) reads `module.c_proj.weight` directly
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_adapters(self, adapter_names: list[str]) -> None:
        """Keep the adapters named, in this order (the router's order); new ones start as a zero update."""
        weight = self.base_layer.weight
        old_A, old_B = self.lora_A, self.lora_B
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        for name in adapter_names:
            if name in old_A:
                self.lora_A[name], self.lora_B[name] = old_A[name], old_B[name]
                continue
            self.lora_A[name] = nn.Linear(
                self.in_features, self.r, bias=False, device=weight.device, dtype=self.adapter_dtype
            )
            self.lora_B[name] = nn.Linear(
                self.r, self.out_features, bias=False, device=weight.device, dtype=self.adapter_dtype
            )
            self.reset_adapter(name)

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """PEFT's default LoRA init: Kaiming-uniform `A`, zero `B`, so a fresh expert leaves the base unchanged."""
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype the adapters hold now (a model cast after it was built casts them too)."""
        return next(iter(self.lora_A.values())).weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "shared":
            (name,) = self.lora_A.keys()
        else:
            active = self.active
            if active is not None and active.pairs is not None:  # a fast layout: one row per token/expert pair
                return self.pair_forward(x, active.pairs)
            name = active.expert if active is not None else None
            if name is None:
                raise RuntimeError(f"{self.base_path} is part of a CoMiGS mixture and must be called through it.")
        base = self.base_layer(x)
        update = self.lora_B[name](self.lora_A[name](self.lora_dropout(x).to(self.lora_A[name].weight.dtype)))
        return base + (update * self.scaling).to(base.dtype)


class CoMiGSMoeMLP(nn.Module):
    """A base MLP turned into a mixture of LoRA experts with a token-level router.

    The wrapped `base_mlp` keeps its own forward; its target projections were replaced by [`CoMiGSLoraLinear`]s,
    which apply the expert (or, under a fast experts implementation, the pairs) this mixture sets for its call.
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        projections: list[CoMiGSLoraLinear],
        hidden_size: int,
        num_experts: int,
        top_k: int,
        state: CoMiGSRoutingState,
        recompute_activation: bool = True,
        mixing: str = "router",
        config=None,
    ):
        super().__init__()
        self.base_mlp = base_mlp
        # the config whose `_experts_implementation` picks this mixture's layout (`None`: the default, "auto")
        self.config = config
        self._active = CoMiGSActiveRouting()
        wrap_pair_activations(base_mlp, self._active, recompute_activation)
        # on the base's device, in the adapters' dtype
        weight = projections[0].base_layer.weight
        self.router = CoMiGSRouter(
            hidden_size, num_experts, top_k, device=weight.device, dtype=projections[0].adapter_dtype, mixing=mixing
        )
        # plain list: the projections are registered (and saved) under base_mlp already
        self._projections = projections
        self._state = state
        for projection in projections:
            projection.active, projection.routing_state = self._active, state

    def set_experts(self, old_names: list[str], names: list[str], init_router, top_k: int) -> None:
        """Keep the experts in `names` (router order), add fresh ones, give the router one row per expert, and mix
        `top_k` of them per token."""
        for projection in self._projections:
            projection.set_adapters(names)
        old = self.router.weight
        if old_names == names:
            self.router.top_k = top_k
            return
        router = CoMiGSRouter(
            old.shape[1], len(names), top_k, device=old.device, dtype=old.dtype, mixing=self.router.mixing
        )
        init_router(router)
        with torch.no_grad():
            for index, name in enumerate(names):
                if name in old_names:
                    router.weight[index] = old[old_names.index(name)]
        self.router = router

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.router(hidden_states, self._state.forced_expert, self._state.expert_weights)
        self._state.records.append(routing)
        return self.run_routed(routing, hidden_states, *args, **kwargs)

    def run_routed(self, routing: CoMiGSRouting, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The mixture's output under `routing` (recorded nowhere), in the config's experts implementation."""
        implementation = getattr(self.config, "_experts_implementation", None) or "auto"
        if implementation != "eager":
            return paired_experts_forward(self, routing, hidden_states, implementation, *args, **kwargs)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
        chosen = routing.expert_index.reshape(x.shape[0], -1)  # (N, K)
        weights = routing.expert_weight.reshape(x.shape[0], -1)  # (N, K)
        output = torch.zeros_like(x)  # (N, H)
        for index, name in enumerate(self._projections[0].lora_A):  # router order
            token, slot = torch.where(chosen == index)  # the tokens that chose this expert, and where among their K
            if token.numel() == 0:
                continue
            self._active.expert = name
            try:
                expert_output = self.base_mlp(x[token], *args, **kwargs)  # (n, H): the whole MLP with its LoRA
            finally:
                self._active.expert = None
            output = output.index_add(0, token, weights[token, slot, None] * expert_output)
        return output.view(hidden_states.shape)


# ---- routing losses and statistics ----------------------------------------------------------------------------------
def load_balancing_loss(
    routings: list[CoMiGSRouting], target_share: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style load balancing toward a target share per expert, averaged over layers.

    Per layer `sum_e f_e * P_e / t_e`, with `f_e` the fraction of routed token copies going to expert `e`, `P_e` its
    mean router probability and `t_e` its target share. Its minimum, 1, is reached when both match the target; with a
    uniform target it is Switch Transformer's `E * sum_e f_e P_e`. CoMiGS gives the generalists together the share
    `generalist_importance`, so they are not crowded out by the specialists.
    """
    losses = []
    for routing in routings:
        probs = routing.router_logits.float().softmax(dim=-1)  # (B, T, E)
        losses.append(_balancing_term(routing.expert_index, probs, target_share, attention_mask))
    return torch.stack(losses).mean()


def _balancing_term(
    expert_index: torch.LongTensor,
    probs: torch.Tensor,
    target_share: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """One layer's `sum_e f_e * P_e / t_e`: `f_e` from the chosen experts `(B, T, K)`, `P_e` the mean of `probs`
    `(B, T, E)`, padding (attention mask 0) left out."""
    chosen = nn.functional.one_hot(expert_index, probs.shape[-1]).float().sum(dim=-2)  # (B, T, E)
    if attention_mask is not None and attention_mask.shape == probs.shape[:-1]:
        mask = attention_mask.to(probs.dtype).unsqueeze(-1)
        fraction = (chosen * mask).sum(dim=(0, 1)) / (mask.sum() * expert_index.shape[-1]).clamp_min(1)
        mean_prob = (probs * mask).sum(dim=(0, 1)) / mask.sum().clamp_min(1)
    else:
        fraction = chosen.mean(dim=(0, 1)) / expert_index.shape[-1]
        mean_prob = probs.mean(dim=(0, 1))
    return (fraction * mean_prob / target_share.to(probs.device)).sum()


def reference_load_balancing_loss(
    routers: list[CoMiGSRouter],
    block_outputs: list[torch.Tensor],
    target_share: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The balancing loss as the CoMiGS reference code computes it, averaged over layers.

    Each router scores the output hidden state of its decoder block (not the MLP input it routes), chooses its top-k
    again, and the mean probability `P_e` uses top-k-masked probabilities: with top-1 the chosen expert's softmax
    probability and zero elsewhere; with top-k > 1 a softmax over a vector holding the chosen logits and zeros
    elsewhere. The loss per layer is then `sum_e f_e * P_e / t_e`, as in [`load_balancing_loss`].
    """
    losses = []
    for router, hidden in zip(routers, block_outputs):
        logits = nn.functional.linear(hidden.to(router.weight.dtype), router.weight).float()  # (B, T, E)
        if router.top_k == 1:
            top, index = logits.softmax(dim=-1).topk(1, dim=-1)  # (B, T, 1)
            select = torch.zeros_like(logits).scatter(-1, index, top)
        else:
            top, index = logits.topk(router.top_k, dim=-1)  # (B, T, K)
            select = torch.zeros_like(logits).scatter(-1, index, top).softmax(dim=-1)
        losses.append(_balancing_term(index, select, target_share, attention_mask))
    return torch.stack(losses).mean()


def routing_statistics(routings: list[CoMiGSRouting], attention_mask: torch.Tensor | None = None) -> list[dict]:
    """Tokens routed to, and mean mixing weight received by, each expert, per layer (detached)."""
    stats = []
    for routing in routings:
        num_experts = routing.router_logits.shape[-1]
        onehot = nn.functional.one_hot(routing.expert_index, num_experts)  # (B, T, K, E)
        weight = (onehot * routing.expert_weight.unsqueeze(-1)).sum(dim=-2).float()  # (B, T, E)
        tokens = onehot.sum(dim=-2)  # (B, T, E)
        if attention_mask is not None and attention_mask.shape == weight.shape[:-1]:
            mask = attention_mask.unsqueeze(-1).to(weight.dtype)
            tokens, weight, count = tokens * mask.long(), weight * mask, mask.sum()
        else:
            count = torch.tensor(float(weight.shape[0] * weight.shape[1]))
        stats.append(
            {
                "tokens": tokens.sum(dim=(0, 1)).detach(),
                "weight": (weight.sum(dim=(0, 1)) / count.clamp_min(1)).detach(),
            }
        )
    return stats
