"""Warmup-Stable-Decay learning rate (the Nemotron 3 pretraining schedule; nemotron3_spec.md §5).

    warmup  (step < W):          lr = peak * (step + 1) / W                 linear from ~0
    stable  (W <= step < S):     lr = peak                                   S = total * (1 - decay_fraction)
    decay   (S <= step < total): lr = floor + (peak - floor) * shape(p),    p = (step - S) / (total - S)
        shape: minus_sqrt 1 - sqrt(p) (Super, and Hägele et al. 2024), linear 1 - p, cosine (1 + cos(pi p)) / 2
Nano and Super decay over the last 20% to 1% of the peak (Nano 1e-3 -> 1e-5, Super 4.5e-4 -> 4.5e-6). A stable
phase makes a run extendable: resume from a stable-phase checkpoint with a larger total and decay later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = ("minus_sqrt", "linear", "cosine")


@dataclass
class WSDSchedule:
    peak_lr: float = 1e-3
    """Learning rate of the stable phase."""
    total_steps: int = 1000
    """Optimizer steps in the whole run; the decay ends here."""
    warmup_steps: int = 100
    """Linear warmup from ~0 to peak_lr."""
    decay_fraction: float = 0.2
    """Share of total_steps spent decaying (Nemotron 3: the last 20%)."""
    min_lr_ratio: float = 0.01
    """Learning rate at the end as a fraction of the peak (Nemotron 3: 1%)."""
    decay_shape: str = "minus_sqrt"
    """minus_sqrt (Nemotron 3 Super), linear or cosine."""

    def __post_init__(self):
        if not self.peak_lr > 0:
            raise ValueError(f"peak_lr={self.peak_lr} must be > 0.")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}) "
                             f"and total_steps >= 1.")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} and min_lr_ratio={self.min_lr_ratio} must lie "
                             f"in [0, 1].")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={self.decay_shape!r}; choose one of {DECAY_SHAPES}.")
        if self.warmup_steps > self.decay_start:
            raise ValueError(f"warmup ({self.warmup_steps} steps) runs into the decay, which starts at step "
                             f"{self.decay_start}; shorten the warmup or the decay_fraction.")

    @property
    def decay_start(self) -> int:
        return self.total_steps - round(self.total_steps * self.decay_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        p = min(1.0, (step - self.decay_start) / max(1, self.total_steps - self.decay_start))
        shape = {"minus_sqrt": 1 - math.sqrt(p), "linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2}
        floor = self.peak_lr * self.min_lr_ratio
        return floor + (self.peak_lr - floor) * shape[self.decay_shape]
