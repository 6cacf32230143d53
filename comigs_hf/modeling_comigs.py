"""CoMiGS: a frozen causal LM whose MLP blocks are mixtures of LoRA generalists and specialists.

This file travels with saved models as remote code: it imports only the standard library, torch, transformers and
its sibling `*_comigs.py` files.

Legend for shape comments: B batch, T tokens, H hidden, E experts, K chosen experts per token (top-k), L layers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file, logging

from .configuration_comigs import KNOWN_ATTENTION_TARGETS, KNOWN_MLP_TARGETS, CoMiGSConfig
from .experts_comigs import EXPERTS_IMPLEMENTATIONS
from .layer_comigs import CoMiGSLoraLinear, CoMiGSMoeMLP, CoMiGSRouter, CoMiGSRouting, CoMiGSRoutingState

# The one definition of the trainable roles: generalists are shared with the federation, specialists and routers
# stay on the client (unless a strategy says otherwise); everything else is the frozen "base".
ROLES = ("generalist", "specialist", "router")
EXPERT_ROLES = ("generalist", "specialist")
_ROLE_PATTERN = re.compile(r"\.(?:lora_[AB]\.(generalist|specialist|attention)(?:_\d+)?\.|(router)\.)")


logger = logging.get_logger(__name__)

# Base names that are neither Hub ids nor paths (comigs_hf's embedded base), each resolver returning a local path for
# the names it knows and None for the others; comigs_hf registers its own on import.
BASE_RESOLVERS: list[Callable[[str], str | None]] = []
# from_pretrained keyword arguments that locate a checkpoint (the client's, then its base's)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
_CLIENT_ONLY_KWARGS = ("config", "trust_remote_code", "code_revision", "adapter_kwargs", "_from_auto", "_commit_hash")
# architecture fields an adapter-only client and the base loaded for it must agree on (transformers' attribute maps
# give every model type these names)
_ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")


def check_publication_confirmed(confirmed: bool, what: str) -> None:
    """Refuse to publish a whole client model unless `confirmed` is `True`: its specialists and routers were trained
    on the client's private data and can reveal it."""
    if confirmed is not True:
        raise ValueError(
            f"{what} publishes the whole client model, including its private specialists and routers, which were "
            "trained on the client's private data and can reveal it. Share only the generalist with "
            "push_generalist_to_hub, or pass confirm_private_data_publication=True to publish everything."
        )


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


