"""The node side of the round protocol on Flower: one client on its own SuperNode.

A [`FlowerNode`] holds one client's model and its own data, and answers the three messages a ServerApp sends it:

```
query      describe()                 which client this node serves (its id and name)
train      train(content)             global of round t in, the client step (`trainer.run_client_round`), update out
evaluate   evaluate(content)          global after round t's aggregation in, test metrics out
```

Everything private (specialists, router, optimiser states, step counters, sampler) stays in
`state_dir/client-<i>.pt`, replaced atomically after each train and read back with `torch.load(...,
weights_only=True)`, so a restarted SuperNode resumes where it stopped. A train message for a round the node has
already trained (its reply was lost, or the SuperNode died after saving) re-sends the saved update instead of
training twice; a client that sat out rounds (partial participation) trains from the global it receives.

These take built objects; `comigs_hf.flower_app` builds them from a recipe config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from flwr.app import RecordDict

from ..data import ClientData
from ..evaluation import EvaluationConfig, evaluate_client, evaluation_seed, fusion_seed, fusion_weights
from ..modeling_comigs import CoMiGSForCausalLM
from ..strategies import Strategy, partition_state_dict
from ..trainer import (
    ClientState,
    ClientUpdate,
    TrainingConfig,
    activate_client,
    check_saved_run,
    client_folder_name,
    initial_client_state,
    run_client_round,
    save_state_atomically,
)
from .messages import (
    SECURE_TRAIN_CONFIG,
    evaluation_to_reply,
    global_from_message,
    identity_to_reply,
    update_to_reply,
)
from .secure import is_secure_train, secure_reply

STATE_FORMAT = "comigs-flower-node-v1"
# a node's state must come from the same federation: these values change what a round computes
_RUN_KEYS = ("strategy", "seed", "rounds", "name", "num_specialists", "top_k", "lora_rank")


def _train_config(content: RecordDict):
    return content.config_records[SECURE_TRAIN_CONFIG if is_secure_train(content) else "config"]


def check_flower_strategy(strategy: Strategy) -> Strategy:
    """`strategy` if the Flower transport can carry it.

    Raises:
        `ValueError`: a strategy whose clients combine each other's updates (PCL: there is no server step to run) or
        that pools every client's data on one machine (centralized: no node holds it).
    """
    if strategy.aggregator == "clients":
        raise ValueError(
            f"Strategy {strategy.name!r} has each client combine every other client's update itself; Flower's "
            "nodes exchange messages with the server only. Run it over Accelerate."
        )
    if strategy.pool_clients:
        raise ValueError(
            f"Strategy {strategy.name!r} trains one model on every client's data pooled together; a Flower node "
            "holds its own data only. Run it over Accelerate."
        )
    return strategy


@dataclass
class FlowerNode:
    """One client of a Flower federation: its model, its own data, and the run's settings (the same on every node).

    Args:
        model ([`CoMiGSForCausalLM`]): a model of the federation's layout; the client is swapped into it (one model
            may serve every node of a process, as one serves every client of an Accelerate rank).
        data ([`~comigs_hf.data.ClientData`]): this client's data, and no other's.
        client_id (`int`): the client's position in the data partition (the node config's `partition-id`).
        num_specialists (`int`): its specialists.
        strategy ([`~comigs_hf.strategies.Strategy`]): what is shared; see [`check_flower_strategy`].
        training ([`~comigs_hf.trainer.TrainingConfig`]): local optimisation.
        rounds (`int`): rounds in the run (sets the learning-rate schedule).
        seed (`int`): the run's seed.
        state_dir (`str` or `os.PathLike`): the node's private folder.
        accelerator (`Accelerator`): one process.
        evaluation ([`~comigs_hf.evaluation.EvaluationConfig`]): what an evaluation measures (in distribution only:
            a node holds no other client's test data).
        top_k (`int`, *optional*): experts it mixes per token; `None` keeps the model's.
        lora_rank (`int`, *optional*): its experts' rank when below the model's; `None`: the model's `lora_r`.
        models_dir (`str` or `os.PathLike`, *optional*): where the client's model is saved after the last round's
            evaluation (`models_dir/<client folder>`); `None` saves nothing.
        include_base (`bool`): save the frozen base beside the adapters.
        tokenizer (*optional*): saved with the model.
    """

    model: CoMiGSForCausalLM
    data: ClientData
    client_id: int
    num_specialists: int
    strategy: Strategy
    training: TrainingConfig
    rounds: int
    seed: int
    state_dir: str | os.PathLike
    accelerator: Accelerator
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    top_k: int | None = None
    lora_rank: int | None = None
    models_dir: str | os.PathLike | None = None
    include_base: bool = False
    tokenizer: Any = None

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) / f"client-{self.client_id}.pt"

    def _run_values(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "seed": self.seed,
            "rounds": self.rounds,
            "name": self.data.name,
            "num_specialists": self.num_specialists,
            "top_k": self.top_k,
            "lora_rank": self.lora_rank,
        }

    def _load(self) -> dict[str, Any] | None:
        path = self.state_path
        if not path.is_file():
            return None
        try:  # weights_only: tensors, numbers, strings and plain containers, never arbitrary objects
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} is unreadable ({type(error).__name__}).") from None
        if (
            not isinstance(saved, dict)
            or saved.get("format") != STATE_FORMAT
            or saved.get("client_id") != self.client_id
        ):
            raise ValueError(f"{path} is not the Flower node state of client {self.client_id} ({STATE_FORMAT!r}).")
        check_saved_run(saved["run"], self._run_values(), _RUN_KEYS, path)
        return saved

    def _fresh_state(self) -> ClientState:
        return initial_client_state(
            self.model,
            self.client_id,
            self.data.name,
            self.num_specialists,
            self.seed,
            self.top_k,
            frozen_factors=self.strategy.frozen_factors,
            lora_rank=self.lora_rank,
        )

    def _reference(self, state: ClientState) -> dict[str, torch.Tensor]:
        # the layout of the global this client can take: the shared part of its own tensors (at the model's rank)
        return {k: v.to("meta") for k, v in partition_state_dict(state.parameters, self.strategy)[0].items()}

    def describe(self) -> RecordDict:
        """The reply to a query message."""
        return identity_to_reply(self.client_id, self.data.name)

    def train(self, content: RecordDict) -> RecordDict:
        """The reply to a train message: round `t`'s update, and its test metrics right after the local steps when
        the message asks for them (`config.evaluate`).

        Raises:
            `ValueError`: the saved state is from a later round or another federation, or the round is out of
            `[1, rounds]`; [`~comigs_hf.server.InvalidUpdate`]: the server's global does not fit this client.
        """
        saved = self._load()
        state = ClientState.from_checkpoint(saved["state"]) if saved is not None else self._fresh_state()
        round_index, shared = global_from_message(content, self._reference(state))
        if round_index > self.rounds:
            raise ValueError(f"Round {round_index} is past the run's rounds={self.rounds}.")
        done = saved["round"] if saved is not None else 0
        if done > round_index:
            raise ValueError(
                f"Client {self.client_id} has trained up to round {done} ({self.state_path}), past round "
                f"{round_index}: its state belongs to another run."
            )
        if done == round_index:  # trained and saved by a call whose reply was lost: send the same update again
            update = ClientUpdate(self.client_id, round_index, **saved["update"])
            return self._train_reply(content, update, shared, saved["evaluation"])
        update = run_client_round(
            self.model,
            state,
            self.data,
            shared,
            self.strategy,
            self.training,
            round_index=round_index,
            total_rounds=self.rounds,
            seed=self.seed,
            accelerator=self.accelerator,
        )
        evaluation = None
        if bool(_train_config(content).get("evaluate", False)):
            evaluation = self._test_metrics(round_index)  # the model still holds what it trained
        saved_update = {"shared": update.shared, "train_tokens": update.train_tokens, "metrics": update.metrics}
        self._save(round_index, state, saved_update, evaluation)
        return self._train_reply(content, update, shared, evaluation)

    def _train_reply(
        self, content: RecordDict, update: ClientUpdate, shared: dict[str, torch.Tensor], evaluation: dict | None
    ) -> RecordDict:
        plain = update_to_reply(update, self.data.name, evaluation)
        if not is_secure_train(content):
            return plain
        # a secure round: the update (not the tensors) for secaggplus_mod to quantise and mask
        bound = float(_train_config(content).get("clipping-range", 0.0))
        return secure_reply(update, shared, plain, bound)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """The reply to an evaluate message: the test metrics of this client's private state with the global after
        round `t`'s aggregation (a client that did not train round `t` keeps the state of its last round). After the
        last round, FD-LoRA's clients first fuse their experts, and the client's model is saved to `models_dir`.

        A strategy that shares nothing has nothing aggregated: the figures are those measured right after the local
        steps, as the Accelerate rounds report them."""
        saved = self._load()
        state = ClientState.from_checkpoint(saved["state"]) if saved is not None else self._fresh_state()
        round_index, shared = global_from_message(content, self._reference(state))
        if not self.strategy.shared_roles and saved is not None and saved["round"] == round_index:
            if saved["evaluation"] is not None:
                return evaluation_to_reply(self.client_id, round_index, self.data.name, saved["evaluation"])
        activate_client(self.model, state, shared)
        last = round_index == self.rounds
        if last and self.strategy.fusion_budget and state.expert_weights is None:
            weights, _ = fusion_weights(
                self.model,
                self.data.validation,
                self.strategy,
                self.evaluation,
                self.accelerator,
                fusion_seed(self.seed, self.client_id),
            )
            state.expert_weights = weights
            activate_client(self.model, state, shared)
            if saved is not None:
                self._save(saved["round"], state, saved["update"], saved["evaluation"])
        metrics = self._test_metrics(round_index)
        if state.expert_weights is not None:
            metrics["fusion_weights"] = list(state.expert_weights)
        if last and self.models_dir is not None:
            directory = Path(self.models_dir) / client_folder_name(self.client_id, self.data.name)
            self.model.save_pretrained(directory, include_base=self.include_base)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
        return evaluation_to_reply(self.client_id, round_index, self.data.name, metrics)

    def _test_metrics(self, round_index: int) -> dict[str, Any]:
        seed = evaluation_seed(self.seed, round_index, self.client_id)
        return evaluate_client(self.model, self.data.test, self.evaluation, self.accelerator, seed=seed)

    def _save(self, round_index: int, state: ClientState, update: dict, evaluation: dict | None) -> None:
        save_state_atomically(
            self.state_path,
            {
                "format": STATE_FORMAT,
                "client_id": self.client_id,
                "round": round_index,
                "run": self._run_values(),
                "state": state.to_checkpoint(),
                "update": update,
                "evaluation": evaluation,
            },
        )


__all__ = ["STATE_FORMAT", "FlowerNode", "check_flower_strategy"]
