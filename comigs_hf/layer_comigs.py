"""CoMiGS layers: the token router, LoRA-carrying projections and the mixture-of-experts MLP.

Every expert is the whole base MLP with its own LoRA adapter on each target projection. Instead of running the MLP
once per expert, the mixture inserts a "copy" axis K (one slot per chosen expert) after the input projections:

* input projections (e.g. `c_fc`, `gate_proj`/`up_proj`) run the frozen base once on the N tokens and add, per copy,
  the chosen expert's low-rank update: output `(..., K, out)`;
* the MLP's own element-wise code (activation, gating) runs unchanged on `(..., K, inner)`;
* the output projection (e.g. `c_proj`, `down_proj`) is linear, so the gated sum of the experts' base outputs is the
  base applied once to the gated sum of their inputs; only the low-rank updates are taken per copy.

The frozen base weights therefore run over N tokens exactly as in a single-LoRA model; all experts' LoRA factors are
concatenated and applied in a few small matmuls, with no loop over experts or tokens.

This file travels with saved models as remote code: it imports only the standard library, torch and transformers.

Legend for shape comments: B batch, T tokens, N = B*T, H hidden, I inner (MLP width), E experts, K chosen experts per
token (top-k), R LoRA rank, O output features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class CoMiGSRouting:
    """The routing decision of one mixture for one forward pass.

    Attributes:
        router_logits (`torch.Tensor` of shape `(batch_size, sequence_length, num_experts)`): raw router scores.
        expert_index (`torch.LongTensor` of shape `(batch_size, sequence_length, top_k)`): chosen experts.
        expert_weight (`torch.Tensor` of shape `(batch_size, sequence_length, top_k)`): mixing weights.
    """

    router_logits: torch.Tensor
    expert_index: torch.LongTensor
    expert_weight: torch.Tensor
    _one_hot: torch.Tensor | None = None

    def expert_one_hot(self, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot of each copy's expert, `(batch_size, sequence_length, top_k, num_experts)`, built once per pass
        and shared by the mixture's projections."""
        if self._one_hot is None or self._one_hot.dtype != dtype:
            self._one_hot = F.one_hot(self.expert_index, num_experts).to(dtype)
        return self._one_hot


class CoMiGSRoutingState:
    """Shared between a model and its mixtures: the forced expert (if any) and the routings recorded this pass."""

    def __init__(self):
        self.forced_expert: int | None = None
        # fixed per-expert weights of uniform mixing (FD-LoRA's fusion); None: 1/E each
        self.expert_weights: list[float] | None = None
        self.records: list[CoMiGSRouting] = []
        # decoder blocks' outputs of this pass, kept only while the reference balancing loss needs them
        self.block_outputs: list[torch.Tensor] | None = None


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
        router_logits = F.linear(hidden_states.to(self.weight.dtype), self.weight)  # (B, T, E)
        if forced_expert is not None:
            index = torch.full((*router_logits.shape[:-1], 1), forced_expert, device=router_logits.device)
            weight = torch.ones(index.shape, dtype=hidden_states.dtype, device=router_logits.device)
            return CoMiGSRouting(router_logits, index, weight)
        if self.mixing == "uniform":
            num_experts = self.weight.shape[0]
            index = torch.arange(num_experts, device=router_logits.device).expand(*router_logits.shape[:-1], -1)
            if expert_weights is None:
                weight = torch.full(index.shape, 1.0 / num_experts, dtype=hidden_states.dtype, device=index.device)
            else:  # fixed fusion weights, the same for every token
                fixed = torch.tensor(expert_weights, dtype=hidden_states.dtype, device=index.device)  # (E,)
                weight = fixed.expand(index.shape)
            return CoMiGSRouting(router_logits.detach(), index, weight)  # (B, T, E) copies
        # routing decisions in float32: bf16 logits make near-ties flip and softmax lose mass
        logits32 = router_logits.float()
        top_logits, index = logits32.topk(self.top_k, dim=-1)  # (B, T, K)
        if self.top_k == 1:
            weight = logits32.softmax(dim=-1).gather(-1, index)
        else:
            weight = top_logits.softmax(dim=-1)
        return CoMiGSRouting(router_logits, index, weight.to(hidden_states.dtype))


