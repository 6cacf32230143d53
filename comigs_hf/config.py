"""Recipe configuration: YAML and `key=value` overrides in, one typed section per callee out.

A recipe config is a YAML mapping with top-level run keys and four sections, each a dataclass defined next to the
code it configures:

```yaml
strategy: comigs          # comigs_hf.algorithms.STRATEGIES; aggregation, aggregation_kwargs, weighting beside it
rounds: 20                # comigs_hf.transports.accelerate.RoundsConfig: rounds, eval_every, seed, output_dir, resume
model:                    # comigs_hf.model.ModelConfig, checked by building the CoMiGSConfig it describes
  num_specialists: [0, 1, 2, 3]   # one count per client: resource heterogeneity
training:                 # comigs_hf.trainer.TrainingConfig
  local_steps: 10
evaluation:               # comigs_hf.evaluation.EvaluationConfig
  paper_batches: 100
data:                     # comigs_hf.data.DataConfig
  num_clients: 4
```

[`load_config`] reads it, applies `key=value` overrides (dotted for sections, `training.local_steps=5`; bare for
top-level keys, `rounds=5`; values parsed as YAML, so `model.num_specialists=[0,1,2,3]` is a list), and hands the
result to OmegaConf's structured configs, which check every key and type against the dataclasses. Each section then
runs its own checks on construction; this module adds only the checks that span sections ([`validate_config`]) and
reports every problem at once, each naming its dotted key, before any model or data is built.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import LoggerType
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .algorithms import get_strategy
from .algorithms.privacy import DEFAULT_DELTA
from .config_parsing import ConfigSchema, parse_override, type_hints
from .data import DataConfig
from .evaluation import EvaluationConfig
from .model import ModelConfig
from .server import check_secure_aggregation
from .strategies import Strategy
from .trainer import TrainingConfig
from .transports.accelerate import RoundsConfig

__all__ = [
    "KNOWN_TRACKERS",
    "SECTIONS",
    "RecipeConfig",
    "build_strategy",
    "check_client_layout",
    "client_num_specialists",
    "config_reference",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "validate_config",
]

# Accelerate's tracker names (its `LoggerType`, "all" included), plus "none" to log nothing
KNOWN_TRACKERS = (*(t.value for t in LoggerType), "none")
SECTIONS = ("model", "data", "training", "evaluation")
REFERENCE_ORDER = ("model", "training", "evaluation", "data")  # the README's order


@dataclass
class RecipeConfig(RoundsConfig):
    """The whole recipe: the rounds section and the strategy at the top level, then the model, data, training and
    evaluation sections."""

    strategy: str = field(default="comigs", metadata={"help": "Preset of comigs_hf.algorithms.STRATEGIES."})
    aggregation: str | None = field(
        default=None, metadata={"help": "Aggregation rule (a key of AGGREGATORS); None: the strategy's own."}
    )
    aggregation_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra arguments of the aggregation rule, e.g. {trim_ratio: 0.2}."}
    )
    weighting: str | None = field(
        default=None,
        metadata={
            "help": "Client weights: train_tokens, capped_train_tokens (at 2x the lower median; the Hub uses it for "
            "train_tokens) or uniform; None: the strategy's own."
        },
    )
    max_update_norm: float | None = field(
        default=None,
        metadata={
            "help": "Refuse a client update farther than this (L2 over its shared tensors) from the round's global; "
            "None: only each value is bounded."
        },
    )
    max_client_weight: float | None = field(
        default=None,
        metadata={
            "help": "The largest share of an aggregate any one client may have, in (0, 1] (the excess goes to the "
            "others); None: the strategy's own (no cap)."
        },
    )
    rank_pruning_coef: float | None = field(
        default=None,
        metadata={
            "help": "HetLoRA's regulariser on the tail a rank self-pruning cuts (the paper sweeps 0.05, 0.005, "
            "0.0005); None: the strategy's own."
        },
    )
    dp_clipping_norm: float | None = field(
        default=None,
        metadata={
            "help": "Differential privacy: each client clips its round's update to this L2 norm, the server averages "
            "with equal weights and refuses larger updates; None: no clipping (comigs_hf.algorithms.privacy)."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "Gaussian noise of std dp_noise_multiplier x dp_clipping_norm / m on the mean of m updates; "
            "results.json counts epsilon per round (opacus RDP); None: the strategy's own (0, no noise)."
        },
    )
    dp_delta: float = field(default=DEFAULT_DELTA, metadata={"help": "The delta at which epsilon is reported."})
    secure_aggregation: bool = field(
        default=False,
        metadata={
            "help": "Flower: SecAgg+ over the shared update (Flower's secaggplus_mod and SecAggPlusWorkflow), so that "
            "the server only ever holds the sum; needs an equal-weight mean (weighting uniform)."
        },
    )
    secure_clipping_range: float = field(
        default=1.0,
        metadata={
            "help": "SecAgg+: each coordinate of an update must lie within +-this; the secure mean is within "
            "2 x this / 2**22 of the plain one, per coordinate."
        },
    )
    min_train_nodes: int | None = field(
        default=None,
        metadata={
            "help": "Flower: the fewest usable updates a round aggregates (a node may fail or be dropped); None: "
            "every client asked. Accelerate and the Hub rounds lose no client."
        },
    )
    trackers: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": f"Accelerate trackers: {', '.join(KNOWN_TRACKERS)}."},
    )
    save_models: bool = field(
        default=True,
        metadata={
            "help": "Save every client's experts, attention adapter and routers at the end (config naming the base)."
        },
    )
    save_base: bool = field(
        default=False,
        metadata={
            "help": "Also save the frozen base's weights in every client folder (full checkpoints, offline use)."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Write loss and routing plots at the end."})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        problems = []
        try:
            super().__post_init__()
        except ValueError as error:
            problems += str(error).splitlines()
        try:
            strategy = build_strategy(self)
        except ValueError as error:
            problems.append(f"strategy: {error}")
        else:  # optional packages an algorithm needs, refused now rather than after the training
            for algorithm in strategy.algorithms:
                try:
                    algorithm.check_requirements()
                except ImportError as error:
                    problems.append(str(error))
        if isinstance(self.dp_delta, bool) or not 0 < self.dp_delta < 1:
            problems.append(f"dp_delta must be in (0, 1), got {self.dp_delta}.")
        unknown = [name for name in self.trackers if name not in KNOWN_TRACKERS]
        if unknown:
            problems.append(f"trackers: unknown tracker(s) {unknown}; known: {', '.join(KNOWN_TRACKERS)}.")
        if problems:
            raise ValueError("\n".join(problems))


def config_reference() -> list[tuple[str, str, str]]:
    """Every recipe key as `(key, default, meaning)`, section by section (top level, then `model.`, `training.`,
    `evaluation.`, `data.`), from the dataclass fields' metadata: the rows of the README's configuration reference
    and of `comigs run --help`."""
    sections = [(RecipeConfig, "")] + [(type_hints(RecipeConfig)[name], f"{name}.") for name in REFERENCE_ORDER]
    rows = []
    for section, prefix in sections:
        for item in dataclasses.fields(section):
            if not prefix and item.name in SECTIONS:
                continue
            if item.default is not dataclasses.MISSING:
                default = item.default
            else:
                default = item.default_factory()
            rows.append((f"{prefix}{item.name}", str(default), item.metadata.get("help", "")))
    return rows


def build_strategy(cfg: RecipeConfig) -> Strategy:
    """The preset named by `cfg.strategy` with the recipe's `aggregation`, `aggregation_kwargs`, `weighting` and
    `max_update_norm`."""
    return get_strategy(
        cfg.strategy,
        aggregation=cfg.aggregation,
        # secure aggregation can only take an equal-weight mean: its default weighting
        weighting=cfg.weighting if cfg.weighting is not None or not cfg.secure_aggregation else "uniform",
        aggregation_kwargs=cfg.aggregation_kwargs,
        max_update_norm=cfg.max_update_norm,
        rank_pruning_coef=cfg.rank_pruning_coef,
        max_client_weight=cfg.max_client_weight,
        dp_clipping_norm=cfg.dp_clipping_norm,
        dp_noise_multiplier=cfg.dp_noise_multiplier,
    )


def client_num_specialists(cfg: RecipeConfig, num_clients: int | None = None) -> list[int]:
    """Returns the number of specialists of each client, in client order.

    Args:
        cfg ([`RecipeConfig`]): the recipe; `model.num_specialists` is one count for all clients or one per client.
        num_clients (`int`, *optional*):
            The number of clients, e.g. `len(clients)` after loading the data; defaults to what the data section
            says (`cfg.data.num_clients_known()`).

    Raises:
        `ValueError`: when a per-client list does not have one entry per client, or when a single count must be
        broadcast but the number of clients is unknown before loading (pass `num_clients`).
    """
    if num_clients is not None:
        return cfg.model.client_num_specialists(num_clients)
    num_clients, source = cfg.data.num_clients_known(), cfg.data.describe_client_count()
    if num_clients is not None:
        return cfg.model.client_num_specialists(num_clients, source)
    counts = cfg.model.num_specialists
    if isinstance(counts, int):
        raise ValueError(f"model.num_specialists={counts} applies to every client, but {source}: pass num_clients.")
    return list(counts)


def check_client_layout(cfg: RecipeConfig, num_clients: int | None = None) -> list[int] | None:
    """Each client's specialist count, checked against the strategy: a strategy that averages specialists or the
    router needs the same expert count on every client.

    Args:
        cfg ([`RecipeConfig`]): the recipe.
        num_clients (`int`, *optional*): the number of clients once the data is loaded; by default what the data
            section says.

    Returns:
        `list[int]` or `None`: the counts, or `None` when the number of clients is only known after loading.

    Raises:
        `ValueError`: a per-client list without one entry per client, or unequal counts under such a strategy.
    """
    try:
        counts = client_num_specialists(cfg, num_clients)
    except ValueError:
        if isinstance(cfg.model.num_specialists, int):
            return None  # one count for all: only the number of clients is unknown yet
        raise
    cfg.model.client_lora_ranks(len(counts))
    strategy = build_strategy(cfg)
    if strategy.requires_equal_experts and len(set(counts)) > 1:
        reasons = [algorithm.equal_experts_because for algorithm in strategy.algorithms]
        why = (
            f"averages {', '.join(sorted(strategy.shared_roles))}"
            if strategy.shared_roles & {"specialist", "router"}
            else next(reason for reason in reasons if reason)
        )
        raise ValueError(
            f"strategy {strategy.name!r} {why}, so every client needs the same number of experts, but "
            f"model.num_specialists={cfg.model.num_specialists} gives {counts}."
        )
    return counts


def validate_config(cfg: RecipeConfig) -> None:
    """The checks that span sections (each section checks itself on construction): see [`check_client_layout`].

    Raises:
        `ValueError`: naming the keys.
    """
    check_client_layout(cfg)
    if cfg.secure_aggregation:
        check_secure_aggregation(build_strategy(cfg), cfg.secure_clipping_range)
    if cfg.clients_per_round is not None:
        build_strategy(cfg).check_participation(cfg.clients_per_round)
        num_clients = cfg.data.num_clients_known()
        if num_clients is not None and cfg.clients_per_round > num_clients:
            raise ValueError(f"clients_per_round={cfg.clients_per_round} is more than the {num_clients} clients.")


# ---------------------------------------------------------------------------------------------------------------------
# YAML and overrides -> OmegaConf -> dataclasses (comigs_hf.config_parsing)
# ---------------------------------------------------------------------------------------------------------------------
def _invalid(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else "Invalid recipe config:\n- " + "\n- ".join(problems)


# keys that moved, and where to: an old config gets the new place, not a guess
MOVED_KEYS = {
    "training.eval_batches": "evaluation.batches",
    "training.router_on_train": "strategy=comigs_tr (or local_moe_train, fedavg_moe_train): router_training 'train'",
}


SCHEMA = ConfigSchema(RecipeConfig, MOVED_KEYS)


def _instantiate(merged: Any) -> RecipeConfig:
    """Every section built on its own, so that all their problems are reported together."""
    problems, sections = [], {}
    for name in SECTIONS:
        try:
            sections[name] = OmegaConf.to_object(merged[name])
        except ValueError as error:
            # a section reports one problem per line, each starting with its field
            problems += [f"{name}: {line}" for line in str(error).splitlines()]
        except OmegaConfBaseException as error:
            problems.append(f"{name}: {str(error).splitlines()[0]}")
    try:
        top = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"Invalid recipe config: {str(error).splitlines()[0]}") from None
    top = {key: value for key, value in top.items() if key not in SECTIONS}
    try:
        cfg = RecipeConfig(**top, **sections)
    except ValueError as error:
        problems += str(error).splitlines()
    if problems:
        raise ValueError(_invalid(problems))
    return cfg


def config_from_dict(data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Builds and validates a [`RecipeConfig`] from a plain mapping (parsed YAML, or `config_to_dict` output).

    Args:
        data (`Mapping[str, Any]`, *optional*): top-level keys and sections; missing keys keep their defaults.
        overrides (`Sequence[str]`, *optional*): `key=value` strings applied on top, see [`load_config`].

    Returns:
        [`RecipeConfig`]: the typed, validated config.

    Raises:
        `ValueError`: for a malformed override, an unknown key (naming the dotted key, the valid keys of its section
        and the closest match), a value of the wrong type (naming the key, the expected type and the value), a
        section's own rejection (prefixed with the section) or any rejection of [`validate_config`].
    """
    merged = OmegaConf.structured(RecipeConfig)
    for path, value in SCHEMA.leaves(copy.deepcopy(dict(data or {}))):
        merged = SCHEMA.merge(merged, path, value)
    for override in overrides:
        path, value = parse_override(override)
        try:
            merged = SCHEMA.merge(merged, path, value)
        except ValueError as error:
            raise ValueError(f"Override {override!r}: {error}") from None
    cfg = _instantiate(merged)
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

    return plain(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
