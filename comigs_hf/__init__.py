"""comigs_hf: CoMiGS (Collaborative learning with a Mixture of Generalists and Specialists) for transformers.

Importing the package registers the `comigs` model type with `AutoConfig` and `AutoModelForCausalLM`, so saved
models load without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .checkpoint_comigs import BASE_RESOLVERS
from .configuration_comigs import CoMiGSConfig, parameter_role
from .modeling_comigs import CoMiGSCausalLMOutputWithPast, CoMiGSForCausalLM, CoMiGSPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("comigs", CoMiGSConfig, exist_ok=True)
AutoModelForCausalLM.register(CoMiGSConfig, CoMiGSForCausalLM, exist_ok=True)
# save_pretrained / push_to_hub then also write `auto_map` and the *_comigs.py files (remote code)
CoMiGSConfig.register_for_auto_class()
CoMiGSForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _resolve_packaged_base(name: str) -> str | None:
    # checkpoints of the bases this package builds (the embedded base, SmolLM2) name them "comigs_hf/...": built
    # locally, never downloaded
    if not name.startswith("comigs_hf/"):
        return None
    from .embedded import resolve_packaged_base  # only when a checkpoint names one: `import comigs_hf` stays light

    return resolve_packaged_base(name)


if not any(getattr(resolver, "__name__", "") == "_resolve_packaged_base" for resolver in BASE_RESOLVERS):
    BASE_RESOLVERS.append(_resolve_packaged_base)

__all__ = [
    "CoMiGSCausalLMOutputWithPast",
    "CoMiGSConfig",
    "CoMiGSForCausalLM",
    "CoMiGSPreTrainedModel",
    "parameter_role",
]
