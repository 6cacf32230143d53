"""Saved CoMiGS clients: an adapter-only checkpoint (the experts, the attention adapter and the routers) loaded over
the base its config names, every tensor checked before anything is written; the base's dropout restored as it
trained; the consent a whole client model's publication needs.

This file travels with saved models as remote code: it imports only the standard library, torch, safetensors,
transformers and its sibling `configuration_comigs.py`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file, logging

from .configuration_comigs import CoMiGSConfig, parameter_role

logger = logging.get_logger(__name__)

# Base names that are neither Hub ids nor paths (comigs_hf's embedded base), each resolver returning a local path for
# the names it knows and None for the others; comigs_hf registers its own on import.
BASE_RESOLVERS: list[Callable[[str], str | None]] = []
# from_pretrained keyword arguments that locate a checkpoint (the client's, then its base's)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
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


def load_adapter_checkpoint(
    model_class: type,
    source: str,
    config: Any,
    base_model: str | os.PathLike | PreTrainedModel | None,
    kwargs: dict[str, Any],
) -> Any:
    """An adapter-only checkpoint (`source`) over the base its config names (or `base_model`): every saved tensor
    checked against a copy of `model_class` built on the meta device before the base is wrapped, so that a refused
    file changes nothing. `CoMiGSForCausalLM.from_pretrained` calls it; `kwargs` are its keyword arguments."""
    # what the Auto classes add for the client's own files must not reach the base it names: another repo's
    # adapter lookup, and above all trust_remote_code, which would run code of whatever repo the config names
    kwargs = {k: v for k, v in kwargs.items() if k not in _CLIENT_ONLY_KWARGS}
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
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
        base_model = AutoModelForCausalLM.from_pretrained(resolve_base(name), revision=revision, **base_hub, **kwargs)
    check_causal_lm(base_model)
    _check_same_architecture(source, config.text_config, base_model.config)
    _restore_saved_dropout(source, config.text_config, base_model)
    config.text_config = base_model.config  # the base as loaded (dtype, attention implementation, ...)
    # the adapters' names and shapes from a copy built on the meta device: the file is checked whole before the
    # base (possibly the caller's model) is wrapped, so a refused file changes nothing
    with torch.device("meta"):
        layout = model_class(copy.deepcopy(config), base_model=AutoModelForCausalLM.from_config(base_model.config))
    expected = {n: tuple(p.shape) for n, p in layout.named_parameters() if parameter_role(n) != "base"}
    state = read_adapter_tensors(weights, source, expected)
    for key, value in state.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{source!r}: {key!r} holds NaN or infinite values.")
    model = model_class(config, base_model=base_model)
    model.load_role_state_dict(state)
    with contextlib.suppress(OSError):  # the client's own generation settings, when it saved some
        model.generation_config = GenerationConfig.from_pretrained(source, **hub)
    model.eval()  # as transformers' from_pretrained leaves a model
    if output_loading_info:
        return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model


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


def resolve_base(name: str) -> str:
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


def check_causal_lm(model: nn.Module) -> None:
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


class CoMiGSCheckpointMixin:
    """How a CoMiGS model is made from a base, loaded and saved: `from_base`, `from_pretrained` (adapter-only or full
    checkpoints) and `save_pretrained`/`push_to_hub` (adapter-only by default, a whole client only on request).
    [`~modeling_comigs.CoMiGSForCausalLM`] takes it before `PreTrainedModel`, whose methods it extends."""

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
    ) -> Any:
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
        check_causal_lm(base)
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
    ) -> Any:
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
            hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
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
    ) -> Any:
        return load_adapter_checkpoint(cls, source, config, base_model, kwargs)

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


__all__ = [
    "CoMiGSCheckpointMixin",
    "BASE_RESOLVERS",
    "check_causal_lm",
    "check_publication_confirmed",
    "load_adapter_checkpoint",
    "read_adapter_tensors",
    "resolve_base",
    "set_base_dropout",
]
