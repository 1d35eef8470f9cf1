"""MoE-LoRA: K LoRA experts, each with its own (A_k, B_k), mixed by a gate.

Two gates:

* ``gate="token"`` (MixLoRA-style): a token-level router ``R [K, in]``, top-k (default 2) with
  renormalization, Switch-Transformer load-balancing loss (default coefficient 0.001);
* ``gate="task"`` (MOELoRA-style): the gate depends only on the task of each sample, from a
  learned per-layer task table ``lora_task_gate [num_tasks, K]`` (equivalent to a learned task
  embedding followed by a linear map to K logits). The LightningModule calls
  :meth:`MoELoRA.set_task_ids` with the batch's task ids before each forward.

All experts are computed densely in two GEMMs (``x`` against the stacked ``A [K·r, in]``, then the
gated ``[N, K·r]`` against the stacked ``B [out, K·r]``); unselected experts get weight 0. With
small ``K·r`` this is faster than dispatching tokens, and there is no Python loop over experts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .routing import RoutedAdapter, RoutedLoRALinear

from avmt.errors import UserError

__all__ = ["MoELoRALinear", "MoELoRA", "GATES"]

GATES: tuple[str, ...] = ("token", "task")


def _validate_gate(gate: str, num_tasks: int | None) -> None:
    if gate not in GATES:
        raise UserError(f"gate must be one of {'|'.join(GATES)}, got {gate!r}")
    if gate == "task" and (not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1):
        raise UserError(f"gate='task' needs num_tasks >= 1 (the number of tasks), got {num_tasks!r}")


class MoELoRALinear(RoutedLoRALinear):
    """A frozen ``nn.Linear`` plus a mixture of ``num_experts`` LoRA experts.

    Args:
        base: the linear layer to adapt (kept as ``base_layer``, untouched).
        r: rank of each expert; alpha: ``scaling = alpha / r``.
        num_experts: number K of experts.
        dropout: dropout on the experts' input (the router sees x without dropout).
        top_k: experts kept per token, renormalized (None = dense).
        temperature: gate softmax temperature.
        gate: ``"token"`` (router on x) or ``"task"`` (table of task logits).
        num_tasks: number of task ids (``gate="task"``).
        balance_coef, switch_coef, z_loss_coef: auxiliary loss weights (see
            :mod:`avmt.adapters.routing`); Switch balance 0.001 by default, as MixLoRA.

    Parameters: ``lora_A [K, r, in]`` (kaiming-uniform per expert), ``lora_B [K, out, r]`` (zeros),
    and ``lora_router [K, in]`` (token gate) or ``lora_task_gate [num_tasks, K]`` (task gate, zeros:
    uniform at start).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        num_experts: int,
        dropout: float = 0.0,
        top_k: int | None = 2,
        temperature: float = 1.0,
        gate: str = "token",
        num_tasks: int | None = None,
        balance_coef: float = 0.0,
        switch_coef: float = 0.001,
        z_loss_coef: float = 0.0,
    ) -> None:
        _validate_gate(gate, num_tasks)
        super().__init__(
            base, r, alpha, num_experts, dropout, temperature, top_k, balance_coef, switch_coef, z_loss_coef,
            count_name="num_experts",
        )
        self.num_experts = num_experts
        self.gate = gate
        self.num_tasks = num_tasks
        kw = self._param_kwargs()
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, **kw))
        if gate == "token":
            self.lora_router = nn.Parameter(torch.empty(num_experts, self.in_features, **kw))
        else:
            self.lora_task_gate = nn.Parameter(torch.zeros(num_tasks, num_experts, **kw))
        self._task_ids: torch.Tensor | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Each A_k and the router: kaiming-uniform (a=√5, fan-in = in); B and the task gate: zeros."""
        with torch.no_grad():
            for k in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
            if self.gate == "token":
                nn.init.kaiming_uniform_(self.lora_router, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_task_gate)
        nn.init.zeros_(self.lora_B)

    def set_task_ids(self, task_ids: torch.Tensor | None) -> None:
        """Task id per sample ``[B]`` (or per token ``[N]``) used by the task gate of the next forwards."""
        self._task_ids = task_ids

    def _token_task_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Task id of every token of ``x [..., in]`` as ``[N]`` on x's device."""
        ids = self._task_ids
        if ids is None:
            raise RuntimeError(
                "MoELoRALinear(gate='task'): no task ids; call adapter.set_task_ids(task_ids [B]) before the forward"
            )
        ids = ids.to(x.device, non_blocking=True).reshape(-1)
        lead = x.shape[:-1]
        n = math.prod(lead)
        if len(lead) >= 1 and ids.numel() == lead[0]:  # one id per sample (or per row of a 2-D input)
            return ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
        if ids.numel() == n:  # one id per token
            return ids
        raise ValueError(
            f"MoELoRALinear(gate='task'): {ids.numel()} task ids do not fit an input of shape {tuple(x.shape)} "
            f"(expected one per sample = {lead[0] if lead else 1} or one per token = {n})"
        )

    def _down_weight(self) -> torch.Tensor:
        return self.lora_A.reshape(self.num_experts * self.r, self.in_features)  # stacked A [K·r, in]

    def _router_weight(self) -> torch.Tensor | None:
        return self.lora_router if self.gate == "token" else None

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_task_gate[self._token_task_ids(x)]  # [N, K]

    def _mix(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # expert k's input z[:, k·r:(k+1)·r] weighted by w[:, k]
        n, k = z.shape[0], self.num_experts
        return (z.view(n, k, self.r) * w.unsqueeze(-1)).reshape(n, k * self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``y [..., out]`` = base(x) + s · Σ_k w_k B_k A_k drop(x)."""
        return self._forward_torch(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, num_experts={self.num_experts}, top_k={self.top_k}, gate={self.gate!r}"
            + (f", num_tasks={self.num_tasks}" if self.gate == "task" else "")
        )


class MoELoRA(RoutedAdapter):
    """MoE-LoRA adapter plugin: replaces each matching ``nn.Linear`` by a :class:`MoELoRALinear`.

    Args:
        target_modules, scopes, r, alpha, dropout: see :class:`~avmt.adapters.base.Adapter`.
        num_experts: experts per layer.
        top_k: experts per token (MixLoRA: 2; None = dense, as MOELoRA's task gate).
        temperature: gate softmax temperature.
        gate: ``"token"`` (MixLoRA-style router) or ``"task"`` (MOELoRA-style task gate).
        num_tasks: number of tasks (required for ``gate="task"``).
        balance_coef, switch_coef, z_loss_coef: auxiliary router loss weights.
        track_router_stats: accumulate routing statistics (:meth:`router_stats`).
    """

    def __init__(
        self,
        target_modules: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        scopes: Sequence[str] | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        num_experts: int = 4,
        top_k: int | None = 2,
        temperature: float = 1.0,
        gate: str = "token",
        num_tasks: int | None = None,
        balance_coef: float = 0.0,
        switch_coef: float = 0.001,
        z_loss_coef: float = 0.0,
        track_router_stats: bool = True,
    ) -> None:
        _validate_gate(gate, num_tasks)
        super().__init__(
            target_modules, scopes, r, alpha, dropout, num_experts, temperature, top_k,
            balance_coef, switch_coef, z_loss_coef, track_router_stats, count_name="num_experts",
        )
        self.num_experts = num_experts
        self.gate = gate
        self.num_tasks = num_tasks

    def _make_layer(self, base: nn.Linear) -> MoELoRALinear:
        layer = MoELoRALinear(
            base, num_experts=self.num_experts, gate=self.gate, num_tasks=self.num_tasks, **self._layer_options()
        )
        return self._finish_layer(layer, base)

    def set_task_ids(self, task_ids: torch.Tensor | None) -> None:
        """Task id of each sample of the next batch, ``LongTensor [B]`` with values in ``[0, num_tasks)``.

        Used by the task gate; ignored (but still validated as integers) by the token gate.
        ``None`` clears them.
        """
        if task_ids is not None:
            if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (
                torch.int64,
                torch.int32,
                torch.int16,
                torch.int8,
                torch.uint8,
            ):
                raise TypeError(f"set_task_ids expects an integer tensor [B], got {task_ids!r:.80}")
            if self.gate == "task" and task_ids.numel():
                lo, hi = int(task_ids.min()), int(task_ids.max())
                if lo < 0 or hi >= self.num_tasks:
                    raise ValueError(f"task ids must be in [0, num_tasks={self.num_tasks}), got range [{lo}, {hi}]")
            task_ids = task_ids.long()
        for layer in self._injected.values():
            layer.set_task_ids(task_ids)
