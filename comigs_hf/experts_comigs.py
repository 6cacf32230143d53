"""Fast layouts of the CoMiGS mixture: what the config's `experts_implementation` picks besides `"eager"`.

`layer_comigs.py` defines the mixture as a loop over experts, each running the whole MLP with its LoRA on the tokens
that chose it, so the frozen base runs K times per token. The layouts here compute the same function with the base
run once per token: the mixture lays out the token/expert pairs the router chose (K per token) and runs the MLP's own
element-wise code on them:

* input projections (e.g. `c_fc`, `gate_proj`/`up_proj`) run the frozen base once on the N tokens, copy each token's
  output to its K pairs and add each pair's low-rank update: output `(..., K, out)`, one row per pair;
* the MLP's own element-wise code (activation, gating) runs unchanged on those rows;
* the output projection (e.g. `c_proj`, `down_proj`) is linear, so the gated sum of the experts' base outputs is the
  base applied once to the gated sum of their inputs; only the low-rank updates are taken per pair.

Two layouts of the pairs (see [`EXPERTS_IMPLEMENTATIONS`]): grouped by expert, so that each expert's LoRA factors
run once on its own rows (torch's grouped matmul where it has one, else a loop over the experts) and the LoRA work
depends on the number of pairs, not of experts; or in token order, where every pair runs every expert's factors as
one plain matmul and a constant mask keeps its own expert's: for a few pairs (decoding), some redundant multiply-adds
cost less than sorting the pairs, gathering factors or a matmul per expert. `"auto"` picks token order for small
routings and grouping otherwise. Between the projections the rows are pairs, not tokens: only element-wise code may
run there, as in every MLP CoMiGS wraps.

A plain `nn.Linear` or `Conv1D` base projection with no hook or patched forward of its own runs here as the one matmul
its forward is; hooks registered on every module (`torch.nn.modules.module.register_module_forward_hook`) see its
call under `experts_implementation="eager"` only.

This file travels with saved models as remote code: it imports only the standard library, torch and transformers.

Legend for shape comments: N tokens, H hidden, I inner (MLP width), E experts, K chosen experts per token (top-k),
P = N*K token/expert pairs, R LoRA rank, O output features.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

# "eager": the definition's loop over experts (`layer_comigs.py`); "token_order" and "grouped": every routing in one
# layout; "grouped_loop": grouped, with a loop over the experts where torch's grouped matmul would run (what a GPU
# runs); "auto": token order for small routings (decoding), grouped otherwise
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "token_order", "grouped", "grouped_loop")

# torch's grouped matmul, for pairs grouped by expert (see `_use_grouped_mm`); without it, a loop over the experts
GROUPED_MM = hasattr(F, "grouped_mm")

# Under "auto", a routing's P pairs stay in token order while P * E * R is at most this, else they are grouped by
# expert. In token order every pair runs every expert's factors and a mask keeps its own expert's: P E R (in + out)
# multiply-adds where grouping spends P R (in + out), but no sort, no host sync and no matmul per expert. One forward
# of the benchmark's GPT-2-shaped base on 2 CPU cores takes 0.69x grouped's time at P E R = 1024 and 0.87-0.92x at 4096
# (rank 8, 4 or 16 experts); at rank 64 and 8192, 1.14x. Both layouts compute the same function.
TOKEN_ORDER_MAX_WORK = 4096


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


def _called_plainly(layer: nn.Module) -> bool:
    """Whether calling `layer` would run its class's `forward` alone: no forward patched onto the instance (as
    accelerate's hooks do) and no hook of its own."""
    return not (
        "forward" in layer.__dict__
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
    )


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
        grouped_mm (`bool`): whether torch's grouped matmul may run the experts' factors (else a loop over them).
    """

    token: torch.LongTensor
    weight: torch.Tensor
    counts: list[int]
    inverse: torch.LongTensor | None = None
    grouped_mm: bool = True

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


class CoMiGSPairs:
    """One mixture call's token/expert pairs as its projections lay them out, built once per call and shared by the
    projections (which have one rank): the routing, its grouping by expert (or `None`: token order), each pair's own
    expert's codes for token order, and the rows the input projections share."""

    __slots__ = ("routing", "implementation", "_dispatch", "_own_codes", "shared_rows")

    def __init__(self, routing, implementation: str):
        self.routing = routing
        self.implementation = implementation
        self._dispatch: CoMiGSDispatch | None = None
        self._own_codes: torch.Tensor | None = None
        # (hidden states, their rows in layout order) of the call's first input projection, for the next ones
        self.shared_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def grouped(self, rank: int) -> CoMiGSDispatch | None:
        """The pairs grouped by expert, or `None` for a routing that stays in token order."""
        routing, implementation = self.routing, self.implementation
        if self._dispatch is None and implementation != "token_order":
            work = routing.expert_index.numel() * routing.router_logits.shape[-1] * rank
            if implementation != "auto" or work > TOKEN_ORDER_MAX_WORK:
                self._dispatch = self._group_pairs(grouped_mm=implementation != "grouped_loop")
        return self._dispatch

    def own_codes(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """`(P, E*R)`, pairs in token order: each pair's row keeps its own expert's `R` codes among every expert's."""
        if self._own_codes is None:
            index = self.routing.expert_index
            blocks = _expert_blocks(self.routing.router_logits.shape[-1], rank, index.device, dtype)
            self._own_codes = blocks.index_select(0, index.reshape(-1))
        return self._own_codes

    def _group_pairs(self, grouped_mm: bool) -> CoMiGSDispatch:
        routing = self.routing
        top_k, num_experts = routing.expert_index.shape[-1], routing.router_logits.shape[-1]
        expert = routing.expert_index.reshape(-1)  # (P,) token-major: pair n*K + k
        order = expert.argsort(stable=True)  # (P,) pairs grouped by expert, in token order within each
        counts = torch.bincount(expert, minlength=num_experts).tolist()
        token = torch.div(order, top_k, rounding_mode="floor")
        if top_k > 1:
            return CoMiGSDispatch(token, routing.normalized_weight().reshape(-1)[order], counts, grouped_mm=grouped_mm)
        weight = torch.ones(order.shape, dtype=routing.expert_weight.dtype, device=order.device)  # a token's one pair
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(order.shape[0], device=order.device))
        return CoMiGSDispatch(token, weight, counts, inverse, grouped_mm=grouped_mm)


