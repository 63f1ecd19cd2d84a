"""Optimizers with the official recipes' defaults, as classes so LightningCLI can print and override them.

``--model.generator_optimizer.lr 1e-5`` overrides one field; ``--print_config`` shows them all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class GeneratorAdamW(torch.optim.AdamW):
    """AdamW for the Self Forcing generator: lr 2e-6, betas (0, 0.999), weight decay 0.01 (notes §4.6)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-6,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class CriticAdamW(torch.optim.AdamW):
    """AdamW for the critic (fake score): lr 4e-7, betas (0, 0.999), weight decay 0.01 (notes §4.6)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 4e-7,
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class ODEAdamW(torch.optim.AdamW):
    """AdamW for ODE initialisation (CausVid's recipe): lr 2e-6, betas (0.9, 0.999), weight decay 0.01."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
