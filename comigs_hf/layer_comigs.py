"""CoMiGS layers: the token router, LoRA-carrying projections and the mixture-of-experts MLP.

Every expert is the whole base MLP with its own LoRA adapter on each target projection. Instead of running the MLP
once per expert, the mixture lays out the token/expert pairs the router chose (K per token) and runs the MLP's own
element-wise code on them:

* input projections (e.g. `c_fc`, `gate_proj`/`up_proj`) run the frozen base once on the N tokens, copy each token's
  output to its K pairs and add each pair's low-rank update: output `(..., K, out)`, one row per pair;
* the MLP's own element-wise code (activation, gating) runs unchanged on those rows;
* the output projection (e.g. `c_proj`, `down_proj`) is linear, so the gated sum of the experts' base outputs is the
  base applied once to the gated sum of their inputs; only the low-rank updates are taken per pair.

The frozen base weights therefore run over N tokens exactly as in a single-LoRA model. The pairs are laid out by the
routing's [`CoMiGSDispatch`]: grouped by expert for training-sized batches, so that each expert's LoRA factors run
once on its own rows (torch's grouped matmul where it has one, else a loop over the experts) and the LoRA work
depends on the number of pairs, not of experts; in token order for decoding and other small calls, where every pair
runs every expert's factors as one plain matmul and a constant mask keeps its own expert's: for a few pairs, some
redundant multiply-adds cost less than sorting the pairs, gathering factors or a matmul per expert. Between the
projections the rows are pairs, not tokens: only element-wise code may run there, as in every MLP CoMiGS wraps.

This file travels with saved models as remote code: it imports only the standard library, torch and transformers.

Legend for shape comments: B batch, T tokens, N = B*T, H hidden, I inner (MLP width), E experts, K chosen experts per
token (top-k), P = N*K token/expert pairs, R LoRA rank, O output features.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to` that costs nothing when the dtype already matches (decoding calls it per token and layer)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _use_grouped_mm(rows: torch.Tensor, rank: int, out_features: int) -> bool:
    # torch >= 2.9's grouped matmul, on CPU (its CUDA kernels take bfloat16 on recent GPUs only), whose operands' rows
    # must be whole multiples of 16 bytes (a rank of 6 in float32 is not); else the loop
    widths = (rows.shape[-1], rank, out_features)
    return (
        GROUPED_MM
        and rows.device.type == "cpu"
        and rows.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and all(width * rows.element_size() % 16 == 0 for width in widths)
    )


# the registries of hooks on every module that `nn.Module.__call__` consults; a torch without one of them gets no
# shortcut past module calls
_GLOBAL_HOOKS = [
    getattr(torch_module, f"_global_{kind}", None)
    for kind in ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
]


def _called_plainly(layer: nn.Module) -> bool:
    """Whether calling `layer` would run its class's `forward` alone: no forward patched onto the instance (as
    accelerate's hooks do), and `nn.Module.__call__`'s own test, no hook on it or on every module. (Under
    `torch.jit.trace` the call would only add the module's name to the trace's scopes.)"""
    return not (
        "forward" in layer.__dict__
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or None in _GLOBAL_HOOKS
        or any(_GLOBAL_HOOKS)
    )


# torch's grouped matmul, for pairs grouped by expert (see `_use_grouped_mm`); False: a loop over the experts
GROUPED_MM = hasattr(F, "grouped_mm")

# A routing's P pairs stay in token order while P * E * R is at most this, else they are grouped by expert. In token
# order every pair runs every expert's factors and a mask keeps its own expert's: P E R (in + out) multiply-adds
# where grouping spends P R (in + out), but no sort, no host sync and no matmul per expert. One forward of the
# benchmark's GPT-2-shaped base on 2 CPU cores takes 0.69x grouped's time at P E R = 1024 and 0.87-0.92x at 4096 (rank
# 8, 4 or 16 experts); at rank 64 and 8192, 1.14x. Both layouts compute the same function.
TOKEN_ORDER_MAX_WORK = 4096


@functools.lru_cache(maxsize=32)
def _expert_blocks(num_experts: int, rank: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`(E, E*R)`: row `e` keeps expert `e`'s `R` codes among every expert's. Constant for a shape, built once, and
    never an inference tensor (a cached mask first built under `torch.inference_mode` could not be saved for a later
    backward)."""
    with torch.inference_mode(False):
        return torch.eye(num_experts, device=device, dtype=dtype).repeat_interleave(rank, dim=1)


