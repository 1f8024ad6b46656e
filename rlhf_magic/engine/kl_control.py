"""The KL coefficient of PPO's per-token penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019)."""

from __future__ import annotations

import math

import torch


class AdaptiveKLController:
    """Ziegler et al. 2019 (as TRL): e = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.

    `n_steps` is the number of samples (episodes) since the last update, `horizon` is in the same unit.
    A non-finite current_kl leaves the value unchanged (TRL would turn it into NaN).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        kl = float(current_kl)
        if math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient with AdaptiveKLController's interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value
