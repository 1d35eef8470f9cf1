"""Token routing shared by I-LoRA and MoE-LoRA: softmax/top-k gates, auxiliary losses, statistics,
the stacked routed-LoRA layer both are built on, and the routing options of their plugins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdaptedLayer, Adapter

from avmt.errors import UserError

__all__ = [
    "route",
    "router_aux_loss",
    "cv_squared",
    "switch_balance_loss",
    "router_z_loss",
    "validate_routing_args",
    "RoutedLayer",
    "RoutedLoRALinear",
    "RoutedAdapter",
]


def route(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights from router logits, computed in fp32 (fp64 for fp64 logits).

    Args:
        logits: ``[N, K]`` router logits (any float dtype).
        temperature: softmax temperature τ (> 0).
        top_k: keep the ``top_k`` largest probabilities per token and renormalize them to sum 1
            (``None`` = dense routing).

    Returns:
        ``(probs, weights)``, both ``[N, K]`` in that dtype: the dense softmax and the weights
        actually used (equal to ``probs`` when ``top_k`` is None).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)
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


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_routing_args(
    count: int,
    temperature: float,
    top_k: int | None,
    balance_coef: float,
    switch_coef: float,
    z_loss_coef: float,
    count_name: str = "num_heads",
) -> None:
    """Raise ValueError naming the first invalid routing option (``count`` = K heads or experts)."""
    if not _is_int(count) or count < 1:
        raise UserError(f"{count_name} must be a positive integer, got {count!r}")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= count):
        raise UserError(f"top_k must be None or an integer in [1, {count_name}={count}], got {top_k!r}")
    for name, c in (("balance_coef", balance_coef), ("switch_coef", switch_coef), ("z_loss_coef", z_loss_coef)):
        if not c >= 0:
            raise UserError(f"{name} must be >= 0, got {c!r}")


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


def _autocast_may_be_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (True where autocast does not know the type, e.g. meta)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:
        return True


class _BaseAndDown(torch.autograd.Function):
    """``y0 = x Wᵀ + b`` and ``zl = x Dᵀ`` as one autograd node (PyTorch path, no dropout).

    Shapes: ``x [N, in]``, ``W [out, in]``, ``b [out] | None``, ``D [m, in]`` (the stacked down
    projections, router rows included) → ``y0 [N, out]``, ``zl [N, m]``. Same values as two
    ``F.linear``; the point is the backward: both input gradients go into one buffer (``dx = dy0 W``,
    then ``dx += dzl · D`` in place) instead of two ``[N, in]`` tensors that autograd then adds, and
    ``dW`` / ``db`` are computed only when needed.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, down):  # noqa: D102
        ctx.save_for_backward(x2, weight, down)
        ctx.has_bias = bias is not None
        return F.linear(x2, weight, bias), F.linear(x2, down)

    @staticmethod
    def backward(ctx, dy0, dzl):  # noqa: D102
        x2, weight, down = ctx.saved_tensors
        dx = dw = db = ddown = None
        if ctx.needs_input_grad[0]:
            dx = dy0.mm(weight).addmm_(dzl, down)  # [N, in]
        if ctx.needs_input_grad[1]:
            dw = dy0.t().mm(x2)  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy0.sum(0)  # [out]
        if ctx.needs_input_grad[3]:
            ddown = dzl.t().mm(x2)  # [m, in]
        return dx, dw, db, ddown


