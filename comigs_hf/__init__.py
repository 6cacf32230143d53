"""comigs_hf: CoMiGS (Collaborative learning with a Mixture of Generalists and Specialists) for transformers.

Importing the package registers the `comigs` model type with `AutoConfig` and `AutoModelForCausalLM`, so saved
models load without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_comigs import CoMiGSConfig
from .modeling_comigs import CoMiGSCausalLMOutputWithPast, CoMiGSForCausalLM, CoMiGSPreTrainedModel, parameter_role

__version__ = "0.1.0"

AutoConfig.register("comigs", CoMiGSConfig, exist_ok=True)
AutoModelForCausalLM.register(CoMiGSConfig, CoMiGSForCausalLM, exist_ok=True)
# save_pretrained / push_to_hub then also write `auto_map` and the *_comigs.py files (remote code)
CoMiGSConfig.register_for_auto_class()
CoMiGSForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CoMiGSCausalLMOutputWithPast",
    "CoMiGSConfig",
    "CoMiGSForCausalLM",
    "CoMiGSPreTrainedModel",
    "parameter_role",
]
