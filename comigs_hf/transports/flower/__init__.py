"""The round protocol on Flower's Message API (the `flower` extra: `pip install 'comigs-hf[flower]'`).

`messages` defines what travels and checks whatever arrives; `node` answers the server's messages for one client
(the client step, its private state persisted on the node); `strategy` is the server (a Flower `Strategy` around the
server step); `secure` runs a round's train phase as Flower's SecAgg+. `comigs_hf.flower_app` builds them from a
recipe.
"""

from .messages import (
    arrays_to_shared,
    evaluation_from_reply,
    evaluation_to_reply,
    global_from_message,
    identity_from_reply,
    identity_to_reply,
    read_report,
    report_from_train_reply,
    shared_to_arrays,
    update_from_reply,
    update_to_reply,
)
from .node import FlowerNode, check_flower_strategy
from .secure import SecureAggregation, secure_aggregation_mod
from .strategy import CoMiGSStrategy, FederationIncomplete

__all__ = [
    "CoMiGSStrategy",
    "FederationIncomplete",
    "FlowerNode",
    "SecureAggregation",
    "arrays_to_shared",
    "check_flower_strategy",
    "evaluation_from_reply",
    "evaluation_to_reply",
    "global_from_message",
    "identity_from_reply",
    "identity_to_reply",
    "read_report",
    "report_from_train_reply",
    "secure_aggregation_mod",
    "shared_to_arrays",
    "update_from_reply",
    "update_to_reply",
]
