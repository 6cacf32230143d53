"""Differential privacy of the shared update, the same on every transport (DP-FedAvg, McMahan et al., 2018).

Each client clips its update, the change of its shared tensors over the round, to an L2 norm of at most
`clipping_norm` over all of them ([`clip_update`], in the client step); the server averages the clipped updates with
equal weights and adds Gaussian noise of standard deviation `noise_multiplier * clipping_norm / m` to the mean of `m`
updates ([`add_gaussian_noise`], in the server step). Adding or removing one client then moves the noised sum by at
most `clipping_norm`: each round is a Gaussian mechanism of noise multiplier `noise_multiplier`, and the guarantee is
per client (user level), over everything the client sends.

[`privacy_spent`] composes the rounds with opacus's RDP accountant and converts to `(epsilon, delta)`. It counts
every round with sampling rate 1 (no amplification by sampling): the clients of a round are a fixed-size draw (or
everyone), not the Poisson sample the amplification theorems need, so the figure is an upper bound.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch

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


__all__ = ["DEFAULT_DELTA", "add_gaussian_noise", "clip_update", "noise_std", "privacy_spent", "update_norm"]