class _PermuteRows(torch.autograd.Function):
    """`x.index_select(0, order)` for a permutation `order` of the rows: its backward is the inverse permutation's
    gather, where `index_select`'s would zero-fill a buffer and scatter-add into it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.LongTensor, inverse: torch.LongTensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass
class CoMiGSDispatch:
    """The token/expert pairs of one routing grouped by expert, as a mixture's projections lay them out.

    Attributes:
        token (`torch.LongTensor` of shape `(P,)`): the token of each pair, pairs grouped by expert (in token order
            within an expert).
        weight (`torch.Tensor` of shape `(P,)`): each pair's mixing weight divided by its token's total weight.
        counts (`list[int]`): the number of pairs of each expert; its rows follow the previous expert's.
        inverse (`torch.LongTensor` of shape `(N,)`, *optional*): with top-1, the row of each token.
    """

    token: torch.LongTensor
    weight: torch.Tensor
    counts: list[int]
    inverse: torch.LongTensor | None = None

    def to_layout(self, x: torch.Tensor) -> torch.Tensor:
        """With top-1, the tokens' rows `(N, ...)` in layout order (grouped by expert)."""
        return _PermuteRows.apply(x, self.token, self.inverse)

    def to_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        """With top-1, rows in layout order `(N, ...)` back in token order."""
        return _PermuteRows.apply(rows, self.inverse, self.token)

    def offsets(self, device: torch.device) -> torch.Tensor:
        """Where each expert's rows end, `(E,)` int32, as `torch.nn.functional.grouped_mm` takes them."""
        ends = list(itertools.accumulate(self.counts))
        return torch.tensor(ends, dtype=torch.int32, device=device)

    def token_rows(self, width: int) -> torch.LongTensor:
        """`token` as a `(P, width)` index for `scatter_add`/`gather` over rows (an expanded view, no copy)."""
        return self.token.unsqueeze(-1).expand(-1, width)


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
    _dispatch: CoMiGSDispatch | None = None
    _own_codes: torch.Tensor | None = None

    def grouped_pairs(self, rank: int) -> CoMiGSDispatch | None:
        """The pairs grouped by expert (built once per pass, shared by the mixture's projections, which have one
        `rank`), or `None` for a routing small enough to stay in token order (see `TOKEN_ORDER_MAX_WORK`)."""
        num_experts = self.router_logits.shape[-1]
        if self._dispatch is None and self.expert_index.numel() * num_experts * rank > TOKEN_ORDER_MAX_WORK:
            self._dispatch = self._group_pairs()
        return self._dispatch

    def own_codes(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """`(P, E*R)`, pairs in token order: each pair's row keeps its own expert's `R` codes among every expert's
        (built once per pass, shared by the mixture's projections)."""
        if self._own_codes is None:
            blocks = _expert_blocks(self.router_logits.shape[-1], rank, self.expert_index.device, dtype)
            self._own_codes = blocks.index_select(0, self.expert_index.reshape(-1))
        return self._own_codes

    def normalized_weight(self) -> torch.Tensor:
        """`expert_weight` divided by each token's total, `(batch_size, sequence_length, top_k)`."""
        if self.sums_to_one:
            return self.expert_weight
        return self.expert_weight / self.expert_weight.sum(dim=-1, keepdim=True)

    def _group_pairs(self) -> CoMiGSDispatch:
        top_k, num_experts = self.expert_index.shape[-1], self.router_logits.shape[-1]
        expert = self.expert_index.reshape(-1)  # (P,) token-major: pair n*K + k
        order = expert.argsort(stable=True)  # (P,) pairs grouped by expert, in token order within each
        counts = torch.bincount(expert, minlength=num_experts).tolist()
        token = torch.div(order, top_k, rounding_mode="floor")
        if top_k > 1:
            return CoMiGSDispatch(token, self.normalized_weight().reshape(-1)[order], counts)
        weight = torch.ones(order.shape, dtype=self.expert_weight.dtype, device=order.device)  # a token's one pair
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
        return CoMiGSDispatch(token, weight, counts, inverse)


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
    """The routing a mixture's projections follow during its call (a plain object: setting it per call costs
    nothing, unlike an `nn.Module` attribute), and the rows its input projections share during that call."""

    __slots__ = ("routing", "shared_rows")

    def __init__(self):
        self.routing: CoMiGSRouting | None = None
        # (hidden states, their rows in layout order) of the call's first input projection, for the next ones
        self.shared_rows: tuple[torch.Tensor, torch.Tensor] | None = None


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


class CoMiGSLoraLinear(nn.Module):
    """A frozen projection (`nn.Linear` or GPT-2's `Conv1D`) plus LoRA adapters kept in PEFT's layout.

    `lora_A[name]` is `nn.Linear(in, R)` and `lora_B[name]` is `nn.Linear(R, out)`, keyed by expert name, exactly as a
    PEFT `LoraLayer` keys them by adapter name. `role` decides how the mixture's routing is applied:

    * `"input"`: consumes the block's hidden states, returns one row per token/expert pair, `(..., K, out)`;
    * `"output"`: consumes those rows `(..., K, in)` and returns each token's gated sum `(..., out)`;
    * `"shared"`: a plain single-adapter LoRA layer (the optional attention adapter), no routing.

    The mixture hands its projections their routing through `active` for the duration of its call.
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
        # the base's own matmul, for `_base`: exact classes only (a quantised or FSDP-wrapped subclass runs its call)
        self._base_matmul = {nn.Linear: "linear", Conv1D: "conv1d"}.get(type(base_layer))
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            # as PEFT: nn.Linear and the quantised linears (whose weight holds packed integers) say their features
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            self.in_features, self.out_features = weight.shape if is_conv1d else weight.shape[::-1]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._has_dropout = dropout > 0
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

    def _stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's factors stacked, `A` `(E*R, in)` and `B` transposed `(E*R, O)`: once per `generate()`
        call, whose weights do not change while it runs, else at every call, so that nothing can go stale whatever
        changed the weights (a cache keyed on version counters misses `param.data.copy_(...)`)."""
        cache = self.routing_state.stacked_factors if self.routing_state is not None else None
        stacks = cache.get(self) if cache is not None else None
        if stacks is None:
            stacks = (
                torch.cat([a.weight for a in self.lora_A.values()]),
                torch.cat([b.weight.T for b in self.lora_B.values()]),
            )
            if cache is not None:
                cache[self] = stacks
        return stacks

    def _add_update(self, base: torch.Tensor, codes: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """`base + scaling * codes @ lora_B`, one fused matmul where the dtypes agree (`base` may broadcast)."""
        if base.dtype == codes.dtype:
            return torch.addmm(base, codes, lora_B, alpha=self.scaling)
        return base + _as(torch.mm(codes, lora_B) * self.scaling, base.dtype)

    def _grouped_updates(
        self,
        rows: torch.Tensor,
        plan: CoMiGSDispatch,
        scale: torch.Tensor | float,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`B_e A_e x * scale` for every pair `(P, in)` grouped by expert, plus `base` `(P, O)` when given: each
        expert's factors run once, on its own rows, and an expert no pair chose runs nothing."""
        if _use_grouped_mm(rows, self.r, self.out_features):  # one kernel per factor for all experts
            offsets = plan.offsets(rows.device)
            lora_A = torch.stack([a.weight for a in self.lora_A.values()]).transpose(1, 2)  # (E, in, R)
            codes = F.grouped_mm(rows, lora_A, offs=offsets) * scale  # (P, R)
            lora_B = torch.stack([b.weight for b in self.lora_B.values()]).transpose(1, 2)  # (E, R, O)
            update = F.grouped_mm(codes, lora_B, offs=offsets)  # (P, O)
            return update if base is None else base + _as(update, base.dtype)
        # a loop over the experts, with one `split` and one `cat`: autograd then hands each expert's rows their
        # gradient without a full-size copy per expert
        scales = scale.split(plan.counts) if isinstance(scale, torch.Tensor) else [scale] * len(plan.counts)
        # the base rows ride in the second matmul's accumulator when dtypes allow (one pass over (P, O) fewer)
        fused = base is not None and base.dtype == rows.dtype
        bases = base.split(plan.counts) if fused else [None] * len(plan.counts)
        updates = []
        for x, row_scale, base_rows, a, b, count in zip(
            rows.split(plan.counts), scales, bases, self.lora_A.values(), self.lora_B.values(), plan.counts
        ):
            if not count:
                continue
            codes = F.linear(x, a.weight)  # (n_e, R)
            if base_rows is not None and not isinstance(row_scale, torch.Tensor):  # one fused op: base + s * B codes
                updates.append(base_rows.addmm(codes, b.weight.T, alpha=row_scale))
            elif base_rows is not None:
                updates.append(base_rows.addmm(codes * row_scale, b.weight.T))
            else:
                updates.append(F.linear(codes * row_scale, b.weight))  # (n_e, O)
        update = torch.cat(updates)  # (P, O)
        if base is not None and not fused:
            update = base + _as(update, base.dtype)
        return update

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen projection on rows `x` `(n, in)`. A plain `nn.Linear` or `Conv1D` that calling would run alone
        runs as the one matmul its forward is: a module call and its reshapes cost about 8 us per projection on CPU,
        a tenth of a small MLP's decoding step."""
        layer = self.base_layer
        if self._base_matmul is None or not _called_plainly(layer):
            return layer(x)
        if self._base_matmul == "linear":
            return F.linear(x, layer.weight, layer.bias)
        return torch.addmm(layer.bias, x, layer.weight)  # Conv1D stores (in, out)

    def _lora_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the low-rank path runs in the adapters' dtype (float32 on a half-precision base), the base in its own
        if self._has_dropout:
            x = self.lora_dropout(x)
        return _as(x, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "shared":
            (name,) = self.lora_A.keys()
            base = self.base_layer(x)
            update = self.lora_B[name](self.lora_A[name](self.lora_dropout(x).to(self.lora_A[name].weight.dtype)))
            return base + (update * self.scaling).to(base.dtype)
        routing = self.active.routing if self.active is not None else None
        if routing is None:
            raise RuntimeError(f"{self.base_path} is part of a CoMiGS mixture and must be called through it.")
        if self.role == "input":
            return self._input_forward(x, routing)
        return self._output_forward(x, routing)

    def _input_forward(self, x: torch.Tensor, routing: CoMiGSRouting) -> torch.Tensor:
        """x `(..., H)` -> one row per pair `(..., K, O)`: the base once per token, copied to its pairs, plus each
        pair's own expert's update."""
        hidden_states, lead, top_k = x, x.shape[:-1], routing.expert_index.shape[-1]
        x = x.reshape(-1, x.shape[-1])  # (N, H)
        plan = routing.grouped_pairs(self.r)
        if plan is None:  # a few pairs in token order: every expert's factors on every token, masked to its pairs'
            base = self._base(x)  # (N, O)
            lora_A, lora_B = self._stacked_factors()  # (E*R, H), (E*R, O)
            codes = F.linear(self._lora_input(x, lora_A.dtype), lora_A)  # (N, E*R)
            if x.shape[0] > 1:  # a row per pair (one token's row broadcasts)
                codes, base = codes.repeat_interleave(top_k, dim=0), base.repeat_interleave(top_k, dim=0)
            # (P, O): each pair's own expert's codes through its B
            out = self._add_update(base, codes * routing.own_codes(self.r, lora_A.dtype), lora_B)
        elif top_k == 1:  # a token's one pair: the base runs on the rows in layout order, nothing copied after it
            rows = self._shared_rows(hidden_states, x.dtype, lambda: plan.to_layout(x))  # (N, H)
            out = self._grouped_updates(self._lora_input(rows, self.lora_dtype), plan, self.scaling, self._base(rows))
        else:
            rows = self._shared_rows(
                hidden_states,
                self.lora_dtype,
                lambda: self._lora_input(x, self.lora_dtype).index_select(0, plan.token),  # (P, H)
                share=not self._has_dropout,  # LoRA dropout draws its own mask in every projection, as in PEFT
            )
            base = self._base(x).index_select(0, plan.token)  # (P, O): each token's base copied to its pairs
            out = self._grouped_updates(rows, plan, self.scaling, base=base)  # (P, O)
        # (..., K, O): one row per pair, in layout order, shaped as the tokens for the MLP's element-wise code
        return out.view(*lead, top_k, out.shape[-1])

    def _shared_rows(
        self, hidden_states: torch.Tensor, dtype: torch.dtype, make: Callable[[], torch.Tensor], share: bool = True
    ) -> torch.Tensor:
        """`make()`, the rows of `hidden_states` in layout order as `dtype`, made once per mixture call: the input
        projections that read the same hidden states (Llama's `gate_proj` and `up_proj`) share one gather, one
        scatter back in backward, and one copy kept for backward."""
        if not share:
            return make()
        shared = self.active.shared_rows
        if shared is not None and shared[0] is hidden_states and shared[1].dtype == dtype:
            return shared[1]
        rows = make()
        self.active.shared_rows = (hidden_states, rows)
        return rows

    def _output_forward(self, x: torch.Tensor, routing: CoMiGSRouting) -> torch.Tensor:
        """x, one row per pair `(..., K, I)` -> the gated sum over each token's pairs `(..., O)`."""
        lead, top_k = x.shape[:-2], x.shape[-2]
        rows = x.reshape(-1, x.shape[-1])  # (P, I)
        plan = routing.grouped_pairs(self.r)
        if plan is None:
            # a few pairs in token order: each token's mix of its pairs through the base once, as below, and every
            # expert's factors on every pair, masked to its own expert's
            tokens = rows.shape[0] // top_k
            lora_A, lora_B = self._stacked_factors()  # (E*R, I), (E*R, O)
            weight = _as(routing.normalized_weight(), lora_A.dtype).view(tokens, 1, top_k)  # (N, 1, K)
            mixed = torch.bmm(_as(weight, rows.dtype), rows.view(tokens, top_k, -1))  # (N, 1, I)
            result = self._base(mixed.view(tokens, -1))  # (N, O)
            codes = F.linear(self._lora_input(rows, lora_A.dtype), lora_A) * routing.own_codes(self.r, lora_A.dtype)
            codes = torch.bmm(weight, codes.view(tokens, top_k, -1))  # (N, 1, E*R): each token's mix of its pairs'
            result = self._add_update(result, codes.view(tokens, -1), lora_B)
            if not routing.sums_to_one:
                result = result * _as(routing.expert_weight.sum(dim=-1), result.dtype).reshape(-1, 1)
            return result.view(*lead, result.shape[-1])
        # W(sum_k g_k x_k) + b * sum_k g_k == sum_k g_k (W x_k + b): the base runs once per token, on the mix of its
        # pairs under weights summing to 1, and the output is scaled by their sum where it is not 1 by design
        weight = _as(plan.weight, rows.dtype).unsqueeze(-1)  # (P, 1)
        if top_k == 1:
            mixed = rows  # each token's single pair: the base runs on the rows, in layout order
        else:  # scatter_add keeps nothing for backward (index_add would keep its (P, I) source)
            mixed = rows.new_zeros(rows.shape[0] // top_k, rows.shape[-1])
            mixed = mixed.scatter_add_(0, plan.token_rows(rows.shape[-1]), rows * weight)  # (N, I)
        result = self._base(mixed)
        scale = _as(weight, self.lora_dtype) * self.scaling
        update = _as(self._grouped_updates(self._lora_input(rows, self.lora_dtype), plan, scale), result.dtype)
        if top_k == 1:  # rows are the tokens in layout order: back to token order
            result = plan.to_tokens(result + update)
        else:
            result = result.scatter_add(0, plan.token_rows(result.shape[-1]), update)  # (N, O)
        if not routing.sums_to_one:
            result = result * _as(routing.expert_weight.sum(dim=-1), result.dtype).reshape(-1, 1)
        return result.view(*lead, result.shape[-1])


# transformers' tanh-approximation GELUs written as a dozen element-wise ops (GPT-2's `gelu_new`, `gelu_fast`): the
# same function as torch's fused kernel, which the mixture runs on its K rows per token instead
_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")


class CoMiGSTanhGELU(nn.Module):
    """`0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` as one fused kernel that keeps one tensor for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class CoMiGSRecomputedActivation(nn.Module):
    """An element-wise activation of the MLP, recomputed in backward instead of kept.

    Between the input and output projections the mixture carries K pairs of every token, so whatever the activation
    keeps for backward is kept K times. A composite activation such as quick-GELU keeps several `(..., K, I)`
    tensors; recomputing it from its input keeps one, for the price of re-running cheap element-wise ops. Only
    activations that keep several tensors are wrapped ([`keeps_several_tensors`]); single-op ones such as SiLU, ReLU
    or the fused tanh-GELU that replaces GPT-2's `gelu_new` keep one already and are left alone.
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
        for name, child in list(base_mlp.named_children()):
            if type(child).__name__ in _TANH_GELUS:
                setattr(base_mlp, name, child := CoMiGSTanhGELU())
            # wrapped whatever the top-k: clients swapped in later may mix more experts (it recomputes only then)
            is_activation = not isinstance(child, (CoMiGSLoraLinear, nn.Dropout)) and not any(child.parameters())
            if recompute_activation and is_activation and keeps_several_tensors(child):
                setattr(base_mlp, name, CoMiGSRecomputedActivation(child))
        # on the base's device, in the adapters' dtype
        weight = projections[0].base_layer.weight
        self.router = CoMiGSRouter(
            hidden_size, num_experts, top_k, device=weight.device, dtype=projections[0].adapter_dtype, mixing=mixing
        )
        # plain list: the projections are registered (and saved) under base_mlp already
        self._projections = projections
        self._state = state
        self._active = CoMiGSActiveRouting()
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
        """The base MLP with its projections following `routing` (recorded nowhere)."""
        self._active.routing = routing
        try:
            return self.base_mlp(hidden_states, *args, **kwargs)
        finally:  # nothing outlives the call (rows kept in inference would pile up over the layers)
            self._active.routing = self._active.shared_rows = None
