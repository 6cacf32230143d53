"""Generalist experts <-> standard PEFT LoRA adapters.

A generalist is saved exactly as PEFT saves a LoRA adapter on the base model: `adapter_config.json` plus
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_{A,B}.weight`. `target_modules` lists the
full module paths of the expert projections, so GPT-2's `attn.c_proj` is never caught by a bare `c_proj`.

What comes from the Hub or another client is untrusted: tensors are read with safetensors only, and every key, shape
and value is checked before anything is written into the model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from .configuration_comigs import parameter_role
from .modeling_comigs import CoMiGSForCausalLM

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# the modules CoMiGS wraps around the base's own: without them a base key is the plain model's key
_WRAPPER_SEGMENTS = re.compile(r"\.(?:base_mlp|base_layer)(?=\.)")

# bounds on what another party's JSON may be: an adapter config or an update record is a few hundred bytes, flat
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 16
MAX_LORA_RANK = 4096
MAX_LORA_ALPHA = 1e6
MAX_TARGET_MODULES = 4096
# the tensor dtypes an adapter may hold (float8, integers, bool or complex are no LoRA factors)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# a module path as PEFT's patterns spell it, dots escaped or not: no quantifier or group that could backtrack
_MODULE_NAME = re.compile(r"(?:[\w\-]|\\?\.){1,256}")


def read_untrusted_json(data: bytes, name: str) -> Any:
    """Parse another party's JSON file, bounded: at most `MAX_JSON_BYTES`, nested at most `MAX_JSON_DEPTH` deep,
    UTF-8, integers of at most 4300 digits (Python's own limit), no NaN or Infinity.

    Raises:
        `ValueError`: naming `name` and what is wrong.
    """
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{name} is {len(data)} bytes, more than {MAX_JSON_BYTES}.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text.") from None

    def no_constant(constant: str) -> None:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        # the C parser refuses nesting past Python's recursion limit itself (RecursionError), in linear time
        parsed = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise ValueError(f"{name} is nested more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError as error:  # JSONDecodeError, too many digits, NaN/Infinity
        raise ValueError(f"{name} is not valid JSON ({str(error)[:200]}).") from None
    pending = [(parsed, 0)]
    while pending:  # iterative: the depth of what parsed, without recursing
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise ValueError(f"{name} is nested more than {MAX_JSON_DEPTH} levels deep.")
            pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return parsed


def check_lora_config(config: Any, name: str = ADAPTER_CONFIG_NAME) -> dict[str, Any]:
    """`config` if it is a PEFT LoRA adapter config whose fields have the types and ranges PEFT gives them: `r` an
    integer in [1, 4096], `lora_alpha` a positive finite number up to 1e6, `use_rslora` and `fan_in_fan_out`
    booleans, `target_modules` a string or a list of strings, `rank_pattern`/`alpha_pattern` string-to-number maps,
    `base_model_name_or_path` a string.

    Raises:
        `ValueError`: naming the first field at fault.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{name} is a JSON {type(config).__name__}, not an object.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{name}: not a LoRA adapter (peft_type is {quote_untrusted(config.get('peft_type'))}).")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def check(field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{name}: {field} must be {expected}, got {quote_untrusted(config.get(field))}.")

    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    check("r", isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_LORA_RANK, "an integer in [1, 4096]")
    check("lora_alpha", number(alpha) and 0 < alpha <= MAX_LORA_ALPHA, "a number in (0, 1e6]")
    for field in ("use_rslora", "fan_in_fan_out"):
        check(field, isinstance(config.get(field, False), bool), "true or false")
    targets = config.get("target_modules")
    check(
        "target_modules",
        isinstance(targets, str)
        or (
            isinstance(targets, list)
            and len(targets) <= MAX_TARGET_MODULES
            and all(isinstance(t, str) for t in targets)
        ),
        "a string or a list of strings",
    )
    for field, bound, low in (("rank_pattern", MAX_LORA_RANK, 1), ("alpha_pattern", MAX_LORA_ALPHA, 0)):
        pattern = config.get(field) or {}
        # keys are matched as regular expressions (as PEFT does): only module names, so no pattern can backtrack
        check(
            field,
            isinstance(pattern, dict)
            and all(
                _MODULE_NAME.fullmatch(k) and number(v) and 0 < v and low <= v <= bound for k, v in pattern.items()
            ),
            f"a map of module names (letters, digits, '_', '-', '.' or '\\.') to numbers in [{low}, {bound:g}]",
        )
    base = config.get("base_model_name_or_path")
    check("base_model_name_or_path", base is None or isinstance(base, str), "a string")
    return config


def quote_untrusted(value: Any, limit: int = 80) -> str:
    """Another party's value for a message: quoted as ASCII (control characters, ANSI escapes and look-alike letters
    shown as escapes) and cut to `limit` characters."""
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_float_tensors(state: dict[str, torch.Tensor], name: str) -> None:
    """Every tensor of an adapter file is a floating-point one of `FLOAT_DTYPES`.

    Raises:
        `ValueError`: naming the first tensor and its dtype.
    """
    for key, tensor in state.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {key!r} is {tensor.dtype}, not a float16/bfloat16/float32/float64 tensor.")