def paired_experts_forward(mixture, routing, hidden_states: torch.Tensor, implementation: str, *args, **kwargs):
    """The mixture's output under `routing` in a fast layout: its base MLP runs once, its projections following the
    pairs (see [`CoMiGSPairProjection`])."""
    active = mixture._active
    active.pairs = CoMiGSPairs(routing, implementation)
    try:
        return mixture.base_mlp(hidden_states, *args, **kwargs)
    finally:  # nothing outlives the call (rows kept in inference would pile up over the layers)
        active.pairs = None


class CoMiGSPairProjection:
    """The pair layouts of a mixture projection (`layer_comigs.CoMiGSLoraLinear`): an input projection turns tokens
    into one row per token/expert pair, an output projection takes each token's gated sum of its pairs."""

    def pair_forward(self, x: torch.Tensor, pairs: CoMiGSPairs) -> torch.Tensor:
        if self.role == "input":
            return self._input_forward(x, pairs)
        return self._output_forward(x, pairs)

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
        if plan.grouped_mm and _use_grouped_mm(rows, self.r, self.out_features):  # one kernel per factor
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
        kind = type(layer)  # exact classes only: a quantised or FSDP-wrapped subclass runs its own call
        if kind not in (nn.Linear, Conv1D) or not _called_plainly(layer):
            return layer(x)
        if kind is nn.Linear:
            return F.linear(x, layer.weight, layer.bias)
        return torch.addmm(layer.bias, x, layer.weight)  # Conv1D stores (in, out)

    def _lora_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the low-rank path runs in the adapters' dtype (float32 on a half-precision base), the base in its own
        if isinstance(self.lora_dropout, nn.Dropout):
            x = self.lora_dropout(x)
        return _as(x, dtype)

    def _input_forward(self, x: torch.Tensor, pairs: CoMiGSPairs) -> torch.Tensor:
        """x `(..., H)` -> one row per pair `(..., K, O)`: the base once per token, copied to its pairs, plus each
        pair's own expert's update."""
        routing = pairs.routing
        hidden_states, lead, top_k = x, x.shape[:-1], routing.expert_index.shape[-1]
        x = x.reshape(-1, x.shape[-1])  # (N, H)
        plan = pairs.grouped(self.r)
        if plan is None:  # a few pairs in token order: every expert's factors on every token, masked to its pairs'
            base = self._base(x)  # (N, O)
            lora_A, lora_B = self._stacked_factors()  # (E*R, H), (E*R, O)
            codes = F.linear(self._lora_input(x, lora_A.dtype), lora_A)  # (N, E*R)
            if x.shape[0] > 1:  # a row per pair (one token's row broadcasts)
                codes, base = codes.repeat_interleave(top_k, dim=0), base.repeat_interleave(top_k, dim=0)
            # (P, O): each pair's own expert's codes through its B
            out = self._add_update(base, codes * pairs.own_codes(self.r, lora_A.dtype), lora_B)
        elif top_k == 1:  # a token's one pair: the base runs on the rows in layout order, nothing copied after it
            rows = self._shared_rows(pairs, hidden_states, x.dtype, lambda: plan.to_layout(x))  # (N, H)
            out = self._grouped_updates(self._lora_input(rows, self.lora_dtype), plan, self.scaling, self._base(rows))
        else:
            rows = self._shared_rows(
                pairs,
                hidden_states,
                self.lora_dtype,
                lambda: self._lora_input(x, self.lora_dtype).index_select(0, plan.token),  # (P, H)
                # LoRA dropout draws its own mask in every projection, as in PEFT
                share=not isinstance(self.lora_dropout, nn.Dropout),
            )
            base = self._base(x).index_select(0, plan.token)  # (P, O): each token's base copied to its pairs
            out = self._grouped_updates(rows, plan, self.scaling, base=base)  # (P, O)
        # (..., K, O): one row per pair, in layout order, shaped as the tokens for the MLP's element-wise code
        return out.view(*lead, top_k, out.shape[-1])

    @staticmethod
    def _shared_rows(
        pairs: CoMiGSPairs,
        hidden_states: torch.Tensor,
        dtype: torch.dtype,
        make: Callable[[], torch.Tensor],
        share: bool = True,
    ) -> torch.Tensor:
        """`make()`, the rows of `hidden_states` in layout order as `dtype`, made once per mixture call: the input
        projections that read the same hidden states (Llama's `gate_proj` and `up_proj`) share one gather, one
        scatter back in backward, and one copy kept for backward."""
        if not share:
            return make()
        shared = pairs.shared_rows
        if shared is not None and shared[0] is hidden_states and shared[1].dtype == dtype:
            return shared[1]
        rows = make()
        pairs.shared_rows = (hidden_states, rows)
        return rows

    def _output_forward(self, x: torch.Tensor, pairs: CoMiGSPairs) -> torch.Tensor:
        """x, one row per pair `(..., K, I)` -> the gated sum over each token's pairs `(..., O)`."""
        routing = pairs.routing
        lead, top_k = x.shape[:-2], x.shape[-2]
        rows = x.reshape(-1, x.shape[-1])  # (P, I)
        plan = pairs.grouped(self.r)
        if plan is None:
            # a few pairs in token order: each token's mix of its pairs through the base once, as below, and every
            # expert's factors on every pair, masked to its own expert's
            tokens = rows.shape[0] // top_k
            lora_A, lora_B = self._stacked_factors()  # (E*R, I), (E*R, O)
            weight = _as(routing.normalized_weight(), lora_A.dtype).view(tokens, 1, top_k)  # (N, 1, K)
            mixed = torch.bmm(_as(weight, rows.dtype), rows.view(tokens, top_k, -1))  # (N, 1, I)
            result = self._base(mixed.view(tokens, -1))  # (N, O)
            codes = F.linear(self._lora_input(rows, lora_A.dtype), lora_A) * pairs.own_codes(self.r, lora_A.dtype)
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
# same function as torch's fused kernel, which the pair layouts run on their K rows per token instead
_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")


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


