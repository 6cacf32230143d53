"""Generalists shared through the Hugging Face Hub: push and pull by round, model cards, Hub-mediated rounds.

- `repo`: push a generalist as a PEFT adapter in one commit tagged `round-<t>`, pull a round, push a whole client
  model (opt-in).
- `cards`: the model cards of generalists and client models.
- `updates`: what a client uploads in a Hub-mediated round (`submit_update`).
- `aggregator`: `aggregate_round`, the server side of a Hub-mediated round.
- `client`: a client's round through the Hub (`run_hub_client_round`), the round-1 seed and evaluation.
- `federation`: the federation's manifest (its clients and Hub users, fixed at the seed) and which commits to trust.

Hub-mediated rounds use one shared model repo:

```
README.md, adapter_config.json, adapter_model.safetensors   global generalist, tagged round-<t>
aggregation.json                                             report of the aggregation that produced it
federation.json                                              the manifest, in the round-1 commit
updates/round-<t>/<client_id>/...                            a client's generalist after local training in round t
```
"""

from .aggregator import aggregate_round
from .cards import hub_base_model, render_client_model_card, render_generalist_card, template_path
from .client import evaluate_hub_client, hub_client_id, run_hub_client_round, seed_hub_rounds
from .federation import MANIFEST_NAME, FederationManifest, check_client_id, read_manifest
from .repo import check_hub_strategy, pull_global, push_client_model_to_hub, push_generalist_to_hub, round_tag
from .report import AcceptedUpdate, AggregationReport, RejectedUpdate
from .updates import submit_update, update_folder

__all__ = [
    "MANIFEST_NAME",
    "AcceptedUpdate",
    "AggregationReport",
    "FederationManifest",
    "RejectedUpdate",
    "aggregate_round",
    "check_client_id",
    "check_hub_strategy",
    "evaluate_hub_client",
    "hub_base_model",
    "hub_client_id",
    "pull_global",
    "push_client_model_to_hub",
    "push_generalist_to_hub",
    "read_manifest",
    "render_client_model_card",
    "render_generalist_card",
    "round_tag",
    "run_hub_client_round",
    "seed_hub_rounds",
    "submit_update",
    "template_path",
    "update_folder",
]
