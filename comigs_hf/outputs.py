"""What a federated run leaves in `output_dir`: results, curves, models, the global generalist and plots."""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from .adapters import export_generalist
from .aggregation import lora_partner
from .client_state import client_folder_name
from .config import RecipeConfig, config_to_dict
from .configuration_comigs import is_attention_adapter
from .modeling_comigs import CoMiGSForCausalLM
from .ranks import payload_parameters
from .strategies import Strategy, lora_factor
from .transports.accelerate import Federation

logger = get_logger(__name__)

# every test figure an evaluation reports: full split and paper protocol, in distribution and on the mixture of all
# clients' test splits, after aggregation and (suffix `_before_aggregation`) right after the local steps
TEST_FIGURES = [
    f"{scope}{protocol}test_{kind}{point}"
    for point in ("", "_before_aggregation")
    for scope in ("", "ood_")
    for protocol in ("", "paper_")
    for kind in ("loss", "ppl")
]
CURVE_FIELDS = [
    "round",
    "client_id",
    "client",
    "train_loss",
    "router_loss",
    *TEST_FIGURES,
    "train_tokens",
    "tokens_seen",
    "bytes_sent",
    "bytes_received",
    "params_sent",
    "expert_params_sent",
    "trained",  # false: evaluated in a round it did not train (clients_per_round)
]


def client_parameter_counts(
    model: CoMiGSForCausalLM, strategy: Strategy, num_specialists: int, top_k: int, lora_rank: int
) -> dict[str, int]:
    """A client's `trainable_params` (what its optimisers step) and `active_params` (the adapter and router weights
    one token runs through: `top_k` experts, every expert under uniform mixing), at its expert rank `lora_rank`.

    Counted from the model's own tensors (one expert's adapters, the attention adapter, one router row per expert),
    so that budgets can be matched across layouts as the paper does (Table 2: equal active or total parameters).
    """
    one_expert, attention, router_row = {}, 0, 0
    for name, param in model.named_parameters():
        if is_attention_adapter(name):
            attention += param.numel()
        elif ".generalist_0." in name and lora_factor(name) not in (None, *strategy.frozen_factors):
            one_expert[name] = param
        elif name.endswith("router.weight"):
            router_row += param.shape[1]
    # keyed by each adapter's lora_A name, as `lora_ranks` is, even where only its B trains (FFA-LoRA)
    ranks = {name if lora_factor(name) == "lora_A" else lora_partner(name): lora_rank for name in one_expert}
    expert = payload_parameters(one_expert, ranks)["total"]
    experts = model.config.num_generalists + num_specialists
    router = router_row * experts if strategy.router_training != "none" else 0
    mixed = experts if strategy.expert_mixing == "uniform" else top_k
    return {
        "trainable_params": experts * expert + attention + router,
        "active_params": mixed * expert + attention + router,
    }


@dataclass(frozen=True)
class RunLayout:
    """What a run's outputs need besides its records, whatever transport ran it: the model (for parameter counts
    and the global generalist's export), the strategy, and each client's name and layout, in client order."""

    model: CoMiGSForCausalLM
    strategy: Strategy
    names: list[str]
    num_specialists: list[int]
    top_k: list[int]
    lora_ranks: list[int]

    @classmethod
    def of(cls, federation: Federation) -> RunLayout:
        layout = federation.layout
        return cls(
            federation.model,
            federation.strategy,
            [data.name for data in federation.evaluated],
            list(layout["num_specialists"]),
            list(layout["top_k"]),
            list(layout["lora_r"]),
        )


def summarise(records: list[dict], layout: RunLayout, cfg: RecipeConfig) -> dict:
    """`results.json`: per-client final metrics and totals over all rounds.

    A client's test figures are those of the last round's evaluation (null when the last round did not evaluate
    it); its totals count the rounds it trained (`rounds_trained`: every round unless `clients_per_round` samples)."""
    last = {row["client_id"]: row for row in records[-1]["clients"]}
    clients = []
    for client_id, name in enumerate(layout.names):
        rows = [row for record in records for row in record["clients"] if row["client_id"] == client_id]
        final = last.get(client_id, {})
        trained = [row for row in rows if row.get("trained", True)]
        clients.append(
            {
                "id": client_id,
                "name": name,
                "num_generalists": layout.model.config.num_generalists,
                "num_specialists": layout.num_specialists[client_id],
                "top_k": layout.top_k[client_id],
                "lora_r": layout.lora_ranks[client_id],
                **client_parameter_counts(
                    layout.model,
                    layout.strategy,
                    layout.num_specialists[client_id],
                    layout.top_k[client_id],
                    layout.lora_ranks[client_id],
                ),
                # the pooled split under centralized; null for a client never asked to train
                "train_tokens": trained[-1]["train_tokens"] if trained else None,
                "rounds_trained": len(trained),
                "tokens_seen": sum(row["tokens_seen"] for row in trained),
                "test_loss": None,  # null when the last round did not evaluate this client
                "test_ppl": None,
                **{key: final[key] for key in TEST_FIGURES if key in final},
                "bytes_sent": sum(row["bytes_sent"] for row in trained),
                "params_sent": sum(row["params_sent"] for row in trained),
                "expert_params_sent": sum(row["expert_params_sent"] for row in trained),
                "bytes_received": sum(row["bytes_received"] for row in trained),
                "routing": final.get("routing"),
                "fusion_weights": final.get("fusion_weights"),  # FD-LoRA's, else null
            }
        )
    ppls = [c["test_ppl"] for c in clients if c["test_ppl"] is not None]
    means = {
        f"mean_{key}": sum(c[key] for c in clients) / len(clients)
        for key in TEST_FIGURES
        if key.endswith("_ppl") and key != "test_ppl" and all(key in c for c in clients)
    }
    return {
        "strategy": cfg.strategy,
        "aggregation": layout.strategy.aggregation,
        "weighting": layout.strategy.weighting,
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "clients": clients,
        "mean_test_ppl": sum(ppls) / len(ppls) if ppls else None,
        **means,
        "shared_roles": sorted(layout.strategy.shared_roles),
        "privacy": None,  # differential privacy's report, see `DifferentialPrivacy.report`
        **{
            key: value
            for a in layout.strategy.algorithms
            for key, value in a.report(len(records), cfg.dp_delta).items()
        },
        "config": config_to_dict(cfg),
    }


