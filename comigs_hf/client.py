"""The client side of the round protocol: one object per client, the same on every transport.

A [`Client`] is a client of a federation: who it is and the run's settings ([`ClientSpec`]), its own data, the model
of its process (one model serves every client of a process, each swapped in for its turn) and the folder of its
private state. The Accelerate rounds, the Hub client and the Flower node all drive it through the same calls:

```
client.train(t, global)        round t's update: the client step (`run_client_round`), its state saved after it
client.receive(t, outcome)     what the server step sent back beside the global (PCL's peers' updates)
client.finish(global)          after the last round (FD-LoRA's fusion)
client.evaluate(t, global)     test metrics of its state after round t with the global after round t
```

Its private state (specialists, router, optimiser states, step counters, sampler) is saved after each round it
trains, atomically, as `state_dir/client-<i>/round-<t>.pt` in one format ([`STATE_FORMAT`]), checked against the run
when read (another federation's or recipe's state is refused) and read back with `torch.load(..., weights_only=True)`.
The last [`KEPT_STATES`] are kept: a round in progress, the last complete one and the one before, so that a run can
fall back to its previous checkpoint. A client that never trained has no file: its state is drawn from the run's seed
when needed, so a process holds one client's state at a time, whatever the number of clients. A round trained
already (its reply lost, its process killed after saving) sends the saved update again instead of training twice,
when the global it receives is the one it trained from.

What leaves a client is decided in one place, [`run_client_round`]: the strategy's shared roles and factors
(`partition_state_dict`), then its algorithms' `outgoing` point (differential privacy's clipping); the update's
`shared` tensors are exactly what every transport sends.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .client_state import activate_client, initial_client_state, saved_client_parameters
from .configuration_comigs import ROLES
from .data import ClientData
from .evaluation import EvaluationConfig, evaluate_client, evaluation_seed
from .modeling_comigs import CoMiGSForCausalLM
from .ranks import truncate_to_ranks
from .strategies import Strategy, partition_state_dict
from .trainer import ClientState, ClientUpdate, TrainingConfig, derived_seed, train_client_round

logger = logging.getLogger("comigs_hf.client")

STATE_FORMAT = "comigs-client-v1"
KEPT_STATES = 3


# ---- the client step -----------------------------------------------------------------------------------------------
def run_client_round(
    model: CoMiGSForCausalLM,
    state: ClientState,
    data: ClientData,
    shared: dict[str, torch.Tensor],
    strategy: Strategy,
    cfg: TrainingConfig,
    *,
    round_index: int,
    total_rounds: int,
    seed: int,
    accelerator: Accelerator,
) -> ClientUpdate:
    """One client's round: start from the global `shared` tensors, train locally, return what leaves the client.

    The client is swapped into `model`, seeded with [`~comigs_hf.trainer.derived_seed`]`(seed, round_index,
    client_id)` and trained ([`~comigs_hf.trainer.train_client_round`], every expert step's loss with the
    strategy's algorithms' penalties); the algorithms then change the trained tensors where they need to (HetLoRA's
    pruning), [`~comigs_hf.strategies.partition_state_dict`] splits them, and the algorithms' `outgoing` point
    decides what of the shared part leaves (differential privacy's clipping, PCL's rounds without combination). The
    client keeps everything it trained (the global replaces its shared tensors at the next round's start); only the
    update's `shared` leaves it.

    Args:
        model ([`CoMiGSForCausalLM`]): the process's model; the client's state is swapped into it.
        state ([`~comigs_hf.trainer.ClientState`]): the client's private state; updated in place.
        data ([`~comigs_hf.data.ClientData`]): the client's blocks.
        shared (`dict[str, torch.Tensor]`): the global shared tensors the round starts from (empty for `local`).
        strategy ([`~comigs_hf.strategies.Strategy`]): decides what is shared.
        cfg ([`~comigs_hf.trainer.TrainingConfig`]): the local optimisation.
        round_index (`int`): the round, from 1.
        total_rounds (`int`): rounds in the run; with `cfg.local_steps` it sets the length of the cosine schedule.
        seed (`int`): the run's seed.
        accelerator (`Accelerator`): device, autocast and backward.

    Returns:
        [`~comigs_hf.trainer.ClientUpdate`]: the shared tensors (on CPU), the training split's token count and the
        round's metrics.
    """
    state.expert_weights = None  # fusion weights are chosen after the last round: training mixes as the model does
    activate_client(model, state, shared)
    start = truncate_to_ranks({**state.parameters, **shared}, state.lora_ranks)
    torch.manual_seed(derived_seed(seed, round_index, state.client_id))
    received = {key: start[key] for key in shared}  # the global as this client holds it (at its ranks)
    penalties = [p for a in strategy.algorithms if (p := a.loss_penalty(model, state, received)) is not None]
    penalty = penalties[0] if len(penalties) == 1 else (lambda: sum(p() for p in penalties)) if penalties else None
    metrics = train_client_round(
        model,
        state,
        data,
        cfg,
        total_rounds * cfg.local_steps,
        accelerator,
        strategy.router_training,
        strategy.frozen_factors,
        penalty,
    )
    trained = {k: v.cpu() for k, v in model.role_state_dict(*ROLES).items()}
    for algorithm in strategy.algorithms:
        trained = algorithm.after_local_training(model, state, trained, start)
    outgoing = partition_state_dict(trained, strategy)[0]
    for algorithm in strategy.algorithms:
        outgoing = algorithm.outgoing(outgoing, shared, round_index)
    state.parameters = trained
    return ClientUpdate(
        client_id=state.client_id,
        round=round_index,
        shared=outgoing,
        train_tokens=data.num_train_tokens,
        metrics={**metrics, "tokens_seen": cfg.local_steps * cfg.batch_size * data.train.shape[1]},
    )


def global_digest(shared: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of a global shared state (names, dtypes, shapes and bytes): a saved update is sent again only
    for the global it was trained from."""
    digest = hashlib.sha256()
    for key in sorted(shared):
        tensor = shared[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- the client ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientSpec:
    """Who a client is in its federation and the run's settings that change what its rounds compute: the same on
    every transport, and checked against every state the client reads back.

    Args:
        client_id (`int`): the client's position in the data partition.
        name (`str`): its data partition's name.
        num_specialists (`int`): specialists it can afford.
        strategy ([`~comigs_hf.strategies.Strategy`]): what is shared and how.
        training ([`~comigs_hf.trainer.TrainingConfig`]): local optimisation.
        rounds (`int`): rounds in the run (sets the learning-rate schedule; a resumed run may add rounds).
        seed (`int`): the run's seed.
        evaluation ([`~comigs_hf.evaluation.EvaluationConfig`]): what an evaluation measures.
        top_k (`int`, *optional*): experts it mixes per token; `None` keeps the model's.
        lora_rank (`int`, *optional*): its experts' rank when below the model's; `None`: the model's `lora_r`.
        federation (`str`, *optional*): what names the federation beyond the recipe (a Hub repo id).
        init_from (`str`, *optional*): a saved client folder whose tensors its first state takes.
    """

    client_id: int
    name: str
    num_specialists: int
    strategy: Strategy
    training: TrainingConfig
    rounds: int
    seed: int
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    top_k: int | None = None
    lora_rank: int | None = None
    federation: str | None = None
    init_from: str | None = None

    def run_values(self) -> dict[str, Any]:
        """What a saved state must agree on with this run (the number of rounds may grow when a run resumes)."""
        return {
            "federation": self.federation,
            "strategy": self.strategy.name,
            "seed": self.seed,
            "name": self.name,
            "num_specialists": self.num_specialists,
            "top_k": self.top_k,
            "lora_rank": self.lora_rank,
        }


def _acts_at(algorithm: Any, point: str) -> bool:
    """Whether `algorithm` overrides the protocol's point `point`, so that a client reads its state only when one
    does (imported here: the algorithms' modules import this one)."""
    from .algorithms.base import Algorithm

    return getattr(type(algorithm), point) is not getattr(Algorithm, point)


class Client:
    """One client of a federation, on any transport: its data, the model of its process and its private state on
    disk (see the module's docstring).

    Args:
        spec ([`ClientSpec`]): who it is and the run's settings.
        model ([`CoMiGSForCausalLM`]): a model of the federation's layout; the client is swapped into it for each
            call (one model may serve every client of a process).
        data ([`~comigs_hf.data.ClientData`]): this client's data, and no other's.
        state_dir (`str` or `os.PathLike`): the folder of its private state (`<state_dir>/client-<i>/`; several
            clients may share one).
        accelerator (`Accelerator`): device, autocast and backward.
        mixed_test (`list[torch.Tensor]`, *optional*): every client's part of the out-of-distribution test mixture,
            where the process holds it (the Accelerate rounds); `None`: in-distribution figures only.
    """

    def __init__(
        self,
        spec: ClientSpec,
        model: CoMiGSForCausalLM,
        data: ClientData,
        state_dir: str | os.PathLike,
        accelerator: Accelerator,
        mixed_test: list[torch.Tensor] | None = None,
    ):
        self.spec, self.model, self.data, self.accelerator = spec, model, data, accelerator
        self.state_dir = Path(state_dir)
        self.mixed_test = mixed_test

    @property
    def client_id(self) -> int:
        return self.spec.client_id

    @property
    def directory(self) -> Path:
        """Where its states are saved: `<state_dir>/client-<i>/round-<t>.pt`."""
        return self.state_dir / f"client-{self.client_id}"

    # ---- its saved states --------------------------------------------------------------------------------------
    def saved_rounds(self) -> list[int]:
        """The rounds whose state is saved, newest first."""
        if not self.directory.is_dir():
            return []
        rounds = []
        for path in self.directory.iterdir():
            number = path.name.removeprefix("round-").removesuffix(".pt")
            if number.isdecimal() and path.name == f"round-{int(number)}.pt":
                rounds.append(int(number))
        return sorted(rounds, reverse=True)

    def read_state(self, round_index: int) -> dict[str, Any]:
        """The state saved after round `round_index`, checked: its format, its client and this run.

        Raises:
            `ValueError`: naming the file: unreadable, not this client's state, or another federation's or recipe's
            (every differing setting with both values).
        """
        path = self.directory / f"round-{round_index}.pt"
        try:  # weights_only: tensors, numbers, strings and plain containers, never arbitrary objects
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or garbage file: any reader's error, named with the file
            raise ValueError(f"{path} is unreadable ({type(error).__name__}).") from None
        if (
            not isinstance(saved, dict)
            or saved.get("format") != STATE_FORMAT
            or saved.get("client_id") != self.client_id
        ):
            raise ValueError(f"{path} is not the saved state of client {self.client_id} ({STATE_FORMAT!r}).")
        run, expected = saved.get("run"), self.spec.run_values()
        run = run if isinstance(run, dict) else {}
        differing = [
            f"{key}={run.get(key)!r}, now {value!r}" for key, value in expected.items() if run.get(key) != value
        ]
        if differing:
            raise ValueError(f"{path} belongs to another federation or recipe: {'; '.join(differing)}.")
        return saved

    def latest_state(self, round_index: int | None = None) -> tuple[ClientState, dict[str, Any] | None]:
        """Its state after round `round_index` (the newest saved at or before it; `None`: the newest of all) and its
        saved record, or the state drawn before round 1 and `None` when it saved none."""
        rounds = [r for r in self.saved_rounds() if round_index is None or r <= round_index]
        if not rounds:
            return self.fresh_state(), None
        saved = self.read_state(rounds[0])
        return ClientState.from_checkpoint(saved["state"]), saved

    def fresh_state(self) -> ClientState:
        """Its state before round 1 (see [`initial_client_state`]), from its `init_from` folder where it has one."""
        spec = self.spec
        state = initial_client_state(
            self.model,
            spec.client_id,
            spec.name,
            spec.num_specialists,
            spec.seed,
            spec.top_k,
            frozen_factors=spec.strategy.frozen_factors,
            lora_rank=spec.lora_rank,
        )
        if spec.init_from is not None:
            state.parameters = saved_client_parameters(spec.init_from, state.parameters, self.model)
        return state

    def shared_layout(self) -> dict[str, torch.Tensor]:
        """The names, shapes and dtypes of the global this client takes (on the meta device): the shared part of
        its layout at the model's rank (nothing of its state is read)."""
        spec = self.spec
        self.model.set_num_specialists(spec.num_specialists, spec.top_k)
        tensors = {name: p.detach().to("meta") for name, p in self.model.named_parameters_by_role(*ROLES)}
        return partition_state_dict(tensors, spec.strategy)[0]

    def _save(self, record: dict[str, Any], retrained: bool = False) -> None:
        """Write `record` as the state after its round, atomically (written beside, flushed, renamed: a kill at any
        point leaves the previous file whole); only the newest `KEPT_STATES` stay, and a `retrained` round drops the
        states of later rounds, trained from the one it replaces."""
        path = self.directory / f"round-{record['round']}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(staging, "wb") as handle:
            torch.save(
                {"format": STATE_FORMAT, "client_id": self.client_id, "run": self.spec.run_values(), **record}, handle
            )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
        rounds = self.saved_rounds()
        later = [r for r in rounds if r > record["round"]] if retrained else []
        for stale in later + [r for r in rounds if r not in later][KEPT_STATES:]:
            (self.directory / f"round-{stale}.pt").unlink(missing_ok=True)

    # ---- the round protocol ------------------------------------------------------------------------------------
    def train(
        self, round_index: int, shared: dict[str, torch.Tensor], *, evaluate: bool = False
    ) -> tuple[ClientUpdate, dict[str, Any] | None]:
        """Round `round_index`'s update, trained from the global `shared` and the client's state after its last
        round before this one, and (with `evaluate`) its test metrics right after the local steps; its state is
        saved after it. A round saved already from this very global is sent again, not trained twice.

        Raises:
            `ValueError`: the client saved a later round and not this one (its state belongs to another run), or its
            state is unreadable or another federation's.
        """
        digest = global_digest(shared)
        rounds = self.saved_rounds()
        if round_index in rounds:
            try:
                saved = self.read_state(round_index)
            except ValueError as error:  # retrained below, and saved over it
                logger.warning("client %d: %s Training round %d again.", self.client_id, error, round_index)
            else:
                if saved["global"] == digest:
                    return ClientUpdate(self.client_id, round_index, **saved["update"]), saved["evaluation"]
        elif rounds and rounds[0] > round_index:
            raise ValueError(
                f"Client {self.client_id} has trained up to round {rounds[0]} ({self.directory}), past round "
                f"{round_index}: its state belongs to another run."
            )
        state, _ = self.latest_state(round_index - 1)
        spec = self.spec
        update = run_client_round(
            self.model,
            state,
            self.data,
            shared,
            spec.strategy,
            spec.training,
            round_index=round_index,
            total_rounds=spec.rounds,
            seed=spec.seed,
            accelerator=self.accelerator,
        )
        evaluation = self._test_metrics(round_index, self.data.test, self.client_id) if evaluate else None
        saved_update = {"shared": update.shared, "train_tokens": update.train_tokens, "metrics": update.metrics}
        record = {"round": round_index, "global": digest, "update": saved_update, "evaluation": evaluation}
        self._save({**record, "state": state.to_checkpoint()}, retrained=True)
        return update, evaluation

    def receive(self, round_index: int, outcome: Any) -> None:
        """The step after the server's (`outcome`, a `comigs_hf.server.RoundOutcome`), on a client that trained
        round `round_index`: the strategy's algorithms' `receive` point (PCL's combination); its state is saved again
        when one changes it."""
        self._after(
            round_index, lambda algorithm, state: algorithm.receive(self, state, round_index, outcome), "receive"
        )

    def finish(self, shared: dict[str, torch.Tensor]) -> None:
        """The step after the last round, with the final global: the algorithms' `finish` point (FD-LoRA's
        fusion); its state is saved again when one changes it."""
        self._after(None, lambda algorithm, state: algorithm.finish(self, state, shared), "finish")

    def _after(self, round_index: int | None, step, point: str) -> None:
        algorithms = [algorithm for algorithm in self.spec.strategy.algorithms if _acts_at(algorithm, point)]
        if not algorithms:
            return
        state, saved = self.latest_state(round_index)
        changed = [step(algorithm, state) for algorithm in algorithms]
        if any(changed):
            record = saved if saved is not None else {"round": 0, "global": None, "update": None, "evaluation": None}
            record = {key: record[key] for key in ("round", "global", "update", "evaluation")}
            self._save({**record, "state": state.to_checkpoint()})

    def evaluate(
        self,
        round_index: int,
        shared: dict[str, torch.Tensor],
        *,
        test: torch.Tensor | None = None,
        evaluated_id: int | None = None,
    ) -> dict[str, Any]:
        """The test metrics of its state after round `round_index` with the global `shared` after that round (see
        `comigs_hf.evaluation.evaluate_client`), and its fusion weights where it fused.

        Args:
            test (`torch.Tensor`, *optional*): another client's test split it serves (a pooled client serving every
                client's evaluation), as client `evaluated_id`; defaults to its own.

        A strategy that shares nothing has nothing aggregated: its figures are those measured right after its local
        steps in that round, when it measured them.
        """
        state, saved = self.latest_state(round_index)
        own = test is None
        if own and not self.spec.strategy.shared_roles and saved is not None and saved["round"] == round_index:
            if saved["evaluation"] is not None:
                return dict(saved["evaluation"])
        activate_client(self.model, state, shared)
        evaluated_id = self.client_id if evaluated_id is None else evaluated_id
        metrics = self._test_metrics(round_index, self.data.test if own else test, evaluated_id)
        if state.expert_weights is not None:
            metrics["fusion_weights"] = list(state.expert_weights)
        return metrics

    def _test_metrics(self, round_index: int, test: torch.Tensor, evaluated_id: int) -> dict[str, Any]:
        seed = evaluation_seed(self.spec.seed, round_index, evaluated_id)
        return evaluate_client(
            self.model, test, self.spec.evaluation, self.accelerator, seed=seed, mixed_test=self.mixed_test
        )

    def save_model(
        self,
        directory: str | os.PathLike,
        shared: dict[str, torch.Tensor],
        *,
        include_base: bool = False,
        tokenizer: Any = None,
    ) -> None:
        """Save the client's model (its newest state with the global `shared`) as `save_pretrained` does, with the
        tokenizer when given."""
        state, _ = self.latest_state()
        activate_client(self.model, state, shared)
        self.model.save_pretrained(directory, include_base=include_base)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


__all__ = ["KEPT_STATES", "STATE_FORMAT", "Client", "ClientSpec", "global_digest", "run_client_round"]
