"""The recipe as a Flower app: a `ServerApp` and a `ClientApp` built from one recipe config.

In Flower's simulation engine, from the command line or Python:

    comigs flower-sim --config recipes/configs/demo.yaml rounds=5

    from comigs_hf.flower_app import run_flower_simulation
    results = run_flower_simulation(load_config("recipes/configs/demo.yaml"))

The module's `server` and `client` apps read the recipe from the run config instead (keys `config`, a YAML path, and
`overrides`, space-separated `key=value`s), for `flwr run` against a SuperLink. Each SuperNode serves one client,
named by its node config:

- `partition-id` (required): the client's position in the recipe's data partition; only its data is opened;
- `state-dir`: where the node keeps its private state (default: `<output_dir>/nodes`);
- `overrides`: space-separated `key=value`s of the `data.` section or `output_dir` for this node only (an
  organisation's own data path); other keys would change what the federation computes and are refused.

The server step, the client step and the record of each round are the Accelerate rounds' (`comigs_hf.server`,
`comigs_hf.trainer`): with the same recipe and seed, every client's test metrics equal the Accelerate run's. The
server writes `results.json`, `curves.csv`, the global generalist and plots; each node writes its client's model
under `<output_dir>/clients/`. Figures are in distribution only: no machine holds every client's test data.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .client_state import initial_shared_state
from .config import RecipeConfig, build_strategy, check_client_layout, config_to_dict, load_config
from .data import build_client_data
from .evaluation import check_paper_protocol
from .model import build_model, load_base
from .outputs import RunLayout, write_run_summary
from .recipe import build_client, build_client_model, default_accelerator
from .transports.flower import (
    CoMiGSStrategy,
    FlowerNode,
    SecureAggregation,
    check_flower_strategy,
    secure_aggregation_mod,
    shared_to_arrays,
)

logger = logging.getLogger("comigs_hf.transports.flower")

# a node may point the recipe at its own data, and write where it likes; nothing else of the recipe is its to change
NODE_OVERRIDABLE = ("data.", "output_dir=")


def recipe_from_run_config(run_config: dict[str, Any]) -> RecipeConfig:
    """The recipe a `flwr run` names: `config` (a YAML path) and `overrides` (space-separated `key=value`s).

    Raises:
        `ValueError`: no `config` key, or a recipe that does not load.
    """
    if "config" not in run_config:
        raise ValueError(
            'The run config names no recipe: set config = "recipes/configs/<name>.yaml" under '
            "[tool.flwr.app.config] or pass --run-config 'config=\"...\"'."
        )
    return load_config(str(run_config["config"]), shlex.split(str(run_config.get("overrides", ""))))


def node_settings(cfg: RecipeConfig, node_config: dict[str, Any]) -> tuple[RecipeConfig, int, Path]:
    """This node's recipe (with its own `overrides`), client id and state folder, from its node config.

    Raises:
        `ValueError`: no `partition-id`, or an override of a key a node may not change.
    """
    if "partition-id" not in node_config:
        raise ValueError(
            "This SuperNode's node config has no partition-id: start it with --node-config 'partition-id=<i>' "
            "(the client it serves)."
        )
    client_id = node_config["partition-id"]
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ValueError(f"partition-id must be an integer >= 0, got {client_id!r}.")
    overrides = shlex.split(str(node_config.get("overrides", "")))
    refused = [item for item in overrides if not item.startswith(NODE_OVERRIDABLE)]
    if refused:
        raise ValueError(
            f"A node may override data.* keys and output_dir only (its own data and outputs), got {refused[:3]}."
        )
    if overrides:
        cfg = load_config(None, [*_as_overrides(cfg), *overrides])
    state_dir = Path(str(node_config.get("state-dir", Path(cfg.output_dir) / "nodes")))
    return cfg, client_id, state_dir


def _as_overrides(cfg: RecipeConfig) -> list[str]:
    # the whole recipe as top-level key=value items, so that a node's overrides apply on top of it
    return [f"{key}={json.dumps(value)}" for key, value in config_to_dict(cfg).items()]


# ---- the node ------------------------------------------------------------------------------------------------------
_MODELS: dict[str, tuple] = {}  # one model per recipe and process, as one serves every client of an Accelerate rank
_NODES: dict[tuple[str, int, str], FlowerNode] = {}


def build_node(cfg: RecipeConfig, client_id: int, state_dir: str | os.PathLike) -> FlowerNode:
    """Client `client_id`'s node: the recipe's model and this client's data only (cached per process)."""
    identity = json.dumps(config_to_dict(cfg), sort_keys=True)
    key = (identity, client_id, str(state_dir))
    if key in _NODES:
        return _NODES[key]
    strategy = check_flower_strategy(build_strategy(cfg))
    accelerator = default_accelerator()
    num_specialists, _, _ = cfg.model.client_layout(client_id)
    if identity not in _MODELS:  # built with this client's layout; another client of the process is swapped in
        _MODELS[identity] = build_client_model(cfg, strategy, num_specialists, accelerator)
    model, tokenizer = _MODELS[identity]
    data = build_client_data(cfg.data, tokenizer, cfg.seed, client_id)
    check_paper_protocol([data.test], [data.name], cfg.evaluation)
    client = build_client(
        cfg, client_id, model=model, data=data, state_dir=state_dir, accelerator=accelerator, strategy=strategy
    )
    models_dir = Path(cfg.output_dir) / "clients" if cfg.save_models else None
    node = FlowerNode(client, models_dir=models_dir, include_base=cfg.save_base, tokenizer=tokenizer)
    _NODES[key] = node
    return node


