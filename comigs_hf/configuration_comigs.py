"""CoMiGS model configuration.

This file travels with saved models as remote code: it imports only the standard library, torch and transformers
(huggingface_hub is a hard dependency of transformers).
"""

import math
import re

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

# The MLP projections that carry experts, relative to a decoder block, in the order the MLP applies them: the last
# one maps back to the hidden size. Matching is on whole dotted paths, so GPT-2's "mlp.c_proj" never catches
# "attn.c_proj". Tried in order when `target_modules` is not given.
KNOWN_MLP_TARGETS: tuple[tuple[str, ...], ...] = (
    ("mlp.c_fc", "mlp.c_proj"),  # GPT-2
    ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen2/3, Gemma
    ("mlp.fc1", "mlp.fc2"),  # Phi, OPT-style
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),  # GPT-NeoX, Falcon
)
KNOWN_ATTENTION_TARGETS: tuple[tuple[str, ...], ...] = (
    ("attn.c_attn", "attn.c_proj"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    ("attention.query_key_value", "attention.dense"),
)

# The one definition of the trainable roles: generalists are shared with the federation, specialists and routers
# stay on the client (unless a strategy says otherwise); everything else is the frozen "base".
ROLES = ("generalist", "specialist", "router")
EXPERT_ROLES = ("generalist", "specialist")
_ROLE_PATTERN = re.compile(r"\.(?:lora_[AB]\.(generalist|specialist|attention)(?:_\d+)?\.|(router)\.)")


def parameter_role(name: str) -> str:
    """The role of a parameter or state-dict key of a [`CoMiGSForCausalLM`].

    Returns `"generalist"` for generalist experts and the shared attention adapter (both averaged across clients),
    `"specialist"` for specialist experts, `"router"` for the token routers, and `"base"` for the frozen base model.
    Training and federation select tensors with this one rule.
    """
    match = _ROLE_PATTERN.search(name)
    if match is None:
        return "base"
    role = match.group(1) or match.group(2)
    return "generalist" if role == "attention" else role


def is_attention_adapter(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the attention adapter (role `"generalist"`, not an expert)."""
    match = _ROLE_PATTERN.search(name)
    return match is not None and match.group(1) == "attention"


EXPERT_MIXINGS = ("router", "uniform")
ROUTER_AUX_LOSS_VARIANTS = ("switch", "reference")


@strict
class CoMiGSConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CoMiGSForCausalLM`]: a frozen causal LM whose MLP blocks become mixtures of LoRA experts.

    Experts `0 .. num_generalists - 1` are generalists (averaged across clients), the rest specialists (private).

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Configuration of the frozen base causal LM (any model type known to `AutoConfig`).
        base_model_name_or_path (`str`, *optional*):
            Hub id or path of the base checkpoint, written into exported PEFT adapters and checked on import. An
            adapter-only checkpoint loads its base from here.
        base_model_revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of the base an adapter-only checkpoint loads.
        weights_include_base (`bool`, *optional*):
            Set by `save_pretrained`: `False` when the saved weights are the experts, attention adapter and routers
            only (the base is loaded from `base_model_name_or_path`), `True` when they hold the base too. `None`
            (checkpoints written before the field existed) reads as `True`.
        num_generalists (`int`, defaults to 1):
            Experts shared with the federation. At least one.
        num_specialists (`int`, defaults to 1):
            Experts that never leave the client. Zero means the client only holds generalists.
        lora_r (`int`, defaults to 8):
            Rank of every expert's LoRA adapter (PEFT's `r`).
        lora_alpha (`float`, defaults to 16):
            LoRA scaling numerator (PEFT's `lora_alpha`).
        lora_dropout (`float`, defaults to 0.0):
            Dropout on the LoRA input.
        use_rslora (`bool`, defaults to `True`):
            Scale LoRA by `lora_alpha / sqrt(lora_r)` (rsLoRA, as the CoMiGS reference) instead of
            `lora_alpha / lora_r`.
        target_modules (`list[str]`, *optional*):
            The MLP projections carrying experts, as paths inside a decoder block in the order the MLP applies them
            (e.g. `["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]`); the last maps back to the hidden size. Detected
            for GPT-2, Llama/Mistral/Qwen2, Phi and GPT-NeoX bases when not given.
        num_experts_per_tok (`int`, defaults to 2):
            Experts mixed per token (the top-k of the router; `top_k` is accepted by `from_base`).
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the load-balancing loss added to the LM loss.
        generalist_importance (`float`, defaults to 0.5):
            Share of the load the balancing loss steers to the generalists (the rest goes to the specialists).
        attention_lora (`bool`, defaults to `False`):
            Add one shared LoRA adapter on the attention projections, treated like a generalist.
        attention_target_modules (`list[str]`, *optional*):
            Attention projections for `attention_lora`, as paths inside a decoder block; detected when not given.
        attention_lora_r (`int`, *optional*):
            Rank of the attention adapter; defaults to `lora_r`. The CoMiGS reference uses 8 whatever the experts'
            rank. Its scaling follows `use_rslora` with the same `lora_alpha`.
        expert_mixing (`str`, defaults to `"router"`):
            `"router"`: the token router mixes the top-k experts. `"uniform"`: every token gets the plain average of
            all experts' outputs and the router is unused (the reference's no-router Local and FedAvg baselines).
        router_aux_loss_variant (`str`, defaults to `"switch"`):
            `"switch"`: the balancing loss uses the full softmax of the router on the MLP input. `"reference"`: as the
            CoMiGS reference code, the router is applied again to the decoder block's output hidden state and its
            probabilities are masked to the top-k (top-1: the chosen expert's softmax probability, others zero;
            top-k > 1: a softmax over the chosen logits with zeros in place of the others). The two agree for two
            experts at top-2 up to which hidden state the router sees.
        recompute_activation (`bool`, defaults to `True`):
            When a token has several token/expert pairs (top-k > 1 or uniform mixing), recompute in backward the MLP
            activations that keep several tensors (such as quick-GELU) instead of keeping them for each pair: less
            memory for some extra element-wise work. GPT-2's tanh-GELU needs none: the mixture runs it as one fused
            kernel.
        upcast_adapters (`bool`, defaults to `True`):
            On a float16 or bfloat16 base, keep the experts, the attention adapter and the routers in float32 (as
            PEFT's `autocast_adapter_dtype` does): their updates are small, and half-precision optimiser steps on them
            round away. `False`: the base's dtype.
        expert_weights (`list[float]`, *optional*):
            With `expert_mixing="uniform"`, a fixed weight per expert (router order) in place of 1/E: every token gets
            `sum_e expert_weights[e] * expert_e(x)` (FD-LoRA's fusion of its global and local adapters).
        router_init_std (`float`, defaults to 0.02):
            Standard deviation of the routers' initial weights.
        output_router_logits (`bool`, defaults to `False`):
            Return every mixture's router logits from the forward pass (as Mixtral's config; the forward's
            `output_router_logits` argument overrides it).
        experts_implementation (`str`, *optional*, defaults to `"auto"`):
            How the mixtures run, as transformers' MoE models take it (a keyword of the config or of
            `from_pretrained`, or `model.set_experts_implementation(...)`; not saved): `"eager"`, the definition, a
            loop over the experts, each running the whole MLP on the tokens that chose it; `"grouped"`,
            `"grouped_loop"` and `"token_order"`, the base run once per token with the pairs grouped by expert (by
            torch's grouped matmul, or a loop over the experts) or kept in token order; `"auto"`, token order for
            small calls (decoding) and grouped otherwise. All compute the same function (see `experts_comigs.py`).
    """

    model_type = "comigs"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    weights_include_base: bool | None = None
    num_generalists: int = 1
    num_specialists: int = 1
    lora_r: int = 8
    lora_alpha: int | float = 16.0
    lora_dropout: int | float = 0.0
    use_rslora: bool = True
    target_modules: list[str] | None = None
    num_experts_per_tok: int = 2
    router_aux_loss_coef: int | float = 0.01
    generalist_importance: int | float = 0.5
    attention_lora: bool = False
    attention_target_modules: list[str] | None = None
    attention_lora_r: int | None = None
    expert_mixing: str = "router"
    router_aux_loss_variant: str = "switch"
    recompute_activation: bool = True
    upcast_adapters: bool = True
    router_init_std: int | float = 0.02
    expert_weights: list[float] | None = None
    output_router_logits: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # the attention implementation setter propagates to sub-configs: without this, wrapping a loaded base
        # would reset its (already resolved) implementation to None
        if isinstance(self.text_config, PreTrainedConfig):
            kwargs.setdefault("attn_implementation", self.text_config._attn_implementation)
        # the mixture's layout (see `experts_comigs.EXPERTS_IMPLEMENTATIONS`), a runtime choice that is not saved:
        # set on this config alone, as `set_experts_implementation` does, not on the base's (which has no such layouts)
        experts_implementation = kwargs.pop("experts_implementation", None)
        super().__post_init__(**kwargs)
        self._experts_implementation_internal = experts_implementation
        self.validate_experts()
        # generation and cache code read these from the top-level config
        self.tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)

    @property
    def num_experts(self) -> int:
        return self.num_generalists + self.num_specialists

    @property
    def expert_names(self) -> list[str]:
        """Expert names in router order: `generalist_0 ..`, then `specialist_0 ..`."""
        return [f"generalist_{i}" for i in range(self.num_generalists)] + [
            f"specialist_{j}" for j in range(self.num_specialists)
        ]

    @property
    def lora_scaling(self) -> float:
        return self._scaling(self.lora_r)

    @property
    def attention_rank(self) -> int:
        """Rank of the attention adapter: `attention_lora_r`, else `lora_r`."""
        return self.attention_lora_r if self.attention_lora_r is not None else self.lora_r

    @property
    def attention_lora_scaling(self) -> float:
        return self._scaling(self.attention_rank)

    def _scaling(self, r: int) -> float:
        return self.lora_alpha / (r**0.5 if self.use_rslora else r)

    def validate_experts(self) -> None:
        """Cross-field checks, run at construction so a bad config never reaches forward.

        Raised as plain `ValueError`s (not through `@strict`'s class validators, which wrap them in another type).
        """
        if self.num_generalists < 1:
            raise ValueError(f"`num_generalists` must be at least 1, got {self.num_generalists}.")
        if self.num_specialists < 0:
            raise ValueError(f"`num_specialists` must be 0 or more, got {self.num_specialists}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` (top-k, {self.num_experts_per_tok}) must be between 1 and the number of "
                f"experts "
                f"(`num_generalists` + `num_specialists` = {self.num_generalists} + {self.num_specialists})."
            )
        if self.lora_r < 1:
            raise ValueError(f"`lora_r` must be at least 1, got {self.lora_r}.")
        if not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be above 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        if not 0.0 < self.generalist_importance < 1.0 and self.num_specialists > 0:
            raise ValueError(
                f"`generalist_importance` must be in (0, 1) when there are specialists, "
                f"got {self.generalist_importance}."
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be 0 or more, got {self.router_aux_loss_coef}.")
        if self.attention_lora_r is not None and self.attention_lora_r < 1:
            raise ValueError(f"`attention_lora_r` must be at least 1 or None (lora_r), got {self.attention_lora_r}.")
        if self.expert_mixing not in EXPERT_MIXINGS:
            raise ValueError(f"`expert_mixing` must be one of {EXPERT_MIXINGS}, got {self.expert_mixing!r}.")
        if self.router_aux_loss_variant not in ROUTER_AUX_LOSS_VARIANTS:
            raise ValueError(
                f"`router_aux_loss_variant` must be one of {ROUTER_AUX_LOSS_VARIANTS}, got "
                f"{self.router_aux_loss_variant!r}."
            )
        if self.expert_weights is not None:
            weights = self.expert_weights
            if self.expert_mixing != "uniform":
                raise ValueError(
                    f"`expert_weights` {weights} need `expert_mixing='uniform'`, got {self.expert_mixing!r}."
                )
            if len(weights) != self.num_experts or not all(math.isfinite(float(w)) for w in weights):
                raise ValueError(
                    f"`expert_weights` must hold one finite weight per expert ({self.num_experts}), got {weights}."
                )
        if self.target_modules is not None and len(self.target_modules) < 2:
            raise ValueError(
                f"`target_modules` needs at least an input and an output projection of the MLP, "
                f"got {self.target_modules}."
            )


__all__ = ["EXPERT_ROLES", "ROLES", "is_attention_adapter", "parameter_role", "CoMiGSConfig"]
