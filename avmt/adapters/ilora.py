"""I-LoRA: shared A, K routed B-heads (HydraLoRA / Crab structure), as one stacked GEMM.

Hand-written on purpose: no library (peft included) implements a shared-A, multi-B, token-routed
LoRA, and peft's experimental ``LoraVariant`` hooks assume one (A, B) pair per adapter. For a frozen
linear ``y0 = W x + b``::

    z = A · drop(x)                      A: [r, d_in]       (shared by all heads)
    w = softmax(R x / τ)  (opt. top-k)   R: [K, d_in]       (token-level router, sees x without dropout)
    y = y0 + s · Σ_k w_k B_k z           B: [K, d_out, r],  s = alpha / r
      = y0 + s · [w_1 z, …, w_K z] · [B_1 | … | B_K]ᵀ      (one GEMM against the stacked heads)

``A x`` and ``R x`` come from one GEMM over x against ``cat([A; R])`` when dropout is inactive.
With K = 1 this is exactly plain LoRA; with B = 0 the base output is unchanged.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter
from .routing import RoutedLayer, route

__all__ = ["ILoRALinear", "ILoRA", "KERNELS"]

KERNELS: tuple[str, ...] = ("auto", "triton", "torch")

# auto mode caches the result of importing the optional kernel package (CUDA only)
_AUTO_KERNEL: dict[str, object] = {}


def _import_kernel():
    """The ``avmt_kernels.ilora`` module (``ilora_fused``, ``triton_usable``); raises what the import raises."""
    # lazy, so that a missing or broken kernel package never breaks the PyTorch path
    kernel_module = importlib.import_module("avmt_kernels.ilora")
    for name in ("ilora_fused", "triton_usable"):
        if not callable(getattr(kernel_module, name, None)):
            raise ImportError(f"avmt_kernels.ilora does not define {name}()")
    return kernel_module


def _auto_kernel():
    """Cached kernel module for ``kernel="auto"``, or None if it cannot be imported."""
    if "module" not in _AUTO_KERNEL:
        try:
            _AUTO_KERNEL["module"] = _import_kernel()
        except Exception as e:  # any failure of the optional package -> PyTorch path
            _AUTO_KERNEL["module"] = None
            _AUTO_KERNEL["error"] = f"{type(e).__name__}: {e}"
    return _AUTO_KERNEL["module"]


def _validate_routing_args(
    num_heads: int,
    temperature: float,
    top_k: int | None,
    kernel: str,
    balance_coef: float,
    switch_coef: float,
    z_loss_coef: float,
) -> None:
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_heads):
        raise ValueError(f"top_k must be None or an integer in [1, num_heads={num_heads}], got {top_k!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {'|'.join(KERNELS)}, got {kernel!r}")
    for name, c in (("balance_coef", balance_coef), ("switch_coef", switch_coef), ("z_loss_coef", z_loss_coef)):
        if not c >= 0:
            raise ValueError(f"{name} must be >= 0, got {c!r}")


def _autocast_may_be_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (True where autocast does not know the type, e.g. meta)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:
        return True


class _BaseAndDown(torch.autograd.Function):
    """``y0 = x Wᵀ + b`` and ``zl = x [A; R]ᵀ`` as one autograd node (PyTorch path, no dropout).

    Shapes: ``x [N, in]``, ``W [out, in]``, ``b [out] | None``, ``ar [r+K, in]`` → ``y0 [N, out]``,
    ``zl [N, r+K]``. Same values as two ``F.linear``; the point is the backward: both input
    gradients go into one buffer (``dx = dy0 W``, then ``dx += dzl · ar`` in place) instead of two
    ``[N, in]`` tensors that autograd then adds, and ``dW`` / ``db`` are computed only when needed.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, ar):  # noqa: D102
        ctx.save_for_backward(x2, weight, ar)
        ctx.has_bias = bias is not None
        return F.linear(x2, weight, bias), F.linear(x2, ar)

    @staticmethod
    def backward(ctx, dy0, dzl):  # noqa: D102
        x2, weight, ar = ctx.saved_tensors
        dx = dw = db = dar = None
        if ctx.needs_input_grad[0]:
            dx = dy0.mm(weight).addmm_(dzl, ar)  # [N, in]
        if ctx.needs_input_grad[1]:
            dw = dy0.t().mm(x2)  # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy0.sum(0)  # [out]
        if ctx.needs_input_grad[3]:
            dar = dzl.t().mm(x2)  # [r+K, in]
        return dx, dw, db, dar