class CoMiGSLoraLinear(nn.Module):
    """A frozen projection (`nn.Linear` or GPT-2's `Conv1D`) plus LoRA adapters kept in PEFT's layout.

    `lora_A[name]` is `nn.Linear(in, R)` and `lora_B[name]` is `nn.Linear(R, out)`, keyed by expert name, exactly as a
    PEFT `LoraLayer` keys them by adapter name. `role` decides how the mixture's routing is applied:

    * `"input"`: consumes the block's hidden states, returns one output per chosen expert, `(..., K, out)`;
    * `"output"`: consumes `(..., K, in)` and returns the gated sum `(..., out)`;
    * `"shared"`: a plain single-adapter LoRA layer (the optional attention adapter), no routing.
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
        is_conv1d = type(base_layer).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        self.fan_in_fan_out = is_conv1d
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            # as PEFT: nn.Linear and the quantised linears (whose weight holds packed integers) say their features
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = weight.shape if is_conv1d else weight.shape[::-1]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.set_adapters(adapter_names)
        self.routing: CoMiGSRouting | None = None
        self._stacked_cache: tuple | None = None

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

    def _stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # (E*R, in) and (O, E*R); concatenating E small matrices is far cheaper than E separate matmuls
        weights = [a.weight for a in self.lora_A.values()] + [b.weight for b in self.lora_B.values()]
        if torch.is_grad_enabled():
            self._stacked_cache = None
            return torch.cat(weights[: len(self.lora_A)], dim=0), torch.cat(weights[len(self.lora_A) :], dim=1)
        # generation calls this once per token and layer: reuse the concatenation until a weight changes
        # (in-place updates such as optimizer steps or load_state_dict bump the tensors' version counters)
        key = tuple((id(w), w._version) for w in weights)
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            stacked = torch.cat(weights[: len(self.lora_A)], dim=0), torch.cat(weights[len(self.lora_A) :], dim=1)
            self._stacked_cache = (key, stacked)
        return self._stacked_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "shared":
            (name,) = self.lora_A.keys()
            base = self.base_layer(x)
            update = self.lora_B[name](self.lora_A[name](self.lora_dropout(x).to(self.lora_A[name].weight.dtype)))
            return base + (update * self.scaling).to(base.dtype)
        routing = self.routing
        if routing is None:
            raise RuntimeError(f"{self.base_path} is part of a CoMiGS mixture and must be called through it.")
        num_experts = len(self.lora_A)
        lora_A, lora_B = self._stacked_factors()
        # the low-rank path runs in the adapters' dtype (float32 on a half-precision base), the base in its own
        x_lora = self.lora_dropout(x).to(lora_A.dtype)
        # per copy, a one-hot of its expert carrying the LoRA scaling (and, at the output, the gate): (..., K, E, 1).
        # Everything that touches it is of size E*R per token; the wide (..., K, O) tensors see one op each.
        selector = routing.expert_one_hot(num_experts, lora_A.dtype).unsqueeze(-1) * self.scaling
        if self.role == "input":
            codes = F.linear(x_lora, lora_A).unflatten(-1, (num_experts, self.r))  # (..., E, R)
            codes = (selector * codes.unsqueeze(-3)).flatten(-2)  # (..., K, E*R): zero outside each copy's expert
            # the frozen base runs once per token; each copy adds its own expert's update
            base = self.base_layer(x).unsqueeze(-2)
            return F.linear(codes, lora_B).to(base.dtype).add_(base)  # (..., K, O)
        # output projection: x is (..., K, I)
        gate = routing.expert_weight  # (..., K)
        if x.shape[-2] == 1:
            mixed, gate_sum = x.squeeze(-2), gate  # top-1: sum_k g_k x_k / sum_k g_k is the single copy
        else:
            gate_sum = gate.sum(dim=-1, keepdim=True)  # (..., 1), 1 up to rounding
            mixed = ((gate / gate_sum).unsqueeze(-1) * x).sum(dim=-2)  # (..., I); beats einsum's tiny bmm on CPU
        # W(sum_k g_k x_k) + b * sum_k g_k == sum_k g_k (W x_k + b): the base runs once per token
        result = self.base_layer(mixed) * gate_sum  # (..., O)
        codes = F.linear(x_lora, lora_A).unflatten(-1, (num_experts, self.r))  # (..., K, E, R)
        codes = (selector * gate[..., None, None].to(codes.dtype) * codes).sum(dim=-3).flatten(-2)  # (..., E*R)
        return result + F.linear(codes, lora_B).to(result.dtype)  # (..., O)


class CoMiGSRecomputedActivation(nn.Module):
    """An element-wise activation of the MLP, recomputed in backward instead of kept.

    Between the input and output projections the mixture carries K copies of every token, so whatever the activation
    keeps for backward is kept K times. A composite activation such as GPT-2's tanh-GELU (`gelu_new`, a dozen
    element-wise ops) keeps several `(..., K, I)` tensors; recomputing it from its input keeps one, for the price of
    re-running cheap element-wise ops. Only activations that keep several tensors are wrapped
    ([`keeps_several_tensors`]); single-op ones such as SiLU or ReLU keep one already and are left alone.
    """

    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is (..., K, I): with one copy per token (top-1) there is nothing to save by recomputing
        if torch.is_grad_enabled() and x.requires_grad and x.shape[-2] > 1:
            return checkpoint(self.activation, x, use_reentrant=False)
        return self.activation(x)


def keeps_several_tensors(activation: nn.Module) -> bool:
    """Whether autograd keeps more than one tensor for the backward of `activation` (probed on a tiny tensor)."""
    kept = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    probe = torch.linspace(-2, 2, 8, requires_grad=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            activation(probe)
    except Exception:  # not an element-wise function of one tensor: leave it as it is
        return False
    return len(kept) > 1


class CoMiGSMoeMLP(nn.Module):
    """A base MLP turned into a mixture of LoRA experts with a token-level router.

    The wrapped `base_mlp` keeps its own forward; its target projections were replaced by [`CoMiGSLoraLinear`]s which
    read this mixture's routing for the duration of the call.
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
    ):
        super().__init__()
        self.base_mlp = base_mlp
        # wrapped whatever the top-k: clients swapped in later may mix more experts (it recomputes only then)
        for name, child in list(base_mlp.named_children()) if recompute_activation else []:
            is_activation = not isinstance(child, (CoMiGSLoraLinear, nn.Dropout)) and not any(child.parameters())
            if is_activation and keeps_several_tensors(child):
                setattr(base_mlp, name, CoMiGSRecomputedActivation(child))
        # on the base's device, in the adapters' dtype
        weight = projections[0].base_layer.weight
        self.router = CoMiGSRouter(
            hidden_size, num_experts, top_k, device=weight.device, dtype=projections[0].adapter_dtype, mixing=mixing
        )
        # plain list: the projections are registered (and saved) under base_mlp already
        self._projections = projections
        self._state = state

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
        for projection in self._projections:
            projection.routing = routing
        try:
            return self.base_mlp(hidden_states, *args, **kwargs)
        finally:
            for projection in self._projections:
                projection.routing = None