def _generalist_layers(model: CoMiGSForCausalLM, index: int) -> list[tuple[str, object]]:
    """(adapter name, layer) for every projection that generalist `index` occupies, attention adapter included."""
    if not 0 <= index < model.config.num_generalists:
        raise ValueError(f"Generalist index {index} is out of range: the model has {model.config.num_generalists}.")
    name = f"generalist_{index}"
    layers = []
    for layer in model.lora_layers():
        if name in layer.lora_A:
            layers.append((name, layer))
        elif "attention" in layer.lora_A:
            layers.append(("attention", layer))
    return layers


def generalist_state_dict(
    model: CoMiGSForCausalLM, index: int = 0, tensors: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Generalist `index` under PEFT's key names (`base_model.model.<path>.lora_A.weight`): the model's own tensors,
    or `tensors`, keyed by the model's parameter names (a client update's shared tensors), which must be exactly that
    generalist's and its attention adapter's.

    Raises:
        `ValueError`: `tensors` lacks one of the generalist's tensors or holds another one.
    """
    names = {id(module): name for name, module in model.named_modules()} if tensors is not None else {}
    state, used = {}, set()
    for adapter, layer in _generalist_layers(model, index):
        for factor in ("lora_A", "lora_B"):
            module = getattr(layer, factor)[adapter]
            if tensors is None:
                value = module.weight.detach()
            else:
                key = f"{names[id(module)]}.weight"
                if key not in tensors:
                    raise ValueError(f"The tensors of generalist {index} lack {key!r}.")
                value = tensors[key]
                used.add(key)
            state[f"{_PEFT_PREFIX}{layer.base_path}.{factor}.weight"] = value
    extra = sorted(set(tensors or {}) - used)
    if extra:
        raise ValueError(f"Tensors {extra[:3]} are not generalist {index}'s: only its adapters travel as PEFT files.")
    return state


def generalist_peft_config(model: CoMiGSForCausalLM, index: int = 0) -> LoraConfig:
    """The `LoraConfig` under which PEFT reproduces generalist `index` on the bare base model."""
    # imported here: peft imports bitsandbytes where installed (~1 s), which a node, aggregator or reader of
    # adapters never needs
    from peft import LoraConfig

    config = model.config
    layers = [layer for _, layer in _generalist_layers(model, index)]
    # the attention adapter may have its own rank: PEFT's per-module ranks, matched on the whole module path
    rank_pattern = {re.escape(layer.base_path): layer.r for layer in layers if layer.r != config.lora_r}
    return LoraConfig(
        r=config.lora_r,
        rank_pattern=rank_pattern,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=sorted(layer.base_path for layer in layers),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=config.base_model_name_or_path,
    )


def export_generalist(
    model: CoMiGSForCausalLM,
    save_directory: str | os.PathLike,
    index: int = 0,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write generalist `index` as a standard PEFT LoRA adapter directory: the model's own tensors, or `tensors` (see
    [`generalist_state_dict`]; a client update's shared tensors, which the model then only lays out).

    `PeftModel.from_pretrained(base, save_directory)` then computes what the CoMiGS model computes inside
    `model.route_all_to(index)`. Files are written next to their final names and renamed into place, so an
    interrupted export never leaves a half-written adapter over a good one.

    Returns:
        `Path`: the adapter directory.
    """
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in generalist_state_dict(model, index, tensors).items()}
    peft_config = generalist_peft_config(model, index)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-") as tmp:
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        peft_config.save_pretrained(tmp)
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(os.path.join(tmp, name), directory / name)
    return directory


