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

from .routing import RoutedAdapter, RoutedLoRALinear, route

from avmt.errors import UserError

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


def _validate_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise UserError(f"kernel must be one of {'|'.join(KERNELS)}, got {kernel!r}")


class ILoRALinear(RoutedLoRALinear):
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
        _validate_kernel(kernel)
        super().__init__(
            base, r, alpha, num_heads, dropout, temperature, top_k, balance_coef, switch_coef, z_loss_coef
        )
        self.kernel = kernel
        kw = self._param_kwargs()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, self.out_features, r, **kw))
        self.lora_router = nn.Parameter(torch.empty(num_heads, self.in_features, **kw))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A and the router: kaiming-uniform (a=√5, as peft / nn.Linear); B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

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

    def _down_weight(self) -> torch.Tensor:
        return self.lora_A  # [r, in], shared by the heads

    def _router_weight(self) -> torch.Tensor:
        return self.lora_router  # [K, in]

    def _mix(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # h[n, k·r + j] = w[n, k] · z[n, j]
        return (w.unsqueeze(-1) * z.unsqueeze(1)).reshape(z.shape[0], self.num_heads * self.r)

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


class ILoRA(RoutedAdapter):
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
        _validate_kernel(kernel)
        super().__init__(
            target_modules, scopes, r, alpha, dropout, num_heads, temperature, top_k,
            balance_coef, switch_coef, z_loss_coef, track_router_stats,
        )
        self.num_heads = num_heads
        self.kernel = kernel

    def _make_layer(self, base: nn.Linear) -> ILoRALinear:
        layer = ILoRALinear(base, num_heads=self.num_heads, kernel=self.kernel, **self._layer_options())
        return self._finish_layer(layer, base)

    def set_kernel(self, kernel: str) -> None:
        """Switch every layer to ``kernel`` in ``auto|triton|torch`` (e.g. for benchmarks)."""
        _validate_kernel(kernel)
        self.kernel = kernel
        for layer in self._injected.values():
            layer.kernel = kernel
