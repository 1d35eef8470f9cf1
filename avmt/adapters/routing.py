"""Token routing shared by I-LoRA and MoE-LoRA: softmax/top-k gates, auxiliary losses, statistics."""

from __future__ import annotations

import torch

from .base import AdaptedLayer

__all__ = ["route", "router_aux_loss", "cv_squared", "switch_balance_loss", "router_z_loss", "RoutedLayer"]


def route(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights from router logits, computed in fp32.

    Args:
        logits: ``[N, K]`` router logits (any float dtype).
        temperature: softmax temperature τ (> 0).
        top_k: keep the ``top_k`` largest probabilities per token and renormalize them to sum 1
            (``None`` = dense routing).

    Returns:
        ``(probs, weights)``, both fp32 ``[N, K]``: the dense softmax and the weights actually
        used (equal to ``probs`` when ``top_k`` is None).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is None:
        return probs, probs
    vals, idx = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True)
    return probs, torch.zeros_like(probs).scatter(-1, idx, vals)


def cv_squared(importance: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean²`` of a ``[K]`` vector (0 when K = 1).

    LoRAMoE / Shazeer et al. balance loss when applied to the per-head sum of routing weights.
    """
    importance = importance.float()
    if importance.numel() <= 1:
        return importance.sum() * 0.0
    return importance.var() / (importance.mean() ** 2 + 1e-10)


def switch_balance_loss(probs: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``K · Σ_k f_k · P_k`` (1 for perfect balance).

    Args:
        probs: ``[N, K]`` dense router probabilities (fp32).
        top_k: tokens dispatched per token (``None`` → 1, i.e. the arg-max head, as in Switch).
            ``f_k`` is the fraction of dispatch slots going to head k, ``P_k`` the mean probability.
    """
    n, k = probs.shape
    slots = 1 if top_k is None else min(top_k, k)
    idx = probs.topk(slots, dim=-1).indices  # [N, slots]
    frac = torch.zeros(k, device=probs.device, dtype=probs.dtype).scatter_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device, dtype=probs.dtype)
    ) / max(n * slots, 1)
    return k * (frac * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits / τ)²``. ``logits``: ``[N, K]``."""
    return torch.logsumexp(logits.float() / temperature, dim=-1).pow(2).mean()


def router_aux_loss(
    logits: torch.Tensor,
    probs: torch.Tensor,
    weights: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    balance_coef: float,
    switch_coef: float,
    z_loss_coef: float,
) -> torch.Tensor | None:
    """Weighted sum of the auxiliary router losses whose coefficient is > 0 (None if none).

    Args:
        logits, probs, weights: ``[N, K]`` router logits, dense probabilities, used weights.
    """
    total = None
    if balance_coef > 0:
        total = balance_coef * cv_squared(weights.sum(dim=0))
    if switch_coef > 0:
        t = switch_coef * switch_balance_loss(probs, top_k)
        total = t if total is None else total + t
    if z_loss_coef > 0:
        t = z_loss_coef * router_z_loss(logits, temperature)
        total = t if total is None else total + t
    return total


class RoutedLayer(AdaptedLayer):
    """Adapted layer with a token router: keeps the last aux loss and running router statistics.

    Statistics (sum of routing weights per head ``[K]``, per-token entropy sum, token count) are
    detached and accumulate over every forward (train and eval) until :meth:`reset_router_stats`.
    They are plain attributes, not buffers, so they never enter a state dict and DDP never
    broadcasts them.
    """

    num_heads: int
    track_router_stats: bool = True

    def _init_routing(self) -> None:
        self._aux: torch.Tensor | None = None
        self.reset_router_stats()

    def reset_router_stats(self) -> None:
        """Zero the accumulated routing statistics."""
        self._stat_weight_sum: torch.Tensor | None = None  # [K] fp32
        self._stat_entropy_sum: torch.Tensor | None = None  # [] fp32
        self._stat_tokens = 0

    @torch.no_grad()
    def _accumulate(self, weights: torch.Tensor) -> None:
        """Add a ``[N, K]`` batch of routing weights to the statistics (no host sync)."""
        w = weights.detach().float()
        wsum = w.sum(dim=0)
        ent = torch.special.entr(w).sum()
        if self._stat_weight_sum is None or self._stat_weight_sum.device != w.device:
            self._stat_weight_sum = torch.zeros_like(wsum)
            self._stat_entropy_sum = torch.zeros_like(ent)
            self._stat_tokens = 0
        self._stat_weight_sum += wsum
        self._stat_entropy_sum += ent
        self._stat_tokens += w.shape[0]

    def router_mean(self) -> torch.Tensor | None:
        """Mean routing weight per head ``[K]`` since the last reset (None if no token yet)."""
        if not self._stat_tokens:
            return None
        return self._stat_weight_sum / self._stat_tokens

    def router_entropy(self) -> torch.Tensor | None:
        """Mean per-token routing entropy (nats, scalar) since the last reset (None if no token)."""
        if not self._stat_tokens:
            return None
        return self._stat_entropy_sum / self._stat_tokens

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary router loss of the last forward (None when every coefficient is 0)."""
        return self._aux

    def _after_routing(self, logits: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor) -> None:
        self._aux = router_aux_loss(
            logits,
            probs,
            weights,
            temperature=self.temperature,
            top_k=self.top_k,
            balance_coef=self.balance_coef,
            switch_coef=self.switch_coef,
            z_loss_coef=self.z_loss_coef,
        )
        if self.track_router_stats:
            self._accumulate(weights)

    @property
    def needs_routing_outputs(self) -> bool:
        """Whether aux losses or statistics need the routing weights outside a fused kernel."""
        return self.track_router_stats or self.balance_coef > 0 or self.switch_coef > 0 or self.z_loss_coef > 0