@torch.no_grad()
def merged_generalist_model(model: CoMiGSForCausalLM, index: int = 0) -> PreTrainedModel:
    """A plain transformers model of the base's architecture with generalist `index` (and the attention adapter)
    merged into its weights.

    It computes what `model.route_all_to(index)` computes, with no CoMiGS code: any library or engine that serves
    the base architecture serves it. The specialists and routers are not in it (serve those with the CoMiGS model
    itself). Merging runs in float32 and stores the base's dtype.
    """
    state = {
        _WRAPPER_SEGMENTS.sub("", key.removeprefix("model.")): value
        for key, value in model.state_dict().items()
        if parameter_role(key) == "base"
    }
    for adapter, layer in _generalist_layers(model, index):
        delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float() * layer.scaling  # (O, I)
        key = f"{layer.base_path}.weight"
        weight = state[key]
        if not weight.is_floating_point():
            raise ValueError(
                f"{layer.base_path} is quantised ({weight.dtype}): merge into a float copy of the base instead."
            )
        state[key] = (weight.float() + (delta.T if layer.fan_in_fan_out else delta)).to(weight.dtype)
    dtype = model.get_input_embeddings().weight.dtype
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config.text_config), dtype=dtype)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def resolve_adapter_directory(
    source: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local adapter directory for `source`: itself if it is a directory, else a download of the Hub repo."""
    path = Path(source)
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.is_absolute() or str(source).startswith((".", "~")) or os.sep + os.sep in str(source):
        raise ValueError(f"Adapter directory {str(source)!r} does not exist.")
    patterns = [f"{subfolder}/{n}" if subfolder else n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]
    local = snapshot_download(repo_id=str(source), revision=revision, allow_patterns=patterns, token=token)
    return Path(local) / subfolder if subfolder else Path(local)


def _pattern_value(patterns: dict | None, path: str, default):
    # PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching the end of the module path
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _scaling(config: dict, path: str) -> float:
    """The scaling PEFT applies at module `path` under adapter config `config` (its rank and alpha patterns too)."""
    r = _pattern_value(config.get("rank_pattern"), path, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
    return alpha / (r**0.5 if config.get("use_rslora", False) else r)


def read_generalist(
    model: CoMiGSForCausalLM,
    source: str | os.PathLike,
    index: int = 0,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    check_base_model: bool = True,
) -> dict[str, torch.Tensor]:
    """Read a PEFT LoRA adapter (a directory or a Hub repo id at `revision`) as the tensors of generalist `index`.

    Any PEFT LoRA adapter of the same rank on exactly the generalist's projections can seed a generalist; a different
    `lora_alpha` or rsLoRA setting is folded into `lora_B` so the update is unchanged. The model is only read (for
    its layout), never written: pass the result to `model.load_role_state_dict`, or to a client round as the global
    shared state.

    Returns:
        `dict[str, torch.Tensor]`: parameter name of `model` (`...lora_A.generalist_0.weight`) to tensor, in the
        model's dtype.

    Raises:
        `ValueError`: the adapter is not LoRA, has another rank, another base model, another set of target
        modules, tensors of the wrong shape, or NaN/Inf values. The message names the mismatch.
    """
    directory = resolve_adapter_directory(source, revision=revision, subfolder=subfolder, token=token)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{source}: missing {path.name} (expected a PEFT LoRA adapter).")
    name = f"{source}: {ADAPTER_CONFIG_NAME}"
    adapter_config = check_lora_config(read_untrusted_json(config_path.read_bytes(), name), name)
    if adapter_config.get("r") != model.config.lora_r:
        raise ValueError(
            f"{source}: LoRA rank r={adapter_config.get('r')} does not match the model's lora_r={model.config.lora_r}."
        )
    theirs, ours = adapter_config.get("base_model_name_or_path"), model.config.base_model_name_or_path
    if check_base_model and theirs and ours and theirs != ours:
        raise ValueError(
            f"{source}: adapter was trained on base model {theirs!r}, this model's base is {ours!r} "
            "(pass check_base_model=False if they are the same weights under two names)."
        )
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{source}: cannot read {ADAPTER_WEIGHTS_NAME} ({error}).") from error
    check_float_tensors(state, f"{source}: {ADAPTER_WEIGHTS_NAME}")

    expected = {
        f"{_PEFT_PREFIX}{layer.base_path}.lora_{ab}.weight": (adapter, layer, ab)
        for adapter, layer in _generalist_layers(model, index)
        for ab in "AB"
    }
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: target modules differ from the model's generalist projections; missing "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''}."
        )
    module_names = {id(module): name for name, module in model.named_modules()}
    named = {}
    for key, (adapter, layer, ab) in expected.items():
        tensor = state[key]
        module = (layer.lora_A if ab == "A" else layer.lora_B)[adapter]
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(module.weight.shape)}."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: {key!r} holds NaN or infinite values.")
        if ab == "B":
            tensor = tensor.float() * (_scaling(adapter_config, layer.base_path) / layer.scaling)
        named[f"{module_names[id(module)]}.weight"] = tensor.to(module.weight.dtype)
    return named


def load_generalist(
    model: CoMiGSForCausalLM,
    source: str | os.PathLike,
    index: int = 0,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    check_base_model: bool = True,
) -> None:
    """Load a PEFT LoRA adapter (a directory or a Hub repo id at `revision`) into generalist `index`.

    [`read_generalist`] with the same arguments checks and converts it; the model is modified only after every check
    passed.

    Raises:
        `ValueError`: see [`read_generalist`].
    """
    state = read_generalist(model, source, index, revision, subfolder, token, check_base_model)
    model.load_role_state_dict(state)  # checks every shape and value again before writing any


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "FLOAT_DTYPES",
    "check_float_tensors",
    "check_lora_config",
    "export_generalist",
    "generalist_peft_config",
    "generalist_state_dict",
    "load_generalist",
    "merged_generalist_model",
    "quote_untrusted",
    "read_generalist",
    "read_untrusted_json",
    "resolve_adapter_directory",
]