class RoutedLoRALinear(RoutedLayer):
    """A frozen ``nn.Linear`` plus K routed LoRA heads, computed densely in stacked GEMMs.

    Shared by I-LoRA (one A for all heads) and MoE-LoRA (one A per expert). For ``x [N, in]``::

        z = D · drop(x)                     D: [m, in]   stacked down projections (m = r or K·r)
        w = route(R x / τ)  or task gate    R: [K, in]
        h = mix(z, w)                       [N, K·r]     per-head inputs, weighted (subclass)
        y = base(x) + s · h · B_stackedᵀ    B: [K, out, r], one GEMM over all heads

    Without dropout (and with a plain ``nn.Linear`` base, no autocast) ``base(x)`` and ``x · [D; R]ᵀ``
    are one autograd node whose backward writes ``dx`` once; the update is then added in place.
    Subclasses create ``lora_A`` / ``lora_B`` (and the router) and define :meth:`_down_weight`,
    :meth:`_router_weight`, :meth:`_mix` and, for a gate that does not look at x, :meth:`_gate_logits`.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        num_heads: int,
        dropout: float,
        temperature: float,
        top_k: int | None,
        balance_coef: float,
        switch_coef: float,
        z_loss_coef: float,
        count_name: str = "num_heads",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts an nn.Linear, got {type(base).__name__}")
        if not _is_int(r) or r < 1:
            raise UserError(f"r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise UserError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
        validate_routing_args(num_heads, temperature, top_k, balance_coef, switch_coef, z_loss_coef, count_name)
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = float(alpha)
        self.num_heads = num_heads
        self.scaling = float(alpha) / r
        self.temperature = float(temperature)
        self.top_k = top_k
        self.balance_coef = float(balance_coef)
        self.switch_coef = float(switch_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_routing()

    def _param_kwargs(self) -> dict:
        """device/dtype for new adapter parameters: the base weight's (fp32 for a quantized base)."""
        w = self.base_layer.weight
        return {"device": w.device, "dtype": w.dtype if w.dtype.is_floating_point else torch.float32}

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``[out, in]`` (for code that inspects ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias ``[out]`` or None."""
        return self.base_layer.bias

    def stacked_B(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The heads as one matrix ``[out, K·r]``: column ``k·r + j`` is ``lora_B[k, :, j]``."""
        b = self.lora_B if dtype is None else self.lora_B.to(dtype)
        return b.permute(1, 0, 2).reshape(self.out_features, self.num_heads * self.r)

    @property
    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.lora_dropout, nn.Dropout) and self.lora_dropout.p > 0

    @property
    def _plain_base(self) -> bool:
        """Whether ``base_layer`` is exactly an ``nn.Linear`` without hooks: its output is then a fresh
        tensor that nothing else holds or saves for backward, so the update can be added in place."""
        b = self.base_layer
        hooks = b._forward_hooks or b._forward_pre_hooks
        global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        return type(b) is nn.Linear and "forward" not in b.__dict__ and not (hooks or global_hooks)

    # ------------------------------------------------------------------ subclass hooks
    def _down_weight(self) -> torch.Tensor:
        """The stacked down projections ``D [m, in]``."""
        raise NotImplementedError

    def _router_weight(self) -> torch.Tensor | None:
        """The token router ``R [K, in]``, or None when the gate does not look at x."""
        raise NotImplementedError

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits ``[N, K]`` for ``x [..., in]`` when :meth:`_router_weight` is None."""
        raise NotImplementedError

    def _mix(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``z [N, m]``, routing weights ``w [N, K]`` (in z's dtype) → head inputs ``h [N, K·r]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``y [..., out]`` (2-D, 3-D, any leading dims) on the PyTorch path."""
        dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        n, k = x2.shape[0], self.num_heads
        plain = self._plain_base
        down = self._down_weight().to(dtype)
        router = self._router_weight()
        router = None if router is None else router.to(dtype)
        m = down.shape[0]
        base = self.base_layer
        # D sees drop(x) and the router sees x, so they share one GEMM over x only without dropout
        joint = router is not None and not self._dropout_active
        stacked = torch.cat([down, router], dim=0) if joint else down  # [m (+ K), in]
        if (
            plain
            and not self._dropout_active
            and not _autocast_may_be_on(x.device.type)
            and base.weight.dtype == dtype
            and (base.bias is None or base.bias.dtype == dtype)
        ):  # base GEMM and the [D; R] GEMM in one node: one dx buffer in backward
            y0, zl = _BaseAndDown.apply(x2, base.weight, base.bias, stacked)
        else:
            # a plain nn.Linear gives the same values on x2 as on x; on x2 its output is not a view,
            # so the in-place addmm_ below needs no CopySlices (a full copy of dy) in backward
            y0 = base(x2 if plain else x)
            zl = F.linear(self.lora_dropout(x2), stacked)  # the dropout is inactive when joint
        if joint:
            z, logits = zl.split([m, k], dim=-1)
        else:
            z = zl
            logits = self._gate_logits(x) if router is None else F.linear(x2, router)  # [N, K]
        probs, w = route(logits, self.temperature, self.top_k)  # [N, K], fp32 or wider
        self._after_routing(logits, probs, w)
        h = self._mix(z, w.to(z.dtype))  # [N, K·r]
        # the stacked heads as a contiguous [K·r, out] (row k·r + j = lora_B[k, :, j], i.e.
        # stacked_B().t()): one GEMM over all heads, and addmm's backward then takes the fast
        # hᵀ·dy form for the B gradient instead of (dyᵀ·h)ᵀ (with K = 1 the reshape is a
        # transposed view, hence the explicit contiguous())
        b_t = self.lora_B.to(h.dtype).permute(0, 2, 1).reshape(k * self.r, self.out_features).contiguous()
        if plain and y0.dtype == h.dtype:
            # y0 += s · h B: no [N, out] temporary in forward, and addmm's backward passes dy
            # through to y0 unchanged and applies s on the small [N, K·r] / [K·r, out] gradients
            y = y0.addmm_(h, b_t, alpha=self.scaling)
        else:
            y0 = y0.reshape(n, self.out_features)
            y = torch.addmm(y0, h.to(y0.dtype), b_t.to(y0.dtype), alpha=self.scaling)
        return y.view(*x.shape[:-1], self.out_features)


class RoutedAdapter(Adapter):
    """Plugin base of the routed adapters (I-LoRA, MoE-LoRA): the routing options their layers share.

    Args:
        target_modules, scopes, r, alpha, dropout: see :class:`~avmt.adapters.base.Adapter`.
        count: K, heads or experts per layer (``count_name`` in error messages).
        temperature, top_k, balance_coef, switch_coef, z_loss_coef: see :class:`RoutedLoRALinear`.
        track_router_stats: accumulate per-layer routing statistics (:meth:`router_stats`).
    """

    def __init__(
        self,
        target_modules: Sequence[str] | Mapping[str, Sequence[str]] | None,
        scopes: Sequence[str] | None,
        r: int,
        alpha: float,
        dropout: float,
        count: int,
        temperature: float,
        top_k: int | None,
        balance_coef: float,
        switch_coef: float,
        z_loss_coef: float,
        track_router_stats: bool,
        count_name: str = "num_heads",
    ) -> None:
        super().__init__(target_modules=target_modules, scopes=scopes, r=r, alpha=alpha, dropout=dropout)
        validate_routing_args(count, temperature, top_k, balance_coef, switch_coef, z_loss_coef, count_name)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.balance_coef = float(balance_coef)
        self.switch_coef = float(switch_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.track_router_stats = bool(track_router_stats)

    def _layer_options(self) -> dict:
        """Keyword arguments every routed layer of this plugin gets."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "balance_coef": self.balance_coef,
            "switch_coef": self.switch_coef,
            "z_loss_coef": self.z_loss_coef,
        }

    def _finish_layer(self, layer: RoutedLayer, base: nn.Module) -> RoutedLayer:
        """Apply the plugin-level switches to a new ``layer`` and give it ``base``'s train/eval mode."""
        layer.track_router_stats = self.track_router_stats
        layer.train(base.training)
        return layer