class CoMiGSPairActivation(nn.Module):
    """An element-wise activation of the MLP, run on the pairs' rows `(..., K, I)` of a fast layout by a cheaper
    equivalent, and as it is everywhere else (the eager loop).

    Between the input and output projections a fast layout carries K pairs of every token, so whatever the
    activation keeps for backward is kept K times. A tanh-approximation GELU written as a dozen ops (GPT-2's
    `gelu_new`) runs as torch's fused kernel, which keeps one tensor; another activation that keeps several (a
    composite such as quick-GELU) is recomputed in backward from its input when `recompute` is set, for the price of
    re-running cheap element-wise ops.
    """

    def __init__(self, activation: nn.Module, active, recompute: bool):
        super().__init__()
        self.activation = activation
        self._active = active  # the mixture's `layer_comigs.CoMiGSActiveRouting`
        self.fused_tanh_gelu = type(activation).__name__ in _TANH_GELUS
        self.recompute = recompute and not self.fused_tanh_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._active.pairs is None:
            return self.activation(x)
        if self.fused_tanh_gelu:
            return F.gelu(x, approximate="tanh")
        # x is (..., K, I): with one copy per token (top-1) there is nothing to save by recomputing
        if self.recompute and torch.is_grad_enabled() and x.requires_grad and x.shape[-2] > 1:
            return checkpoint(self.activation, x, use_reentrant=False)
        return self.activation(x)


def wrap_pair_activations(base_mlp: nn.Module, active, recompute_activation: bool) -> None:
    """Wrap the activations of `base_mlp` that the pair layouts run more cheaply (see [`CoMiGSPairActivation`]):
    tanh-approximation GELUs, and with `recompute_activation` those that keep several tensors for backward. Wrapped
    whatever the top-k: a client swapped in later may mix more experts."""
    for name, child in list(base_mlp.named_children()):
        if isinstance(child, (CoMiGSPairProjection, nn.Dropout)) or any(child.parameters()):
            continue
        fused = type(child).__name__ in _TANH_GELUS
        if fused or (recompute_activation and keeps_several_tensors(child)):
            setattr(base_mlp, name, CoMiGSPairActivation(child, active, recompute_activation))


__all__ = [
    "EXPERTS_IMPLEMENTATIONS",
    "CoMiGSDispatch",
    "CoMiGSPairActivation",
    "CoMiGSPairProjection",
    "CoMiGSPairs",
    "keeps_several_tensors",
    "paired_experts_forward",
    "wrap_pair_activations",
]
