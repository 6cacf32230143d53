"""CoMiGS: a frozen causal LM whose MLP blocks are mixtures of LoRA generalists and specialists.

This file travels with saved models as remote code: it imports only the standard library, torch, transformers and
its sibling `*_comigs.py` files.

Legend for shape comments: B batch, T tokens, H hidden, E experts, K chosen experts per token (top-k), L layers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import logging

from .checkpoint_comigs import (
    CoMiGSCheckpointMixin,
    check_causal_lm,
)
from .configuration_comigs import (
    KNOWN_ATTENTION_TARGETS,
    KNOWN_MLP_TARGETS,
    ROLES,
    CoMiGSConfig,
    parameter_role,
)
from .experts_comigs import EXPERTS_IMPLEMENTATIONS
from .layer_comigs import (
    CoMiGSLoraLinear,
    CoMiGSMoeMLP,
    CoMiGSRouter,
    CoMiGSRoutingState,
    load_balancing_loss,
    reference_load_balancing_loss,
    routing_statistics,
)

logger = logging.get_logger(__name__)


@dataclass
class CoMiGSCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    Output of [`CoMiGSForCausalLM`]: `MoeCausalLMOutputWithPast` plus routing statistics.

    routing_stats (`list[dict[str, torch.Tensor]]`, *optional*, returned when `output_routing_stats=True`):
        One entry per mixture layer with `tokens` (`torch.LongTensor` of shape `(num_experts,)`: tokens routed to each
        expert) and `weight` (`torch.Tensor` of shape `(num_experts,)`: mean mixing weight each expert receives per
        token, zero where not chosen), over the non-padding tokens.
    """

    routing_stats: list[dict[str, torch.Tensor]] | None = None


def _resolve_targets(names: set[str], candidates: tuple[tuple[str, ...], ...], given: list[str] | None) -> list[str]:
    # A target set applies when every one of its paths exists in at least one block.
    options = (tuple(given),) if given is not None else candidates
    for option in options:
        if all(any(n == t or n.endswith("." + t) for n in names) for t in option):
            return list(option)
    return []


class CoMiGSPreTrainedModel(PreTrainedModel):
    config_class = CoMiGSConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """The mixture's layout, transformers' `experts_implementation` (`from_pretrained(...,
        experts_implementation=...)`, `set_experts_implementation(...)`): one of `EXPERTS_IMPLEMENTATIONS`, `"auto"`
        when none is asked for. Every layout computes the same function (see `experts_comigs.py`)."""
        implementation = "auto" if requested_experts is None else requested_experts
        if implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation={implementation!r} is not a CoMiGS mixture layout; choose one of "
                f"{', '.join(EXPERTS_IMPLEMENTATIONS)}."
            )
        return implementation

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CoMiGSRouter):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
        elif isinstance(module, CoMiGSLoraLinear):
            for name in module.lora_A:
                module.reset_adapter(name)


