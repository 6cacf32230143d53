"""Differential privacy of the shared update, the same on every transport (DP-FedAvg, McMahan et al., 2018).

Each client clips its update, the change of its shared tensors over the round, to an L2 norm of at most
`clipping_norm` over all of them ([`clip_update`], at the client step's `outgoing` point, so that what leaves the
client is the clipped update on every transport); the server averages the clipped updates with equal weights and adds
Gaussian noise of standard deviation `noise_multiplier * clipping_norm / m` to the mean of `m` updates
([`add_gaussian_noise`], after its aggregation). Adding or removing one client then moves the noised sum by at
most `clipping_norm`: each round is a Gaussian mechanism of noise multiplier `noise_multiplier`, and the guarantee is
per client (user level), over everything the client sends.

[`privacy_spent`] composes the rounds with opacus's RDP accountant and converts to `(epsilon, delta)`. It counts
every round with sampling rate 1 (no amplification by sampling): the clients of a round are a fixed-size draw (or
everyone), not the Poisson sample the amplification theorems need, so the figure is an upper bound.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import Algorithm

DEFAULT_DELTA = 1e-5


def update_norm(shared: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of `shared - reference` over every tensor together (fp64, so large tensors lose nothing)."""
    total = sum(float((shared[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    return math.sqrt(total)


def clip_update(
    shared: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clipping_norm: float
) -> dict[str, torch.Tensor]:
    """`reference + (shared - reference) * min(1, clipping_norm / ||shared - reference||)`: the shared tensors after
    a round with their update clipped in L2 norm over all of them (Flower's FlatClip), in each tensor's dtype.

    Args:
        shared (`Mapping[str, torch.Tensor]`): the client's shared tensors after its local steps.
        reference (`Mapping[str, torch.Tensor]`): the global shared tensors the round started from (same keys).
        clipping_norm (`float`): the bound, > 0.
    """
    norm = update_norm(shared, reference)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return dict(shared)
    return {
        key: (reference[key].double() + (shared[key].double() - reference[key].double()) * scale).to(shared[key].dtype)
        for key in shared
    }


def noise_std(noise_multiplier: float, clipping_norm: float, num_updates: int) -> float:
    """The standard deviation of the noise on the mean of `num_updates` clipped updates: `z * C / m`."""
    return noise_multiplier * clipping_norm / num_updates


def add_gaussian_noise(
    mean: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """`mean` plus independent Gaussian noise of standard deviation `std` on every value.

    The generator defaults to one seeded from the operating system's secure randomness, never from the recipe's
    seed: noise that a client could regenerate from the public seed would protect nothing.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    noised = {}
    for key, tensor in mean.items():
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
        noised[key] = (tensor.double() + noise).to(tensor.dtype)
    return noised


def privacy_spent(noise_multiplier: float, rounds: int, delta: float = DEFAULT_DELTA) -> list[float]:
    """Epsilon at `delta` after each of `rounds` Gaussian releases of noise multiplier `noise_multiplier`, from
    opacus's RDP accountant (sampling rate 1, see the module's note); `inf` without noise.

    Raises:
        `ImportError`: opacus is not installed (`pip install 'comigs-hf[dp]'`).
    """
    if noise_multiplier <= 0:
        return [math.inf] * rounds
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as error:
        raise ImportError(
            "The privacy budget is counted with opacus's RDP accountant: pip install 'comigs-hf[dp]'."
        ) from error
    accountant, epsilons = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        epsilons.append(float(accountant.get_epsilon(delta)))
    return epsilons


@dataclass(frozen=True)
class DifferentialPrivacy(Algorithm):
    """Client-side clipping of the shared update and Gaussian noise on the server's mean (the recipe keys
    `dp_clipping_norm` and `dp_noise_multiplier`).

    Args:
        clipping_norm (`float`): each client clips its update to this L2 norm over all its shared tensors, and the
            server refuses an update beyond it (`max_update_norm` becomes the smaller of the two, with a 1e-4
            relative margin for rounding).
        noise_multiplier (`float`, defaults to 0): the server adds Gaussian noise of standard deviation
            `noise_multiplier * clipping_norm / m` to the mean of a round's `m` updates. 0: clipping only, no
            privacy guarantee.

    Needs a server average with equal weights (`aggregation="weighted_mean"`, `weighting="uniform"`), so that the noise
    covers any one client.
    """

    clipping_norm: float
    noise_multiplier: float = 0.0

    clients_bound_updates = True

    def check(self, strategy) -> None:
        norm, noise = self.clipping_norm, self.noise_multiplier
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not 0 < norm < 1e30:
            raise ValueError(f"Strategy {strategy.name!r}: dp_clipping_norm must be a number > 0, not {norm}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < 1e30:
            raise ValueError(
                f"Strategy {strategy.name!r}: dp_noise_multiplier must be a finite number >= 0, not {noise}."
            )
        needs = {
            "a server average (no combination on the clients)": strategy.server_combines,
            "shared tensors": bool(strategy.shared_roles),
            "aggregation 'weighted_mean' (the noise covers one client's share of a mean)": (
                strategy.aggregation == "weighted_mean"
            ),
            "weighting 'uniform' (each clipped update weighs 1/m)": strategy.weighting == "uniform",
        }
        missing = [need for need, met in needs.items() if not met]
        if missing:
            raise ValueError(
                f"Strategy {strategy.name!r}: differential privacy (dp_clipping_norm={norm}) needs "
                f"{'; '.join(missing)}; this one shares {sorted(strategy.shared_roles) or 'nothing'}, aggregation "
                f"{strategy.aggregation!r}, weighting {strategy.weighting!r}."
            )

    def check_requirements(self) -> None:
        if self.noise_multiplier > 0 and importlib.util.find_spec("opacus") is None:
            # refused now rather than after the training, when results.json counts the budget
            raise ImportError("dp_noise_multiplier: opacus counts the privacy budget: pip install 'comigs-hf[dp]'.")

    def update_bound(self, bound: float | None) -> float | None:
        clipped = self.clipping_norm * (1 + 1e-4)  # an honest client's clipped norm, rounded in its own dtype
        return clipped if bound is None or bound > clipped else bound

    def outgoing(
        self, shared: dict[str, torch.Tensor], start: dict[str, torch.Tensor], round_index: int
    ) -> dict[str, torch.Tensor]:
        return clip_update(shared, start, self.clipping_norm)

    def after_aggregation(
        self, combined: dict[str, torch.Tensor], num_updates: int, noise_seed: int | None
    ) -> dict[str, torch.Tensor]:
        """Gaussian noise on the mean, from `noise_seed` (a secret the processes running the server step together
        share) or the operating system's randomness: the one step of a run that no recipe seed reproduces."""
        if self.noise_multiplier == 0:
            return combined
        std = noise_std(self.noise_multiplier, self.clipping_norm, num_updates)
        generator = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        return add_gaussian_noise(combined, std, generator)

    def report(self, rounds: int, delta: float) -> dict[str, Any]:
        """`results.json`'s `privacy`: the mechanism's settings and epsilon at `delta` after each of the `rounds`
        releases ([`privacy_spent`]; null, unbounded, when clipping comes without noise)."""
        spent = privacy_spent(self.noise_multiplier, rounds, delta)
        epsilons = [epsilon if math.isfinite(epsilon) else None for epsilon in spent]
        return {
            "privacy": {
                "mechanism": "gaussian (client-side clipping, noise on the server's mean)",
                "clipping_norm": self.clipping_norm,
                "noise_multiplier": self.noise_multiplier,
                "delta": delta,
                "accountant": "rdp (opacus), sampling rate 1",
                "epsilon": epsilons[-1] if epsilons else None,
                "epsilon_per_round": epsilons,
            }
        }


__all__ = [
    "DEFAULT_DELTA",
    "DifferentialPrivacy",
    "add_gaussian_noise",
    "clip_update",
    "noise_std",
    "privacy_spent",
    "update_norm",
]