def client_app(cfg: RecipeConfig | None = None) -> ClientApp:
    """The `ClientApp` of the recipe `cfg` (`None`: the one the run config names, see [`recipe_from_run_config`])."""
    app = ClientApp(mods=[secure_aggregation_mod])  # Flower's secaggplus_mod, for a secure round's messages only

    def node_of(context: Context) -> FlowerNode:
        recipe = cfg if cfg is not None else recipe_from_run_config(dict(context.run_config))
        recipe, client_id, state_dir = node_settings(recipe, dict(context.node_config))
        return build_node(recipe, client_id, state_dir)

    @app.query()
    def describe(message: Message, context: Context) -> Message:
        return Message(node_of(context).describe(), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(node_of(context).train(message.content), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(node_of(context).evaluate(message.content), reply_to=message)

    return app


# ---- the server ----------------------------------------------------------------------------------------------------
def serve(cfg: RecipeConfig, grid: Grid) -> dict:
    """Run the recipe's rounds over the nodes of `grid` and write the server's outputs; returns `results.json`.

    Raises:
        `ValueError`: a recipe the Flower transport cannot carry, or whose number of clients only its data reveals.
        [`~comigs_hf.transports.flower.FederationIncomplete`]: too few nodes joined, or too few updates arrived in a
        round.
    """
    strategy = check_flower_strategy(build_strategy(cfg))
    if cfg.init_from is not None:
        raise ValueError("init_from is not supported on Flower: each node starts from its recipe's fresh state.")
    num_clients = cfg.data.num_clients_known()
    if num_clients is None:
        raise ValueError(
            f"A Flower federation must know its clients before any node loads data, but "
            f"{cfg.data.describe_client_count()}: list data.client_values."
        )
    counts = check_client_layout(cfg, num_clients)
    top_k = [cfg.model.client_top_k(count) for count in counts]
    base, _, base_name = load_base(cfg.model, progress=False)
    model = build_model(cfg.model, base, base_name, counts[0], strategy.expert_mixing)
    shared = initial_shared_state(model, strategy, counts[0], cfg.seed, top_k[0])
    server = CoMiGSStrategy(
        strategy,
        shared,
        num_clients,
        rounds=cfg.rounds,
        eval_every=cfg.eval_every,
        evaluation=cfg.evaluation,
        clients_per_round=cfg.clients_per_round,
        seed=cfg.seed,
        min_train_nodes=cfg.min_train_nodes,
        secure_aggregation=SecureAggregation(cfg.secure_clipping_range) if cfg.secure_aggregation else None,
    )
    server.start(grid, shared_to_arrays(shared), num_rounds=cfg.rounds)
    names = [server.names[client] for client in range(num_clients)]
    layout = RunLayout(model, strategy, names, counts, top_k, cfg.model.client_lora_ranks(num_clients))
    return write_run_summary(server.records, layout, server.shared, cfg, transport="flower", num_nodes=num_clients)


def server_app(cfg: RecipeConfig | None = None) -> ServerApp:
    """The `ServerApp` of the recipe `cfg` (`None`: the one the run config names, see [`recipe_from_run_config`])."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(cfg if cfg is not None else recipe_from_run_config(dict(context.run_config)), grid)

    return app


def run_flower_simulation(
    cfg: RecipeConfig, *, num_cpus_per_client: float = 1.0, num_gpus_per_client: float = 0.0
) -> dict:
    """Run the recipe in Flower's simulation engine (Ray backend), one virtual SuperNode per client; returns
    `results.json`.

    Raises:
        `ValueError`: `cfg.output_dir` already holds node states of a run (it would be mistaken for this one's).
    """
    from flwr.simulation import run_simulation

    nodes = Path(cfg.output_dir) / "nodes"
    if nodes.is_dir() and any(nodes.glob("client-*/round-*.pt")):
        raise ValueError(f"{nodes} holds the node states of a run: choose another output_dir, or delete it.")
    num_clients = cfg.data.num_clients_known()
    check_flower_strategy(build_strategy(cfg))
    if num_clients is None:
        raise ValueError(f"A Flower federation must know its clients: {cfg.data.describe_client_count()}.")
    resources = {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client}
    run_simulation(
        server_app(cfg),
        client_app(cfg),
        num_supernodes=num_clients,
        backend_config={"client_resources": resources, "init_args": {"logging_level": "error"}},
    )
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())


server = server_app()  # `flwr run`: the recipe comes from the run config
client = client_app()

__all__ = [
    "build_node",
    "client",
    "client_app",
    "node_settings",
    "recipe_from_run_config",
    "run_flower_simulation",
    "serve",
    "server",
    "server_app",
]