class CoMiGSForCausalLM(CoMiGSPreTrainedModel, GenerationMixin):
    """A frozen causal LM whose target MLP blocks are mixtures of LoRA experts, one token router per block.

    The base model is held once, under `self.model`, with every parameter frozen; only the experts' LoRA factors and
    the routers train. Use [`~CoMiGSForCausalLM.from_base`] to wrap a pretrained base.
    """

    def __init__(self, config: CoMiGSConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = base_model if base_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        _check_causal_lm(self.model)
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

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike | PreTrainedModel,
        *,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        token: str | bool | None = None,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        quantization_config: Any = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        base_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> CoMiGSForCausalLM:
        """Wrap a pretrained causal LM (Hub id, local path or loaded model) into a fresh CoMiGS model.

        Args:
            base (`str`, `os.PathLike` or `PreTrainedModel`):
                The base causal LM. A loaded model is wrapped in place (its MLPs are replaced), not copied.
            revision, dtype, token, device_map, attn_implementation, quantization_config, cache_dir,
            local_files_only:
                As in `AutoModelForCausalLM.from_pretrained`, for loading `base` by name (`token` defaults to the
                standard `HF_TOKEN` / login).
            base_kwargs (`dict`, *optional*):
                Any other keyword arguments of `AutoModelForCausalLM.from_pretrained` for the base.
            config_kwargs:
                Fields of [`CoMiGSConfig`]: `num_generalists`, `num_specialists`, `lora_r`, `lora_alpha`,
                `top_k` (alias of `num_experts_per_tok`), ...

        Example:

        ```python
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from comigs_hf import CoMiGSForCausalLM
        >>> base = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2))
        >>> model = CoMiGSForCausalLM.from_base(base, num_generalists=1, num_specialists=2, top_k=2)
        >>> model.config.expert_names
        ['generalist_0', 'specialist_0', 'specialist_1']
        ```
        """
        name = None
        if isinstance(base, (str, os.PathLike)):
            name = str(base)
            located = {
                "revision": revision,
                "token": token,
                "cache_dir": cache_dir,
                "local_files_only": local_files_only,
            }
            base_config = AutoConfig.from_pretrained(name, **located)
            if type(base_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
                raise ValueError(
                    f"{name!r} is not a causal language model: its config is a {type(base_config).__name__}, which "
                    "no `AutoModelForCausalLM` class takes."
                )
            loading = {
                "dtype": dtype,
                "device_map": device_map,
                "attn_implementation": attn_implementation,
                "quantization_config": quantization_config,
            }
            loading = {k: v for k, v in loading.items() if v is not None} | dict(base_kwargs or {})
            base = AutoModelForCausalLM.from_pretrained(name, config=base_config, **located, **loading)
        _check_causal_lm(base)
        if "top_k" in config_kwargs:  # the name used in the CoMiGS paper and reference code
            config_kwargs["num_experts_per_tok"] = config_kwargs.pop("top_k")
        name = name or config_kwargs.pop("base_model_name_or_path", None) or base.config.name_or_path or None
        config_kwargs.setdefault("base_model_revision", revision)
        config = CoMiGSConfig(text_config=base.config, base_model_name_or_path=name, **config_kwargs)
        # one mode for the whole model, the base's: a base loaded by name is in eval mode, as from_pretrained leaves
        # it, and new modules would otherwise be in train mode around it
        return cls(config, base_model=base).train(base.training)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        base_model: str | os.PathLike | PreTrainedModel | None = None,
        **kwargs: Any,
    ) -> CoMiGSForCausalLM:
        """Load a saved client. An adapter-only checkpoint (the default of [`save_pretrained`]) loads its base from
        the Hub id or path its config names (`base_model_name_or_path`, at `base_model_revision`), or from
        `base_model` when given (a Hub id, path or loaded model); a full checkpoint holds its base.

        The usual `from_pretrained` keyword arguments apply: `revision`, `token`, `cache_dir`, `local_files_only`,
        `subfolder` locate the client's files (and, but for `revision` and `subfolder`, the base's); the others
        (`dtype`, `device_map`, `attn_implementation`, `quantization_config`, ...) load the base. The base is frozen,
        the experts, attention adapter and routers trainable.
        """
        # the mixture's layout is this model's, not the base's (whose loader would refuse CoMiGS's names)
        experts_implementation = kwargs.pop("experts_implementation", None)
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):  # remote code gets its own CoMiGSConfig class
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = CoMiGSConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
            kwargs["config"] = config
        if config.weights_include_base is not False:
            if base_model is not None:
                raise ValueError(
                    f"{str(pretrained_model_name_or_path)!r} is a full checkpoint that holds its own base; "
                    "base_model= applies to adapter-only checkpoints."
                )
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            # loading materialises fresh parameters (requires_grad=True): the base must stay frozen
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
            model.freeze_base()
        else:
            if model_args:
                raise TypeError("An adapter-only checkpoint takes no positional model arguments.")
            loaded = cls._from_adapter_checkpoint(str(pretrained_model_name_or_path), config, base_model, kwargs)
            model = loaded[0] if isinstance(loaded, tuple) else loaded
        if experts_implementation is not None:
            model.set_experts_implementation(experts_implementation)
        return loaded

    @classmethod
    def _from_adapter_checkpoint(
        cls,
        source: str,
        config: CoMiGSConfig,
        base_model: str | os.PathLike | PreTrainedModel | None,
        kwargs: dict[str, Any],
    ) -> CoMiGSForCausalLM:
        # what the Auto classes add for the client's own files must not reach the base it names: another repo's
        # adapter lookup, and above all trust_remote_code, which would run code of whatever repo the config names
        kwargs = {k: v for k, v in kwargs.items() if k not in _CLIENT_ONLY_KWARGS}
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        output_loading_info = kwargs.pop("output_loading_info", False)
        weights = cached_file(source, SAFE_WEIGHTS_NAME, **hub)
        if not isinstance(base_model, PreTrainedModel):
            name = str(base_model) if base_model is not None else config.base_model_name_or_path
            if not name:
                raise ValueError(
                    f"{source!r} holds adapters only and its config names no base (base_model_name_or_path is "
                    "empty): pass base_model= (a Hub id, path or loaded model)."
                )
            revision = config.base_model_revision if base_model is None else None
            base_hub = {k: v for k, v in hub.items() if k not in ("revision", "subfolder")}
            # the adapters were trained on the base as quantised (bitsandbytes 4/8-bit): load it the same way, so
            # the logits are the saved model's, unless the caller asks for another quantisation
            saved_quantization = getattr(config.text_config, "quantization_config", None)
            if saved_quantization is not None and "quantization_config" not in kwargs:
                kwargs["quantization_config"] = saved_quantization
            base_model = AutoModelForCausalLM.from_pretrained(
                _resolve_base(name), revision=revision, **base_hub, **kwargs
            )
        _check_causal_lm(base_model)
        _check_same_architecture(source, config.text_config, base_model.config)
        _restore_saved_dropout(source, config.text_config, base_model)
        config.text_config = base_model.config  # the base as loaded (dtype, attention implementation, ...)
        # the adapters' names and shapes from a copy built on the meta device: the file is checked whole before the
        # base (possibly the caller's model) is wrapped, so a refused file changes nothing
        with torch.device("meta"):
            layout = cls(copy.deepcopy(config), base_model=AutoModelForCausalLM.from_config(base_model.config))
        expected = {n: tuple(p.shape) for n, p in layout.named_parameters() if parameter_role(n) != "base"}
        state = read_adapter_tensors(weights, source, expected)
        for key, value in state.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"{source!r}: {key!r} holds NaN or infinite values.")
        model = cls(config, base_model=base_model)
        model.load_role_state_dict(state)
        with contextlib.suppress(OSError):  # the client's own generation settings, when it saved some
            model.generation_config = GenerationConfig.from_pretrained(source, **hub)
        model.eval()  # as transformers' from_pretrained leaves a model
        if output_loading_info:
            return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        include_base: bool | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        confirm_private_data_publication: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the client as transformers does, adapter-only by default.

        Args:
            save_directory (`str` or `os.PathLike`): the folder.
            include_base (`bool`, *optional*): `False`: `model.safetensors` holds the experts, attention adapter and
                routers, and the config names the base to load (`base_model_name_or_path`). `True`: the frozen
                base's weights too (a full checkpoint, for offline use). Defaults to adapter-only when the config
                names the base, else (a base built in memory) to a full checkpoint, with a warning.
            push_to_hub (`bool`, defaults to `False`): also upload, which publishes the client's private specialists
                and routers: refused unless `confirm_private_data_publication=True`.
            kwargs: the other arguments of `PreTrainedModel.save_pretrained`.
        """
        if push_to_hub:
            check_publication_confirmed(confirm_private_data_publication, "save_pretrained(push_to_hub=True)")
        named = bool(self.config.base_model_name_or_path)
        if include_base is None:
            include_base = not named
            if include_base:
                logger.warning(
                    "The base of this model has no name or path (base_model_name_or_path is empty): saving a full "
                    "checkpoint, base included. Set config.base_model_name_or_path for an adapter-only one."
                )
        if not include_base:
            if not named:
                raise ValueError(
                    "This model's config names no base (base_model_name_or_path is empty), so an adapter-only "
                    "checkpoint could not be loaded again: build it with from_base(<Hub id or path>), set "
                    "config.base_model_name_or_path, or pass include_base=True."
                )
            state_dict = {k: v for k, v in (state_dict or self.state_dict()).items() if parameter_role(k) != "base"}
            kwargs["max_shard_size"] = "1000GB"  # one file: adapter-only loading reads model.safetensors
        previous, self.config.weights_include_base = self.config.weights_include_base, include_base
        try:
            super().save_pretrained(save_directory, *args, state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
        finally:
            self.config.weights_include_base = previous

    def should_save_on_this_rank(self, is_main_process: bool) -> bool:
        # transformers writes only on rank 0 of an initialised process group (one model sharded over the ranks); the
        # ranks of a federation each hold other clients, and each saves its own
        return is_main_process

    def push_to_hub(self, repo_id: str, *args: Any, confirm_private_data_publication: bool = False, **kwargs: Any):
        """`PreTrainedModel.push_to_hub`, refused unless `confirm_private_data_publication=True`: a client model holds
        private specialists and routers (share the generalist with `push_generalist_to_hub`)."""
        check_publication_confirmed(confirm_private_data_publication, "push_to_hub")
        return super().push_to_hub(repo_id, *args, **kwargs)

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


def _is_dropout_field(key: str, value: Any) -> bool:
    return ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float)


def set_base_dropout(base: PreTrainedModel, rate: float) -> None:
    """Set every dropout of `base` to `rate`: its `nn.Dropout` modules, the float dropout rates that attention
    modules read in forward (Llama's `attention_dropout`), and the matching fields of its config, so a saved
    model reloads the same."""
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, rate)
    for key, value in base.config.to_dict().items():
        if _is_dropout_field(key, value):
            setattr(base.config, key, rate)


def _restore_saved_dropout(source: str, saved: Any, base: PreTrainedModel) -> None:
    # a base loaded by name has its pretrained dropout; the client may have trained with another one (the recipe's
    # `model.base_dropout`, which sets every rate to one value): set it again, so training continues as it was
    saved_rates = {k: v for k, v in saved.to_dict().items() if _is_dropout_field(k, v)}
    loaded_rates = {k: v for k, v in base.config.to_dict().items() if _is_dropout_field(k, v)}
    if all(loaded_rates.get(k) == v for k, v in saved_rates.items()):
        return
    if len(set(saved_rates.values())) == 1:
        set_base_dropout(base, next(iter(saved_rates.values())))
    else:
        logger.warning(
            f"{source!r} was saved with the base dropout rates {saved_rates}; the base loaded for it has "
            f"{loaded_rates}, kept as loaded (only a single rate for all of them is restored)."
        )


def _check_same_architecture(source: str, saved: Any, loaded: Any) -> None:
    for name in _ARCHITECTURE_FIELDS:
        theirs, ours = getattr(saved, name, None), getattr(loaded, name, None)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(
                f"{source!r} was trained on a base with {name}={theirs!r}, but the base loaded for it has {ours!r}."
            )


def _resolve_base(name: str) -> str:
    for resolver in BASE_RESOLVERS:
        path = resolver(name)
        if path is not None:
            return path
    if name.startswith("comigs_hf/"):
        raise ValueError(
            f"The base {name!r} is one comigs_hf builds locally (not a Hub repo): install and import comigs_hf, or "
            "pass base_model=."
        )
    return name


def read_adapter_tensors(
    path: str, source: str, expected: dict[str, tuple[int, ...]], skip_base: bool = False
) -> dict[str, torch.Tensor]:
    """The expert, attention adapter and router tensors of a saved client's weights file, each key, shape and dtype
    checked from the file's header before its tensor is read (values are checked by `load_role_state_dict`).

    Args:
        path (`str`): the safetensors file. source (`str`): what to name in messages.
        expected (`dict[str, tuple[int, ...]]`): every tensor the file must hold, by name, with its shape.
        skip_base (`bool`, defaults to `False`): pass over base tensors (a full checkpoint) instead of refusing them.

    Raises:
        `ValueError`: a base tensor (unless `skip_base`), an unknown name, a wrong shape, a non-float dtype or a
        missing tensor, named.
    """
    state = {}
    with safe_open(path, framework="pt") as handle:
        for key in handle.keys():
            if parameter_role(key) == "base":
                if skip_base:
                    continue
                raise ValueError(f"{source!r} is marked adapter-only but its weights hold the base tensor {key!r}.")
            if key not in expected:
                raise ValueError(f"{source!r}: {key!r} is not an expert, attention adapter or router of this model.")
            header = handle.get_slice(key)
            if tuple(header.get_shape()) != expected[key]:
                raise ValueError(
                    f"{source!r}: {key!r} has shape {tuple(header.get_shape())}, expected {expected[key]}."
                )
            if header.get_dtype() not in ("F16", "BF16", "F32", "F64"):
                raise ValueError(f"{source!r}: {key!r} is {header.get_dtype()}, not a floating-point tensor.")
            state[key] = handle.get_tensor(key)
    missing = [name for name in expected if name not in state]
    if missing:
        raise ValueError(
            f"{source!r} lacks {len(missing)} of the model's expert and router tensors, e.g. {missing[0]!r}."
        )
    return state


def _check_causal_lm(model: nn.Module) -> None:
    # by class name: `MODEL_FOR_CAUSAL_LM_MAPPING.values()` imports every causal LM module of transformers (~1.7 s,
    # and some of them look for flash-attention kernels on the Hub as they import)
    is_causal = isinstance(model, PreTrainedModel) and (
        type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        or (isinstance(model, GenerationMixin) and model.get_output_embeddings() is not None)
    )
    if not is_causal:
        raise ValueError(
            f"The base must be a causal language model (an `AutoModelForCausalLM` class such as GPT2LMHeadModel or "
            f"LlamaForCausalLM), got {type(model).__name__}."
        )


__all__ = [
    "BASE_RESOLVERS",
    "EXPERT_ROLES",
    "ROLES",
    "CoMiGSCausalLMOutputWithPast",
    "CoMiGSForCausalLM",
    "CoMiGSPreTrainedModel",
    "check_publication_confirmed",
    "is_attention_adapter",
    "parameter_role",
    "read_adapter_tensors",
    "set_base_dropout",
]