def write_curves(path: Path, records: list[dict], names: list[str]) -> None:
    """One CSV row per (round, client): losses, perplexity where evaluated, tokens and bytes."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            for row in record["clients"]:
                writer.writerow({"round": record["round"], "client": names[row["client_id"]], **row})


def write_run_summary(
    records: list[dict], layout: RunLayout, shared: dict, cfg: RecipeConfig, **extra: object
) -> dict:
    """What the server side of any transport writes into `cfg.output_dir`: `results.json` (with `extra` keys),
    `curves.csv`, the global generalist (when the strategy shares it) and, with `cfg.plots`, the PNGs. Returns the
    results."""
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results = {**summarise(records, layout, cfg), **extra}
    if "generalist" in layout.strategy.shared_roles:
        # client 0's layout holds the global itself, not a client's slices of it when its rank is below the model's
        layout.model.set_num_specialists(layout.num_specialists[0], layout.top_k[0])
        layout.model.load_role_state_dict(shared)
        for index in range(layout.model.config.num_generalists):
            suffix = "" if layout.model.config.num_generalists == 1 else f"/generalist_{index}"
            export_generalist(layout.model, output / f"global_generalist{suffix}", index=index)
    write_curves(output / "curves.csv", records, layout.names)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    if cfg.plots and _have_matplotlib():
        plot_curves(records, layout.names, output / "training_curves.png")
        plot_routing(results, output / "routing.png")
    return results


def write_outputs(federation: Federation, cfg: RecipeConfig, accelerator: Accelerator) -> dict:
    """Write everything; every rank saves its own clients' models, the main process the rest."""
    output = Path(cfg.output_dir)
    layout = RunLayout.of(federation)
    extra = {"transport": "accelerate", "num_processes": accelerator.num_processes}
    results = {**summarise(federation.records, layout, cfg), **extra}
    if cfg.save_models:
        for client in federation.local_clients(accelerator):
            directory = output / "clients" / client_folder_name(client.client_id, client.spec.name)
            client.save_model(directory, federation.shared, include_base=cfg.save_base, tokenizer=federation.tokenizer)
    if accelerator.is_main_process:
        write_run_summary(federation.records, layout, federation.shared, cfg, **extra)
    accelerator.wait_for_everyone()
    return results


def _have_matplotlib() -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("plots=true but matplotlib is not installed (pip install 'comigs-hf[plots]'): no PNGs written.")
        return False
    return True


def plot_curves(records: list[dict], names: list[str], path: Path) -> None:
    """Training loss per round and test perplexity at evaluated rounds, one line per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for client_id, name in enumerate(names):
        rows = [(r["round"], row) for r in records for row in r["clients"] if row["client_id"] == client_id]
        trained = [(t, row["train_loss"]) for t, row in rows if row.get("trained", True)]
        loss_axis.plot([t for t, _ in trained], [loss for _, loss in trained], label=name)
        evaluated = [(t, row["test_ppl"]) for t, row in rows if "test_ppl" in row]
        ppl_axis.plot([t for t, _ in evaluated], [p for _, p in evaluated], marker="o", label=name)
    loss_axis.set(title="training loss", xlabel="round", ylabel="loss")
    ppl_axis.set(title="test perplexity", xlabel="round", ylabel="perplexity")
    ppl_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_routing(results: dict, path: Path) -> None:
    """Share of the mixing weight that goes to the generalists, per layer and client, at the final evaluation.

    The weight share, not the token share: with 1 generalist + 1 specialist and top-2 every token visits both.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [c for c in results["clients"] if c.get("routing")]
    if not clients:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    layers = len(clients[0]["routing"]["generalist_weight_share"])
    width = 0.8 / len(clients)
    for i, client in enumerate(clients):
        shares = client["routing"]["generalist_weight_share"]
        axis.bar([layer + i * width for layer in range(layers)], shares, width, label=client["name"])
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set(
        title=f"{results['strategy']}: mixing weight on generalists",
        xlabel="layer",
        ylabel="generalist weight share",
        ylim=(0, 1),
    )
    axis.set_xticks([layer + 0.4 - width / 2 for layer in range(layers)], [str(layer) for layer in range(layers)])
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