class CoMiGSForCausalLM(CoMiGSCheckpointMixin, CoMiGSPreTrainedModel, GenerationMixin):
    """A frozen causal LM whose target MLP blocks are mixtures of LoRA experts, one token router per block.

    The base model is held once, under `self.model`, with every parameter frozen; only the experts' LoRA factors and
    the routers train. Use [`~CoMiGSForCausalLM.from_base`] to wrap a pretrained base.
    """

    def __init__(self, config: CoMiGSConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = base_model if base_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        check_causal_lm(self.model)
        self._routing_state = CoMiGSRoutingState()
        self._routing_state.expert_weights = config.expert_weights
        self.mixtures: list[CoMiGSMoeMLP] = []
        self._blocks: list[nn.Module] = []  # the decoder blocks, in execution order
        self._wrap_base()
        if config.upcast_adapters:  # loading a checkpoint in float16/bfloat16 keeps the adapters in float32
            router = config.target_modules[0].rsplit(".", 1)[0] + ".router"  # the mixture replaced the MLP
            self._keep_in_fp32_modules_strict = ["lora_A", "lora_B", router]
        self.post_init()
        # post_init re-initialises modules inside the base with the *base's* `_init_weights` (normal init for every
        # nn.Linear, LoRA B included): restore the LoRA init (zero B) and the router init afterwards.
        self.reset_experts()
        self.freeze_base()

    def freeze_base(self) -> None:
        """Freeze the base model's own parameters and make every expert, attention adapter and router trainable."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(parameter_role(name) != "base")

    def _wrap_base(self) -> None:
        """Replace each target MLP of the base by a [`CoMiGSMoeMLP`] (and attention projections by LoRA layers)."""
        config = self.config
        names = {name for name, _ in self.model.named_modules()}
        targets = _resolve_targets(names, KNOWN_MLP_TARGETS, config.target_modules)
        if not targets:
            searched = [list(t) for t in ((config.target_modules,) if config.target_modules else KNOWN_MLP_TARGETS)]
            raise ValueError(
                f"No expert target modules found in the base model {type(self.model).__name__}: searched for "
                f"{searched}. Pass `target_modules` with the MLP projections of one decoder block in the order the "
                "MLP applies them (the last maps back to the hidden size)."
            )
        config.target_modules = targets
        mlp_suffix = targets[0].rsplit(".", 1)[0]
        if any(t.rsplit(".", 1)[0] != mlp_suffix for t in targets):
            raise ValueError(f"`target_modules` {targets} must all live in the same MLP module.")
        hidden_size = self.model.get_input_embeddings().weight.shape[-1]
        experts = config.expert_names
        # in execution order (h.2 before h.10): the reference balancing loss pairs routers with block outputs
        blocks = sorted(
            {n[: -len(targets[0]) - 1] for n in names if n.endswith("." + targets[0])},
            key=lambda path: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")],
        )
        adapter_dtype = self._adapter_dtype()
        for block in blocks:
            self._blocks.append(self.model.get_submodule(block))
            mlp_path = f"{block}.{mlp_suffix}"
            mlp = self.model.get_submodule(mlp_path)
            projections = []
            for i, target in enumerate(targets):
                attribute = target.rsplit(".", 1)[1]
                layer = CoMiGSLoraLinear(
                    getattr(mlp, attribute),
                    experts,
                    config.lora_r,
                    config.lora_scaling,
                    config.lora_dropout,
                    role="output" if i == len(targets) - 1 else "input",
                    base_path=f"{block}.{target}",
                    dtype=adapter_dtype,
                )
                setattr(mlp, attribute, layer)
                projections.append(layer)
            mixture = CoMiGSMoeMLP(
                mlp,
                projections,
                hidden_size,
                len(experts),
                config.num_experts_per_tok,
                self._routing_state,
                recompute_activation=config.recompute_activation,
                mixing=config.expert_mixing,
                config=config,
            )
            self.model.set_submodule(mlp_path, mixture)
            self.mixtures.append(mixture)
        if config.attention_lora:
            attention = _resolve_targets(names, KNOWN_ATTENTION_TARGETS, config.attention_target_modules)
            if not attention:
                raise ValueError(
                    "`attention_lora=True` but no attention projections found: searched for "
                    f"{[list(t) for t in KNOWN_ATTENTION_TARGETS]}; pass `attention_target_modules`."
                )
            config.attention_target_modules = attention
            for block in blocks:
                for target in attention:
                    path = f"{block}.{target}"
                    layer = CoMiGSLoraLinear(
                        self.model.get_submodule(path),
                        ["attention"],
                        config.attention_rank,
                        config.attention_lora_scaling,
                        config.lora_dropout,
                        role="shared",
                        base_path=path,
                        dtype=adapter_dtype,
                    )
                    self.model.set_submodule(path, layer)

    def _adapter_dtype(self) -> torch.dtype | None:
        """float32 for the adapters and routers on a half-precision base when `upcast_adapters`, else `None` (the
        base's dtype)."""
        base_dtype = self.model.get_input_embeddings().weight.dtype
        if self.config.upcast_adapters and base_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return None

    def _record_block_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._routing_state.block_outputs.append(output[0] if isinstance(output, tuple) else output)

    def lora_layers(self) -> Iterator[CoMiGSLoraLinear]:
        """Every LoRA-carrying projection (expert projections, then the optional attention adapter layers)."""
        return (m for m in self.modules() if isinstance(m, CoMiGSLoraLinear))

    @torch.no_grad()
    def reset_experts(self) -> None:
        """Re-initialise every expert (zero update) and router, as in a freshly built model."""
        for module in self.modules():
            if isinstance(module, (CoMiGSRouter, CoMiGSLoraLinear)):
                self._init_weights(module)

    def set_expert_weights(self, weights: list[float] | None) -> None:
        """Fix the weight of each expert under uniform mixing (FD-LoRA's fusion); `None` restores 1/E each. Saved
        with the config, so a reloaded model mixes the same way.

        Raises:
            `ValueError`: weights without uniform mixing, or not one finite weight per expert.
        """
        weights = [float(w) for w in weights] if weights is not None else None
        config = self.config
        previous, config.expert_weights = config.expert_weights, weights
        try:
            config.validate_experts()
        except ValueError:
            config.expert_weights = previous
            raise
        self._routing_state.expert_weights = weights

    def set_num_specialists(self, num_specialists: int, num_experts_per_tok: int | None = None) -> None:
        """Resize every mixture to `num_specialists` specialists (existing experts are kept, new ones start fresh).

        Routers get new rows for new experts; used to swap clients with different resources through one base.

        Args:
            num_specialists (`int`): the new number of specialists.
            num_experts_per_tok (`int`, *optional*): the new top-k; defaults to the current one.
        """
        config = self.config
        top_k = num_experts_per_tok if num_experts_per_tok is not None else config.num_experts_per_tok
        if num_specialists == config.num_specialists and top_k == config.num_experts_per_tok:
            return
        if num_specialists < 0 or not 1 <= top_k <= config.num_generalists + num_specialists:
            raise ValueError(
                f"Cannot hold {num_specialists} specialists at num_experts_per_tok={top_k}: with "
                f"{config.num_generalists} generalists the model needs 0 or more specialists and between 1 and "
                f"{config.num_generalists + max(num_specialists, 0)} experts per token."
            )
        old_names = config.expert_names
        if num_specialists != config.num_specialists:  # fusion weights belong to one expert count
            self.set_expert_weights(None)
        config.num_specialists, config.num_experts_per_tok = num_specialists, top_k
        for mixture in self.mixtures:
            mixture.set_experts(old_names, config.expert_names, init_router=self._init_weights, top_k=top_k)

    # ---- parameter groups ----------------------------------------------------------------------------------------
    def named_parameters_by_role(self, *roles: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters whose [`parameter_role`] is one of `roles` (`"generalist"`, `"specialist"`, `"router"`)."""
        unknown = set(roles) - set(ROLES) - {"base"}
        if unknown:
            raise ValueError(f"Unknown roles {sorted(unknown)}; expected some of {ROLES}.")
        return ((n, p) for n, p in self.named_parameters() if parameter_role(n) in roles)

    def role_state_dict(self, *roles: str) -> dict[str, torch.Tensor]:
        """Detached copies of the tensors of the given roles, keyed by parameter name."""
        return {n: p.detach().clone() for n, p in self.named_parameters_by_role(*roles)}

    @torch.no_grad()
    def load_role_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy expert/router tensors into the model, checking every key, shape and value first.

        Nothing is written unless the whole state fits: a base key, an unknown key, a shape mismatch or a
        non-finite value raises `ValueError` naming it.
        """
        params = dict(self.named_parameters())
        for key, value in state.items():
            if parameter_role(key) == "base":
                raise ValueError(f"{key!r} belongs to the frozen base model and cannot be loaded as expert state.")
            if key not in params:
                raise ValueError(
                    f"{key!r} is not a parameter of this model (expert names: {self.config.expert_names})."
                )
            if tuple(value.shape) != tuple(params[key].shape):
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(params[key].shape)}.")
            if not torch.isfinite(value).all():
                raise ValueError(f"{key!r} holds NaN or infinite values.")
        for key, value in state.items():
            params[key].copy_(value)

    # ---- routing control -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def route_all_to(self, expert: int | str) -> Iterator[None]:
        """Send every token of every mixture to one expert with weight 1 (index or name such as `"generalist_0"`)."""
        names = self.config.expert_names
        index = names.index(expert) if isinstance(expert, str) and expert in names else expert
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise ValueError(f"Unknown expert {expert!r}; this model has experts {names}.")
        previous, self._routing_state.forced_expert = self._routing_state.forced_expert, index
        try:
            yield
        finally:
            self._routing_state.forced_expert = previous

    def load_balancing_target(self) -> torch.Tensor:
        """Target share of the load per expert: `generalist_importance` split over the generalists, the rest over
        the specialists (uniform over the generalists when there are none)."""
        config = self.config
        if config.num_specialists == 0:
            return torch.full((config.num_generalists,), 1.0 / config.num_generalists)
        return torch.tensor(
            [config.generalist_importance / config.num_generalists] * config.num_generalists
            + [(1 - config.generalist_importance) / config.num_specialists] * config.num_specialists
        )

    # ---- forward ------------------------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """[`~transformers.GenerationMixin.generate`], with every mixture's expert factors stacked once for the call
        instead of once per token: the weights do not change while it runs."""
        state = self._routing_state
        previous, state.stacked_factors = state.stacked_factors, {}
        try:
            return super().generate(*args, **kwargs)
        finally:
            state.stacked_factors = previous

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        output_routing_stats: bool = False,
        output_aux_loss: bool | None = None,
        **kwargs: Any,
    ) -> CoMiGSCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the LM loss (shifted inside, `-100` ignored). `loss` is then the LM loss plus
                `router_aux_loss_coef * aux_loss` (the LM loss alone with `output_aux_loss=False`).
            output_router_logits (`bool`, *optional*): also return every layer's router logits.
            output_routing_stats (`bool`, defaults to `False`): also return per-layer routing statistics.
            output_aux_loss (`bool`, *optional*): compute the load-balancing loss `aux_loss`. Defaults to computing
                it when `labels` are given or gradients are enabled, not when decoding or evaluating.

        Returns:
            [`CoMiGSCausalLMOutputWithPast`] with `loss`, `aux_loss`, `logits`, `cache`, and on request
            `router_logits` and `routing_stats`.
        """
        kwargs.pop("return_dict", None)  # always a ModelOutput inside; generate() passes it
        config = self.config
        self._routing_state.records = []
        if output_aux_loss is None:
            output_aux_loss = labels is not None or torch.is_grad_enabled()
        # only the reference balancing loss reads the decoder blocks' outputs (see `reference_load_balancing_loss`):
        # hooked for its passes alone, so that no other call pays for hooks (nor decoding for these config reads)
        reference_loss = (
            output_aux_loss and config.router_aux_loss_variant == "reference" and config.expert_mixing == "router"
        )
        self._routing_state.block_outputs = [] if reference_loss else None
        hooks = (
            [block.register_forward_hook(self._record_block_output) for block in self._blocks]
            if reference_loss
            else []
        )
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
        # gradient checkpointing re-runs mixtures during backward and appends again: keep this pass's records only
        routings, self._routing_state.records = self._routing_state.records[: len(self.mixtures)], []
        block_outputs, self._routing_state.block_outputs = self._routing_state.block_outputs, None
        if not output_aux_loss:
            aux_loss = None
        elif config.expert_mixing == "uniform":  # nothing to balance: no router decides
            aux_loss = outputs.logits.new_zeros((), dtype=torch.float32)
        elif reference_loss:
            routers = [mixture.router for mixture in self.mixtures]
            aux_loss = reference_load_balancing_loss(
                routers, block_outputs[: len(routers)], self.load_balancing_target(), attention_mask
            )
        else:
            aux_loss = load_balancing_loss(routings, self.load_balancing_target(), attention_mask)
        loss = None
        if labels is not None:
            loss = outputs.loss
            if aux_loss is not None:
                loss = loss + config.router_aux_loss_coef * aux_loss.to(loss.device)
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        return CoMiGSCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(r.router_logits for r in routings) if output_router_logits else None,
            routing_stats=routing_statistics(routings, attention_mask) if output_routing_stats else None,
        )


# generate() inspects the forward's signature at every step of a model registered for the Auto classes (ours is, so
# that saved models carry their code): computed once here, each look-up takes 7 us instead of 24 us
CoMiGSForCausalLM.forward.__signature__ = inspect.signature(CoMiGSForCausalLM.forward)


__all__ = ["CoMiGSCausalLMOutputWithPast", "CoMiGSForCausalLM", "CoMiGSPreTrainedModel"]
