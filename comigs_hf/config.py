"""Recipe configuration: YAML -> typed dataclasses -> one section per callee.

A recipe config is a YAML mapping with top-level run keys and three sections:

```yaml
strategy: comigs          # local | fedavg | comigs
rounds: 20
model:
  num_specialists: [0, 1, 2, 3]   # one count per client: resource heterogeneity
training:
  local_steps: 10
data:
  num_clients: 4
```

`load_config` reads it, applies `key=value` overrides (dotted for sections, `training.local_steps=5`; bare for
top-level keys, `rounds=5`; values parsed as YAML, so `model.num_specialists=[0,1,2,3]` is a list), checks every key
and type against the dataclass annotations and rejects impossible combinations with `validate_config`, all before any
model or data is built. Only the recipe sees the whole config: it hands `cfg.model`, `cfg.training`, `cfg.data` and
`build_strategy(cfg)` to their callees.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from .aggregation import AGGREGATORS, get_aggregator
from .data import FILE_FORMATS, DataConfig
from .strategies import STRATEGIES, WEIGHTINGS, Strategy, get_strategy

__all__ = [
    "KNOWN_DTYPES",
    "KNOWN_TRACKERS",
    "ModelSection",
    "RecipeConfig",
    "TrainingSection",
    "build_strategy",
    "client_num_specialists",
    "config_from_dict",
    "config_to_dict",
    "expected_num_clients",
    "load_config",
    "validate_client_splits",
    "validate_config",
]

KNOWN_DTYPES = ("float32", "bfloat16", "float16")
# accelerate's tracker names, plus "none" to log nothing
KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "none")


@dataclass
class ModelSection:
    """Base model, experts, LoRA and routing; becomes a `CoMiGSConfig`."""

    base_model: str = field(
        default="embedded",
        metadata={"help": "Hub id or local path of the frozen base causal LM, or 'embedded' for the offline default."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to pin."})
    num_generalists: int = field(default=1, metadata={"help": "Generalist experts per layer, shared by all clients."})
    num_specialists: int | list[int] = field(
        default=1,
        metadata={"help": "Specialist experts per layer: one count for all clients, or a list with one per client."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of every expert (PEFT's `r`)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (PEFT's `lora_alpha`)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    use_rslora: bool = field(default=True, metadata={"help": "Scale by lora_alpha / sqrt(r) instead of / r."})
    top_k: int = field(default=2, metadata={"help": "Experts mixed per token (Mixtral's `num_experts_per_tok`)."})
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    generalist_importance: float = field(
        default=0.5,
        metadata={"help": "Share of the load the balancing loss steers to generalists; in (0, 1) with specialists."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "MLP projections carrying experts, in the order the MLP applies them; None: detected."},
    )
    attention_lora: bool = field(
        default=False, metadata={"help": "Also put a generalist LoRA adapter on the attention projection."}
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    recompute_activation: bool = field(
        default=True,
        metadata={"help": "With top_k > 1, recompute composite MLP activations in backward, not keep k copies."},
    )


@dataclass
class TrainingSection:
    """Optimisation of one client per round; defaults follow the CoMiGS reference implementation."""

    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of the expert optimiser."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the experts."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas (a YAML list)."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Cosine decay of the expert lr to learning_rate * min_lr_ratio over the run."}
    )
    router_learning_rate: float = field(default=2e-3, metadata={"help": "Constant learning rate of the router."})
    local_steps: int = field(default=10, metadata={"help": "Expert optimiser steps per client per round."})
    router_update_every: int = field(
        default=30, metadata={"help": "Expert steps between router phases, counted over the whole run."}
    )
    router_steps: int = field(default=10, metadata={"help": "Router optimiser steps per router phase; 0: frozen."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per optimiser step."})
    micro_batch_size: int = field(
        default=8, metadata={"help": "Sequences per forward; batch_size / micro_batch_size accumulation steps."}
    )
    router_on_train: bool = field(
        default=False, metadata={"help": "Ablation: train the router on the train split instead of validation."}
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm; None: no clipping."})
    eval_batches: int | None = field(default=None, metadata={"help": "Test batches per evaluation; None: all."})


@dataclass
class RecipeConfig:
    """The whole recipe: run settings at the top level, then the model, data and training sections."""

    strategy: str = field(default="comigs", metadata={"help": "Preset of comigs_hf.strategies.STRATEGIES."})
    aggregation: str | None = field(
        default=None, metadata={"help": "Aggregation rule (a key of AGGREGATORS); None: the strategy's own."}
    )
    aggregation_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra arguments of the aggregation rule, e.g. {trim_ratio: 0.2}."}
    )
    weighting: str | None = field(
        default=None, metadata={"help": "Client weights: train_tokens or uniform; None: the strategy's own."}
    )
    rounds: int = field(default=20, metadata={"help": "Communication rounds, counted from 1."})
    eval_every: int = field(default=5, metadata={"help": "Evaluate every this many rounds (and after the last)."})
    seed: int = field(default=0, metadata={"help": "Seed of data partitioning, initialisation and sampling."})
    output_dir: str = field(default="outputs/run", metadata={"help": "Where results, logs and checkpoints go."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    trackers: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": f"Accelerate trackers: {', '.join(KNOWN_TRACKERS)}."},
    )
    save_models: bool = field(default=True, metadata={"help": "Save every client's adapters at the end."})
    plots: bool = field(default=True, metadata={"help": "Write loss and routing plots at the end."})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingSection = field(default_factory=TrainingSection)


# ---------------------------------------------------------------------------------------------------------------------
# YAML and overrides -> dataclasses
# ---------------------------------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, which reads `2e-3` (no dot) as a string; float fields accept such strings
_FLOAT_LITERAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _TypeMismatch(Exception):
    """Raised inside `_coerce`; turned into a `ValueError` naming the key at the field level."""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls)
    except (NameError, TypeError, AttributeError, SyntaxError):
        # an annotation naming a TYPE_CHECKING-only import cannot be resolved: check the fields we can, accept the rest
        namespace = vars(sys.modules[cls.__module__])
        resolved = {}
        for f in dataclasses.fields(cls):
            try:
                resolved[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type
            except (NameError, TypeError, AttributeError, SyntaxError):
                resolved[f.name] = Any
        return resolved


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any) -> Any:
    """Checks `value` against `annotation` and returns it in that type (int -> float, list -> tuple)."""
    if annotation is Any:
        return value
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except _TypeMismatch:
                continue
        raise _TypeMismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _TypeMismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
        raise _TypeMismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _TypeMismatch
    if annotation is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch
        return [_coerce(item, args[0]) for item in value] if args else list(value)
    if annotation is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0]) for item in value)
        if len(value) != len(args):
            raise _TypeMismatch
        return tuple(_coerce(item, item_type) for item, item_type in zip(value, args))
    if annotation is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _TypeMismatch
        if not args:
            return dict(value)
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _TypeMismatch
    # an annotation we cannot check (Literal, a TypeVar, ...): accept rather than reject a valid value
    return value


def _unknown_key_message(cls: type, prefix: str, key: str, valid: list[str]) -> str:
    section = prefix.rstrip(".") or "the top level"
    message = f"Unknown config key {prefix + key!r}."
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        message += f" Did you mean {prefix + close[0]!r}?"
    else:
        # a section key written at the wrong level, e.g. `local_steps=5` for `training.local_steps=5`
        hints = _field_types(cls)
        for name in valid:
            section_type = hints.get(name)
            if dataclasses.is_dataclass(section_type) and key in {f.name for f in dataclasses.fields(section_type)}:
                message += f" Did you mean {prefix + name + '.' + key!r}?"
                break
    return message + f" Valid keys of {section}: {', '.join(valid)}."


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, recursing into dataclass-typed fields; `prefix` names the section."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        # ValueError, not TypeError: every config mistake surfaces as one exception type to the CLI
        raise ValueError(  # noqa: TRY004
            f"{prefix.rstrip('.')!r}: expected a mapping of {cls.__name__} fields, "
            f"got {data!r} ({type(data).__name__})."
        )
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise ValueError(_unknown_key_message(cls, prefix, str(key), valid))
        annotation = hints.get(key, Any)
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = value if isinstance(value, annotation) else _build(annotation, value, f"{prefix}{key}.")
            continue
        try:
            kwargs[key] = _coerce(value, annotation)
        except _TypeMismatch:
            wants_str = annotation is str or str in get_args(annotation)
            hint = " (quote it in YAML to make it a string)" if wants_str and isinstance(value, (int, float)) else ""
            raise ValueError(
                f"Config key {prefix + key!r} expects {_type_name(annotation)}, got {value!r} "
                f"({type(value).__name__}){hint}."
            ) from None
    try:
        return cls(**kwargs)
    except ValueError as error:
        # a section's own __post_init__ checks (DataConfig's) do not know where the section sits in the recipe
        if not prefix:
            raise
        raise ValueError(f"{prefix.rstrip('.')}: {error}") from error


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"Override {override!r} is not of the form key=value (e.g. training.local_steps=5).")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ValueError(f"Override {override!r} has an empty component in its key {key!r}.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"Override {override!r}: the value is not valid YAML ({error}).") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ValueError(f"Override {override!r}: {parent!r} is {child!r}, not a section with keys.")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Builds and validates a [`RecipeConfig`] from a plain mapping (parsed YAML, or `config_to_dict` output).

    Args:
        data (`Mapping[str, Any]`, *optional*): top-level keys and sections; missing keys keep their defaults.
        overrides (`Sequence[str]`, *optional*): `key=value` strings applied on top, see [`load_config`].

    Returns:
        [`RecipeConfig`]: the typed, validated config.

    Raises:
        `ValueError`: for a malformed override, an unknown key (naming the dotted key, the valid keys of its section
        and the closest match), a value of the wrong type (naming the key, the expected type and the value), or any
        rejection of [`validate_config`].
    """
    raw = copy.deepcopy(dict(data)) if data is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    cfg = _build(RecipeConfig, raw, prefix="")
    validate_config(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Reads a recipe YAML file, applies command-line overrides and validates the result.

    Args:
        path (`str` or `Path`, *optional*): the YAML file; `None` starts from the defaults.
        overrides (`Sequence[str]`, *optional*):
            `key=value` strings: dotted keys for sections (`training.local_steps=5`), bare keys for top-level ones
            (`strategy=fedavg`). Values are parsed with `yaml.safe_load`, so `5` is an int, `null` is `None` and
            `[0,1,2,3]` is a list.

    Returns:
        [`RecipeConfig`]: the typed, validated config.

    Raises:
        `ValueError`: see [`config_from_dict`]; also when the file's top level is not a mapping.

    Example:

    ```python
    >>> from comigs_hf.config import load_config
    >>> cfg = load_config(None, ["strategy=fedavg", "training.local_steps=5", "training.adam_betas=[0.9, 0.99]"])
    >>> cfg.strategy, cfg.training.local_steps, cfg.training.adam_betas
    ('fedavg', 5, (0.9, 0.99))

    ```
    """
    data: Any = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: a recipe config must be a mapping at the top level, got {type(data).__name__}.")
    return config_from_dict(data, overrides)


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """Returns `cfg` as plain YAML/JSON types (tuples become lists), for results files and checkpoints.

    `config_from_dict(config_to_dict(cfg)) == cfg` holds.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------------------------------------


def _client_count(data: DataConfig) -> tuple[int | None, str]:
    """The number of clients `data` produces and the key it comes from; `None` when only loading can tell."""
    if data.partition != "column":
        return data.num_clients, f"data.num_clients is {data.num_clients}"
    if data.client_values is not None:
        return len(data.client_values), f"data.client_values has {len(data.client_values)} entries"
    # one client per Hub config or per local file when the section lists them (read defensively: DataConfig grows)
    per_client = getattr(data, "configs_per_client", None)
    if per_client is not None:
        return len(per_client), f"data.configs_per_client has {len(per_client)} entries"
    files = data.data_files
    if isinstance(files, Mapping) and data.dataset in FILE_FORMATS and data.split not in files:
        return len(files), f"data.data_files has {len(files)} per-client entries"
    if data.dataset == "embedded" and data.partition_column in (None, "domain"):
        from .embedded import DOMAINS

        return len(DOMAINS), f"the embedded dataset has {len(DOMAINS)} domains"
    return None, "the number of clients is only known after loading the data"


def expected_num_clients(data: DataConfig) -> int | None:
    """Returns the number of clients the data section will produce, or `None` when only loading the data can tell.

    `data.num_clients` for `"iid"` and `"dirichlet"` partitions; for `"column"` partitions the number of
    `client_values`, of per-client configs or files, or of the embedded dataset's domains. A column partition of a
    dataset without listed values has one client per distinct value, which only the loaded data reveals.
    """
    return _client_count(data)[0]


def client_num_specialists(cfg: RecipeConfig, num_clients: int | None = None) -> list[int]:
    """Returns the number of specialists of each client, in client order.

    Args:
        cfg ([`RecipeConfig`]): the recipe; `model.num_specialists` is one count for all clients or one per client.
        num_clients (`int`, *optional*):
            The number of clients, e.g. `len(clients)` after loading the data; defaults to
            [`expected_num_clients`]`(cfg.data)`.

    Returns:
        `list[int]`: one count per client.

    Raises:
        `ValueError`: when a per-client list does not have one entry per client, or when a single count must be
        broadcast but the number of clients is unknown before loading (pass `num_clients`).
    """
    if num_clients is None:
        num_clients, source = _client_count(cfg.data)
    else:
        source = f"there are {num_clients} clients"
    counts = cfg.model.num_specialists
    if isinstance(counts, int):
        if num_clients is None:
            raise ValueError(
                f"model.num_specialists={counts} applies to every client, but {source}: pass num_clients."
            )
        return [counts] * num_clients
    if num_clients is not None and len(counts) != num_clients:
        raise ValueError(
            f"model.num_specialists has {len(counts)} entries {counts} but {source}; give one count per client "
            "or a single int."
        )
    return list(counts)


def build_strategy(cfg: RecipeConfig) -> Strategy:
    """Returns the preset named by `cfg.strategy` with the config's `aggregation`, `aggregation_kwargs` and
    `weighting` applied where set."""
    preset = get_strategy(cfg.strategy)
    return dataclasses.replace(
        preset,
        aggregation=cfg.aggregation if cfg.aggregation is not None else preset.aggregation,
        weighting=cfg.weighting if cfg.weighting is not None else preset.weighting,
        aggregation_kwargs=cfg.aggregation_kwargs or preset.aggregation_kwargs,
    )


def _check_strategy(cfg: RecipeConfig, errors: list[str]) -> Strategy | None:
    if cfg.strategy not in STRATEGIES:
        errors.append(f"strategy: unknown strategy {cfg.strategy!r}; known: {', '.join(sorted(STRATEGIES))}.")
        return None
    if cfg.aggregation is not None and cfg.aggregation not in AGGREGATORS:
        errors.append(f"aggregation: unknown rule {cfg.aggregation!r}; known: {', '.join(sorted(AGGREGATORS))}.")
        return None
    if cfg.weighting is not None and cfg.weighting not in WEIGHTINGS:
        errors.append(f"weighting: unknown weighting {cfg.weighting!r}; known: {', '.join(WEIGHTINGS)}.")
        return None
    strategy = build_strategy(cfg)
    try:
        # run the rule once on a one-client dummy so its own argument checks (e.g. trim_ratio) fire before training
        get_aggregator(strategy.aggregation)([{"probe": torch.zeros(1)}], [1.0], **strategy.aggregation_kwargs)
    except (TypeError, ValueError) as error:
        errors.append(f"aggregation_kwargs: {strategy.aggregation!r} rejects {strategy.aggregation_kwargs}: {error}")
    return strategy


def _check_model(cfg: RecipeConfig, strategy: Strategy | None, errors: list[str]) -> None:
    model = cfg.model
    if model.num_generalists < 1:
        errors.append(f"model.num_generalists must be >= 1 (the shared experts), got {model.num_generalists}.")
    num_clients = expected_num_clients(cfg.data)
    if isinstance(model.num_specialists, int) and num_clients is None:
        # the client count is unknown until the data loads; one representative client covers a shared count
        counts = [model.num_specialists]
    else:
        try:
            counts = client_num_specialists(cfg)
        except ValueError as error:
            errors.append(str(error))
            return
    if isinstance(model.num_specialists, int) and model.num_specialists < 0:
        errors.append(f"model.num_specialists must be >= 0, got {model.num_specialists}.")
        return
    negative = [
        f"model.num_specialists[{index}] (client {index}) is {count}"
        for index, count in enumerate(counts)
        if count < 0
    ]
    if negative:
        errors.append(f"specialist counts must be >= 0: {'; '.join(negative)}.")
        return
    if model.top_k < 1:
        errors.append(f"model.top_k must be >= 1, got {model.top_k}.")
    elif model.num_generalists >= 1:
        too_few = [
            f"client {index} has {model.num_generalists + count} (num_generalists={model.num_generalists} + "
            f"{count} specialists)"
            for index, count in enumerate(counts)
            if model.num_generalists + count < model.top_k
        ]
        if too_few:
            errors.append(f"model.top_k={model.top_k} exceeds the number of experts: {'; '.join(too_few)}.")
    if strategy is not None and strategy.requires_equal_experts and len(set(counts)) > 1:
        shared = ", ".join(sorted(strategy.shared_roles))
        errors.append(
            f"strategy {strategy.name!r} averages {shared}, so every client needs the same number of experts, but "
            f"model.num_specialists={model.num_specialists}."
        )
    if model.lora_r < 1:
        errors.append(f"model.lora_r must be >= 1, got {model.lora_r}.")
    if not model.lora_alpha > 0:
        errors.append(f"model.lora_alpha must be > 0, got {model.lora_alpha}.")
    if not 0 <= model.lora_dropout < 1:
        errors.append(f"model.lora_dropout must be in [0, 1), got {model.lora_dropout}.")
    if not model.router_aux_loss_coef >= 0:
        errors.append(f"model.router_aux_loss_coef must be >= 0, got {model.router_aux_loss_coef}.")
    if not 0 < model.generalist_importance < 1 and any(count > 0 for count in counts):
        errors.append(
            f"model.generalist_importance must be in (0, 1) when clients have specialists, got "
            f"{model.generalist_importance}."
        )
    if model.target_modules is not None and len(model.target_modules) < 2:
        errors.append(
            f"model.target_modules needs at least an input and an output projection of the MLP, got "
            f"{model.target_modules}; use null to detect them."
        )
    if model.dtype not in KNOWN_DTYPES:
        errors.append(f"model.dtype: unknown dtype {model.dtype!r}; known: {', '.join(KNOWN_DTYPES)}.")


def _check_training(cfg: RecipeConfig, errors: list[str]) -> None:
    training = cfg.training
    for key in ("learning_rate", "router_learning_rate"):
        value = getattr(training, key)
        if not (value > 0 and math.isfinite(value)):
            errors.append(f"training.{key} must be a finite number > 0, got {value}.")
    if not training.weight_decay >= 0:
        errors.append(f"training.weight_decay must be >= 0, got {training.weight_decay}.")
    for index, beta in enumerate(training.adam_betas):
        if not 0 <= beta < 1:
            errors.append(f"training.adam_betas[{index}] must be in [0, 1), got {beta}.")
    if not 0 <= training.min_lr_ratio <= 1:
        errors.append(f"training.min_lr_ratio must be in [0, 1], got {training.min_lr_ratio}.")
    if training.local_steps < 1:
        errors.append(f"training.local_steps must be >= 1, got {training.local_steps}.")
    if training.router_steps < 0:
        errors.append(f"training.router_steps must be >= 0 (0 freezes the router), got {training.router_steps}.")
    elif training.router_steps > 0 and training.router_update_every < 1:
        errors.append(
            f"training.router_update_every must be >= 1 when training.router_steps={training.router_steps} > 0, "
            f"got {training.router_update_every}."
        )
    if training.batch_size < 1 or training.micro_batch_size < 1:
        errors.append(
            f"training.batch_size and training.micro_batch_size must be >= 1, got {training.batch_size} and "
            f"{training.micro_batch_size}."
        )
    elif training.batch_size % training.micro_batch_size != 0:
        errors.append(
            f"training.batch_size={training.batch_size} must be a multiple of "
            f"training.micro_batch_size={training.micro_batch_size} (gradient accumulation)."
        )
    if training.max_grad_norm is not None and not training.max_grad_norm > 0:
        errors.append(f"training.max_grad_norm must be > 0 or null, got {training.max_grad_norm}.")
    if training.eval_batches is not None and training.eval_batches < 1:
        errors.append(f"training.eval_batches must be >= 1 or null (whole test split), got {training.eval_batches}.")


def _check_data(cfg: RecipeConfig, errors: list[str]) -> None:
    data = cfg.data
    if data.num_clients < 1:
        errors.append(f"data.num_clients must be >= 1, got {data.num_clients}.")
    for key in ("validation_fraction", "test_fraction"):
        value = getattr(data, key)
        if not 0 <= value < 1:
            errors.append(f"data.{key} must be in [0, 1), got {value}.")
    if not data.validation_fraction + data.test_fraction < 1:
        errors.append(
            f"data.validation_fraction + data.test_fraction must be < 1 to leave training data, got "
            f"{data.validation_fraction} + {data.test_fraction}."
        )
    num_clients, source = _client_count(data)
    caps = data.max_train_tokens
    if isinstance(caps, list) and num_clients is not None and len(caps) != num_clients:
        errors.append(
            f"data.max_train_tokens has {len(caps)} entries but {source}; give one cap per client or a single int."
        )


def validate_config(cfg: RecipeConfig) -> None:
    """Rejects impossible combinations before any model or data is built.

    All problems are reported at once, each naming its dotted key (and the client index where one client is at
    fault): an unknown strategy, aggregation rule, weighting, dtype or tracker; `num_generalists < 1`; a per-client
    `num_specialists` list of the wrong length or with negative counts; `top_k` above some client's expert count; a
    strategy sharing specialists or the router with unequal expert counts; `batch_size` not a multiple of
    `micro_batch_size`; `router_steps > 0` with `router_update_every < 1`; `rounds` or `eval_every` below 1; fractions
    outside `[0, 1)` or summing to 1 or more; non-positive learning rates.

    Args:
        cfg ([`RecipeConfig`]): the config to check.

    Raises:
        `ValueError`: listing every problem, one per line.
    """
    errors: list[str] = []
    strategy = _check_strategy(cfg, errors)
    if cfg.rounds < 1:
        errors.append(f"rounds must be >= 1, got {cfg.rounds}.")
    if cfg.eval_every < 1:
        errors.append(f"eval_every must be >= 1, got {cfg.eval_every}.")
    unknown_trackers = [name for name in cfg.trackers if name not in KNOWN_TRACKERS]
    if unknown_trackers:
        errors.append(f"trackers: unknown tracker(s) {unknown_trackers}; known: {', '.join(KNOWN_TRACKERS)}.")
    _check_data(cfg, errors)
    _check_model(cfg, strategy, errors)
    _check_training(cfg, errors)
    if errors:
        raise ValueError("Invalid recipe config:\n- " + "\n- ".join(errors))


class _ClientSplits(typing.Protocol):
    name: str
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor


def validate_client_splits(
    clients: Sequence[_ClientSplits], splits: Sequence[str] = ("train", "validation", "test")
) -> None:
    """Rejects clients with an empty split, which only data loading can reveal (a small client, a large block size).

    Args:
        clients (`Sequence`):
            Objects with a `name` and one `torch.Tensor` of shape `(num_blocks, block_size)` per split.
        splits (`Sequence[str]`, *optional*, defaults to `("train", "validation", "test")`):
            The splits the run needs; drop `"validation"` when the router trains on the train split or not at all.

    Raises:
        `ValueError`: naming every client and split that is missing, not 2-dimensional, or holds no tokens.
    """
    problems = []
    for index, client in enumerate(clients):
        label = f"client {index} ({getattr(client, 'name', '?')!r})"
        for split in splits:
            blocks = getattr(client, split, None)
            if blocks is None:
                problems.append(f"{label} has no {split} split")
            elif blocks.dim() != 2:
                problems.append(
                    f"{label}: {split} split has shape {tuple(blocks.shape)}, expected (num_blocks, block_size)"
                )
            elif blocks.numel() == 0:
                problems.append(f"{label} has an empty {split} split (shape {tuple(blocks.shape)})")
    if problems:
        raise ValueError(
            "Some clients have unusable data splits:\n- "
            + "\n- ".join(problems)
            + "\nGive them more records, or lower data.block_size, data.validation_fraction or data.test_fraction."
        )
