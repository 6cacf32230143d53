"""The CoMiGS reference code's mixture, written from its description, as the yardstick of `comigs_hf`'s own.

In the reference implementation (epfml/CoMiGS, nanoGPT-based) every expert is a full copy of the MLP with its own
LoRA; a token router picks the top-k experts, and for each expert the tokens that chose it are found with
`torch.where`, run through that expert's MLP and accumulated into the output with their mixing weight. The base MLP
therefore runs K times per token and the loop runs once per expert.

`use_reference_loop(model)` swaps every mixture of a `CoMiGSForCausalLM` for that loop over the same parameters (the
router, the frozen base and each expert's LoRA factors), so the two compute the same function and can be timed, and
their outputs and gradients compared, on one model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from comigs_hf import CoMiGSForCausalLM
from comigs_hf.layer_comigs import CoMiGSLoraLinear, CoMiGSMoeMLP, CoMiGSRecomputedActivation, CoMiGSTanhGELU


class ExpertLinear(nn.Module):
    """One expert's view of a mixture projection: the frozen layer plus that expert's LoRA, as a plain LoRA layer."""

    def __init__(self, projection: CoMiGSLoraLinear, name: str):
        super().__init__()
        self.projection, self.name = projection, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.projection
        lora_A, lora_B = projection.lora_A[self.name], projection.lora_B[self.name]
        update = lora_B(lora_A(projection.lora_dropout(x).to(lora_A.weight.dtype))) * projection.scaling
        base = projection.base_layer(x)
        return base + update.to(base.dtype)


def _expert_mlp(base_mlp: nn.Module, name: str) -> nn.Module:
    """A shallow copy of the MLP whose projections apply only expert `name`'s LoRA, with the base's own activation."""
    mlp = copy.copy(base_mlp)
    mlp._modules = dict(base_mlp._modules)
    for attribute, child in base_mlp.named_children():
        if isinstance(child, CoMiGSLoraLinear):
            mlp._modules[attribute] = ExpertLinear(child, name)
        elif isinstance(child, CoMiGSRecomputedActivation):
            mlp._modules[attribute] = child.activation
        elif isinstance(child, CoMiGSTanhGELU):
            from transformers.activations import NewGELUActivation

            mlp._modules[attribute] = NewGELUActivation()
    return mlp


class ReferenceLoopMLP(nn.Module):
    """The reference's per-expert loop over one mixture's parameters."""

    def __init__(self, mixture: CoMiGSMoeMLP, expert_names: list[str]):
        super().__init__()
        self.mixture = mixture
        self.experts = [_expert_mlp(mixture.base_mlp, name) for name in expert_names]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mixture = self.mixture
        state = mixture._state
        routing = mixture.router(hidden_states, state.forced_expert, state.expert_weights)
        state.records.append(routing)  # the balancing loss reads it, as for the mixture itself
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
        selected = routing.expert_index.reshape(x.shape[0], -1)  # (N, K)
        weights = routing.expert_weight.reshape(x.shape[0], -1)  # (N, K)
        results = None
        for index, expert in enumerate(self.experts):
            rows, nth = torch.where(selected == index)
            if rows.numel() == 0:
                continue
            out = weights[rows, nth, None] * expert(x[rows], *args, **kwargs)
            if results is None:
                results = out.new_zeros(x.shape[0], out.shape[-1])
            results[rows] += out
        return results.view(*hidden_states.shape[:-1], results.shape[-1])


def use_reference_loop(model: CoMiGSForCausalLM) -> CoMiGSForCausalLM:
    """Swap every mixture of `model` (in place) for the reference's per-expert loop over the same parameters."""
    names = model.config.expert_names
    for path, module in list(model.named_modules()):
        if isinstance(module, CoMiGSMoeMLP):
            model.set_submodule(path, ReferenceLoopMLP(module, names))
    return model
