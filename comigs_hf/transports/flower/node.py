"""The node side of the round protocol on Flower: one client on its own SuperNode.

A [`FlowerNode`] holds one client ([`~comigs_hf.client.Client`], as on every transport: its model, its own data, its
state folder) and answers the three messages a ServerApp sends it:

```
query      describe()                 which client this node serves (its id and name)
train      train(content)             global of round t in, the client's round (`Client.train`), update out
evaluate   evaluate(content)          global after round t's aggregation in, test metrics out
```

Everything private (specialists, router, optimiser states, step counters, sampler) stays in the client's state
folder, saved atomically after each round it trains, so a restarted SuperNode resumes where it stopped. A train
message for a round the node has already trained from the same global (its reply was lost, or the SuperNode died
after saving) re-sends the saved update instead of training twice; a client that sat out rounds (partial
participation) trains from the global it receives.

These take built objects; `comigs_hf.flower_app` builds them from a recipe config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from ...client import Client
from ...client_state import client_folder_name
from ...strategies import Strategy
from ...trainer import ClientUpdate
from .messages import (
    SECURE_TRAIN_CONFIG,
    evaluation_to_reply,
    global_from_message,
    identity_to_reply,
    update_to_reply,
)
from .secure import is_secure_train, secure_reply


def _train_config(content: RecordDict):
    return content.config_records[SECURE_TRAIN_CONFIG if is_secure_train(content) else "config"]


def check_flower_strategy(strategy: Strategy) -> Strategy:
    """`strategy` if the Flower transport can carry it.

    Raises:
        `ValueError`: an algorithm of the strategy Flower cannot carry (see `Strategy.check_transport`): one whose
        clients combine each other's updates (there is no server step to run), or that pools every client's data on
        one machine (no node holds it).
    """
    return strategy.check_transport("flower")


@dataclass
class FlowerNode:
    """One client of a Flower federation, and where its model is saved after the last round.

    Args:
        client ([`~comigs_hf.client.Client`]): the client (one model may serve every node of a process, as one serves
            every client of an Accelerate rank); its strategy must pass [`check_flower_strategy`].
        models_dir (`str` or `os.PathLike`, *optional*): where the client's model is saved after the last round's
            evaluation (`models_dir/<client folder>`); `None` saves nothing.
        include_base (`bool`): save the frozen base beside the adapters.
        tokenizer (*optional*): saved with the model.
    """

    client: Client
    models_dir: str | os.PathLike | None = None
    include_base: bool = False
    tokenizer: Any = None

    def describe(self) -> RecordDict:
        """The reply to a query message."""
        return identity_to_reply(self.client.client_id, self.client.spec.name)

    def train(self, content: RecordDict) -> RecordDict:
        """The reply to a train message: round `t`'s update, and its test metrics right after the local steps when
        the message asks for them (`config.evaluate`).

        Raises:
            `ValueError`: the saved state is from a later round or another federation, or the round is out of
            `[1, rounds]`; [`~comigs_hf.server.InvalidUpdate`]: the server's global does not fit this client.
        """
        round_index, shared = global_from_message(content, self.client.shared_layout())
        if round_index > self.client.spec.rounds:
            raise ValueError(f"Round {round_index} is past the run's rounds={self.client.spec.rounds}.")
        evaluate = bool(_train_config(content).get("evaluate", False))
        update, evaluation = self.client.train(round_index, shared, evaluate=evaluate)
        return self._train_reply(content, update, shared, evaluation)

    def _train_reply(
        self, content: RecordDict, update: ClientUpdate, shared: dict[str, torch.Tensor], evaluation: dict | None
    ) -> RecordDict:
        plain = update_to_reply(update, self.client.spec.name, evaluation)
        if not is_secure_train(content):
            return plain
        # a secure round: the update (not the tensors) for secaggplus_mod to quantise and mask
        bound = float(_train_config(content).get("clipping-range", 0.0))
        return secure_reply(update, shared, plain, bound)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """The reply to an evaluate message: the test metrics of this client's private state with the global after
        round `t`'s aggregation (a client that did not train round `t` keeps the state of its last round). After the
        last round, the client's end-of-run step runs first (FD-LoRA's fusion), and its model is saved to
        `models_dir`."""
        client = self.client
        round_index, shared = global_from_message(content, client.shared_layout())
        last = round_index == client.spec.rounds
        if last:
            client.finish(shared)
        metrics = client.evaluate(round_index, shared)
        if last and self.models_dir is not None:
            directory = Path(self.models_dir) / client_folder_name(client.client_id, client.spec.name)
            client.save_model(directory, shared, include_base=self.include_base, tokenizer=self.tokenizer)
        return evaluation_to_reply(client.client_id, round_index, client.spec.name, metrics)


__all__ = ["FlowerNode", "check_flower_strategy"]