class ILoRALinear(RoutedLayer):
    """A frozen ``nn.Linear`` plus an I-LoRA update (shared A, ``num_heads`` routed B-heads).

    Args:
        base: the linear layer to adapt (kept as ``base_layer``; its parameters are not touched).
        r: rank of the shared A.
        alpha: scaling numerator, ``scaling = alpha / r``.
        num_heads: number K of B-heads.
        dropout: dropout on the input of A (the router sees x without dropout).
        temperature: router softmax temperature τ.
        top_k: keep the top-k heads per token and renormalize (None = dense, as Crab).
        kernel: ``"auto"`` (fused Triton kernel for CUDA inputs when ``avmt_kernels`` is usable,
            else PyTorch), ``"triton"`` (always the kernel; RuntimeError where it cannot run),
            ``"torch"`` (always the PyTorch stacked path).
        balance_coef: weight of the LoRAMoE coefficient-of-variation² balance loss.
        switch_coef: weight of the Switch-Transformer load-balancing loss.
        z_loss_coef: weight of the ST-MoE router z-loss.

    Parameters: ``lora_A [r, in]`` (kaiming-uniform, as peft), ``lora_B [K, out, r]`` (zeros),
    ``lora_router [K, in]`` (kaiming-uniform, as ``nn.Linear``). They are created in the base
    weight's dtype/device; the forward computes in the input dtype (softmax in fp32).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        num_heads: int,
        dropout: float = 0.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        kernel: str = "auto",
        balance_coef: float = 0.0,
        switch_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"ILoRALinear adapts an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        _validate_routing_args(num_heads, temperature, top_k, kernel, balance_coef, switch_coef, z_loss_coef)
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = float(alpha)
        self.num_heads = num_heads
        self.scaling = float(alpha) / r
        self.temperature = float(temperature)
        self.top_k = top_k
        self.kernel = kernel
        self.balance_coef = float(balance_coef)
        self.switch_coef = float(switch_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        kw = {"device": w.device, "dtype": w.dtype if w.dtype.is_floating_point else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, self.out_features, r, **kw))
        self.lora_router = nn.Parameter(torch.empty(num_heads, self.in_features, **kw))
        self.reset_lora_parameters()
        self._init_routing()

    def reset_lora_parameters(self) -> None:
        """A and the router: kaiming-uniform (a=√5, as peft / nn.Linear); B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

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

    # ------------------------------------------------------------------ dispatch
    def _select_kernel(self, x: torch.Tensor):
        """The fused kernel function to use for ``x``, or None for the PyTorch path.

        ``auto``: the kernel for CUDA inputs when ``avmt_kernels.ilora`` imports, reports the device
        usable and supports (K, r); anything else (CPU included) -> PyTorch. ``triton``: the kernel
        or a RuntimeError saying why it cannot run.
        """
        if self.kernel == "torch":
            return None
        if self.kernel == "auto":
            if not x.is_cuda or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                return None
            mod = _auto_kernel()
            if mod is None:
                return None
            if self.num_heads > getattr(mod, "MAX_HEADS", self.num_heads) or self.r > getattr(mod, "MAX_RANK", self.r):
                return None
            try:
                ok = bool(mod.triton_usable(x.device))
            except Exception:
                ok = False
            return mod.ilora_fused if ok else None
        # kernel == "triton": must run, or say why not
        try:
            mod = _import_kernel()
        except Exception as e:
            raise RuntimeError(
                f"ILoRALinear(kernel='triton'): cannot import the fused kernel avmt_kernels.ilora "
                f"({type(e).__name__}: {e}); use kernel='auto' or 'torch'"
            ) from e
        if not mod.triton_usable(x.device):
            reason = getattr(mod, "triton_unusable_reason", lambda d: None)(x.device)
            interp = os.environ.get("TRITON_INTERPRET", "")
            raise RuntimeError(
                f"ILoRALinear(kernel='triton'): the Triton kernel cannot run on device {x.device}"
                + (f" ({reason})" if reason else "")
                + f"; it needs a CUDA device with triton installed, or TRITON_INTERPRET=1 on CPU "
                f"(TRITON_INTERPRET={interp!r}). Use kernel='auto' (falls back to PyTorch) or kernel='torch'."
            )
        return mod.ilora_fused

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``y [..., out]`` = base(x) + I-LoRA update (2-D, 3-D, any leading dims)."""
        fused = self._select_kernel(x)
        if fused is not None:
            return self._forward_kernel(fused, x, self.base_layer(x))
        return self._forward_torch(x)

    @property
    def _plain_base(self) -> bool:
        """Whether ``base_layer`` is exactly an ``nn.Linear`` without hooks: its output is then a fresh
        tensor that nothing else holds or saves for backward, so the update can be added in place."""
        b = self.base_layer
        hooks = b._forward_hooks or b._forward_pre_hooks
        global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        return type(b) is nn.Linear and "forward" not in b.__dict__ and not (hooks or global_hooks)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        n, k, r = x2.shape[0], self.num_heads, self.r
        plain = self._plain_base
        a = self.lora_A.to(dtype)
        rt = self.lora_router.to(dtype)
        base = self.base_layer
        if (
            plain
            and not self._dropout_active
            and not _autocast_may_be_on(x.device.type)
            and base.weight.dtype == dtype
            and (base.bias is None or base.bias.dtype == dtype)
        ):  # base GEMM and the [A; R] GEMM in one node: one dx buffer in backward
            y0, zl = _BaseAndDown.apply(x2, base.weight, base.bias, torch.cat([a, rt], dim=0))
            z, logits = zl.split([r, k], dim=-1)
        else:
            # a plain nn.Linear gives the same values on x2 as on x; on x2 its output is not a view,
            # so the in-place addmm_ below needs no CopySlices (a full copy of dy) in backward
            y0 = base(x2 if plain else x)
            if self._dropout_active:  # A sees drop(x), the router sees x: two GEMMs
                z = F.linear(self.lora_dropout(x2), a)  # [N, r]
                logits = F.linear(x2, rt)  # [N, K]
            else:  # one pass over x for both
                z, logits = F.linear(x2, torch.cat([a, rt], dim=0)).split([r, k], dim=-1)
        probs, w = route(logits, self.temperature, self.top_k)  # fp32 [N, K]
        self._after_routing(logits, probs, w)
        h = (w.to(z.dtype).unsqueeze(-1) * z.unsqueeze(1)).reshape(n, k * r)  # [N, K·r]
        # the stacked heads as a contiguous [K·r, out] (row k·r + j = lora_B[k, :, j], i.e.
        # stacked_B().t()): one GEMM over all heads, and addmm's backward then takes the fast
        # hᵀ·dy form for the B gradient instead of (dyᵀ·h)ᵀ (with K = 1 the reshape is a
        # transposed view, hence the explicit contiguous())
        b_t = self.lora_B.to(h.dtype).permute(0, 2, 1).reshape(k * r, self.out_features).contiguous()
        if plain and y0.dtype == h.dtype:
            # y0 += s · h B: no [N, out] temporary in forward, and addmm's backward passes dy
            # through to y0 unchanged and applies s on the small [N, K·r] / [K·r, out] gradients
            y = y0.addmm_(h, b_t, alpha=self.scaling)
        else:
            y0 = y0.reshape(n, self.out_features)
            y = torch.addmm(y0, h.to(y0.dtype), b_t.to(y0.dtype), alpha=self.scaling)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_kernel(self, fused, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        p = self.lora_dropout.p if self._dropout_active else 0.0
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0  # CPU generator: no device sync
        # parameters go in as they are: the kernel accumulates in fp32 and accepts e.g. fp32
        # master weights with bf16 activations, so no per-step cast copies are made
        y = fused(
            x,
            y0,
            self.lora_A,
            self.lora_B,
            self.lora_router,
            self.scaling,
            self.temperature,
            self.top_k,
            p,
            seed,
        )
        if self.needs_routing_outputs:  # the kernel does not return its routing weights
            logits = F.linear(x.reshape(-1, self.in_features), self.lora_router.to(dtype))
            probs, w = route(logits, self.temperature, self.top_k)
            self._after_routing(logits, probs, w)
        else:
            self._aux = None
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, num_heads={self.num_heads}, temperature={self.temperature}, "
            f"top_k={self.top_k}, kernel={self.kernel!r}"
        )


class ILoRA(Adapter):
    """I-LoRA adapter plugin: replaces each matching ``nn.Linear`` by an :class:`ILoRALinear`.

    Args:
        target_modules, scopes, r, alpha, dropout: see :class:`~avmt.adapters.base.Adapter`
            (defaults: the seven Llama projections in scope ``llm``, r=8, alpha=16, dropout=0.05,
            as Crab).
        num_heads: B-heads per layer (Crab's released inference code: 3).
        temperature, top_k, kernel, balance_coef, switch_coef, z_loss_coef: see :class:`ILoRALinear`.
        track_router_stats: accumulate per-layer routing statistics (:meth:`router_stats`). With
            the fused kernel, statistics and aux losses cost one extra router GEMM ``[N, K]``
            per layer (the kernel does not return its routing weights); turn both off for
            speed measurements.

    Statistics accumulate in train and eval; with activation checkpointing the recomputed
    forward counts its tokens again.
    """

    def __init__(
        self,
        target_modules: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        scopes: Sequence[str] | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        num_heads: int = 3,
        temperature: float = 1.0,
        top_k: int | None = None,
        kernel: str = "auto",
        balance_coef: float = 0.0,
        switch_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        track_router_stats: bool = True,
    ) -> None:
        super().__init__(target_modules=target_modules, scopes=scopes, r=r, alpha=alpha, dropout=dropout)
        _validate_routing_args(num_heads, temperature, top_k, kernel, balance_coef, switch_coef, z_loss_coef)
        self.num_heads = num_heads
        self.temperature = float(temperature)
        self.top_k = top_k
        self.kernel = kernel
        self.balance_coef = float(balance_coef)
        self.switch_coef = float(switch_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.track_router_stats = bool(track_router_stats)

    def _make_layer(self, base: nn.Linear) -> ILoRALinear:
        layer = ILoRALinear(
            base,
            r=self.r,
            alpha=self.alpha,
            num_heads=self.num_heads,
            dropout=self.dropout,
            temperature=self.temperature,
            top_k=self.top_k,
            kernel=self.kernel,
            balance_coef=self.balance_coef,
            switch_coef=self.switch_coef,
            z_loss_coef=self.z_loss_coef,
        )
        layer.track_router_stats = self.track_router_stats
        layer.train(base.training)
        return layer

    def set_kernel(self, kernel: str) -> None:
        """Switch every layer to ``kernel`` in ``auto|triton|torch`` (e.g. for benchmarks)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {'|'.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        for layer in self._injected.values():
            layer.kernel = kernel
