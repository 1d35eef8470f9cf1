"""Roofline model of the fused I-LoRA layer: FLOPs and HBM bytes per kernel, and the time bound.

For one adapted linear layer at N tokens (x [N, d_in], y [N, d_out], A [r, d_in], B [K, d_out, r],
R [K, d_in]), every kernel of ``avmt_kernels.ilora`` gets

- ``flops``: tensor-core matmul FLOPs, 2·M·N·K per product, at the true r and K (the kernels pad K
  to 16 lanes for ``tl.dot``; that padding is not counted);
- ``bytes``: HBM traffic if each operand is read once and each result written once (perfect
  on-chip reuse: no re-reads of x or dy across column blocks, no split-N partials beyond one copy);
  activations and parameters in the layer dtype, the saved z [N, r], w [N, K] and the backward
  intermediates in fp32, as the kernels store them;

and ``time = max(flops / peak tensor FLOP/s, bytes / HBM bandwidth)``. The PyTorch glue between the
kernels (sum of the per-head dz, softmax Jacobian, reduction and cast of the dA / dR / dB
partials) is memory traffic only. ``base`` is the frozen linear the layer adapts: y0 = x Wᵀ forward
and dx = dy W backward (no dW: W is frozen), the GEMMs ``avmt_kernels.bench`` times as ``base``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Peak dense tensor-core FLOP/s at 16-bit inputs and HBM bandwidth of one GPU."""

    name: str
    tensor_flops: float  # dense bf16/fp16 with fp32 accumulate, FLOP/s
    hbm_bytes_per_s: float
    source: str


GPUS = {
    "h100": Gpu("H100 SXM", 989e12, 3.35e12,
                "NVIDIA H100 datasheet: 1,979 TFLOPS bf16 with sparsity, 989 dense; 3.35 TB/s"),
    "h200": Gpu("H200 SXM", 989e12, 4.8e12,
                "NVIDIA H200 datasheet: H100 SXM's tensor cores (989 TFLOPS dense bf16); 4.8 TB/s HBM3e"),
    "a100": Gpu("A100 SXM 80GB", 312e12, 2.039e12,
                "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense; 2,039 GB/s (80GB SXM)"),
}

FP32_BYTES = 4  # z, w, dw, the per-head g·w, dz, dl and the dA / dR / dB partials are fp32


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adapted linear layer at ``n`` tokens; ``elem`` = bytes per element of x, y, W, A, B, R."""

    n: int
    d_in: int
    d_out: int
    r: int
    k: int
    elem: int = 2


@dataclasses.dataclass(frozen=True)
class Cost:
    """Tensor-core FLOPs and HBM bytes (reads + writes) of one kernel launch."""

    flops: float
    bytes: float


def _shrink(L: Layer) -> Cost:
    # z = drop(x) Aᵀ, logits = x Rᵀ; reads x, A, R; writes z, w
    return Cost(2.0 * L.n * L.d_in * (L.r + L.k),
                L.elem * (L.n * L.d_in + (L.r + L.k) * L.d_in) + FP32_BYTES * L.n * (L.r + L.k))


def _expand(L: Layer) -> Cost:
    # y += s Σ_k (w_k z) B_kᵀ; reads z, w, B, y; writes y
    return Cost(2.0 * L.n * L.k * L.r * L.d_out,
                FP32_BYTES * L.n * (L.r + L.k) + L.elem * (L.k * L.d_out * L.r + 2 * L.n * L.d_out))


def _bwd_g(L: Layer) -> Cost:
    # g_k = dy B_k; reads dy, B, z, w; writes dw [N, K] and s w_k g_k [K, N, r]
    return Cost(2.0 * L.n * L.d_out * L.k * L.r,
                L.elem * (L.n * L.d_out + L.k * L.d_out * L.r)
                + FP32_BYTES * (L.n * (L.r + L.k) + L.n * L.k + L.k * L.n * L.r))


def _bwd_dx(L: Layer) -> Cost:
    # dx = drop'(dz A) + dl R; reads dz, dl, A, R; writes dx
    return Cost(2.0 * L.n * (L.r + L.k) * L.d_in,
                FP32_BYTES * L.n * (L.r + L.k) + L.elem * ((L.r + L.k) * L.d_in + L.n * L.d_in))


def _bwd_dar(L: Layer) -> Cost:
    # dA = dzᵀ drop(x), dR = dlᵀ x; reads x, dz, dl; writes one fp32 copy of dA and dR
    return Cost(2.0 * (L.r + L.k) * L.n * L.d_in,
                L.elem * L.n * L.d_in + FP32_BYTES * (L.n * (L.r + L.k) + (L.r + L.k) * L.d_in))


def _bwd_db(L: Layer) -> Cost:
    # dB_k = s dyᵀ (w_k z); reads dy, z, w; writes one fp32 copy of dB
    return Cost(2.0 * L.n * L.d_out * L.k * L.r,
                L.elem * L.n * L.d_out + FP32_BYTES * (L.n * (L.r + L.k) + L.k * L.d_out * L.r))


def _glue(L: Layer) -> Cost:
    # dz = Σ_k g_k: reads [K, N, r], writes [N, r]; dl from w, dw: reads 2 [N, K], writes [N, K];
    # dA, dR, dB: one fp32 copy read, cast and written in the parameter dtype;
    # autograd's x.grad = base dx + adapter dx: reads 2 [N, d_in], writes [N, d_in]
    params = L.r * L.d_in + L.k * L.d_in + L.k * L.d_out * L.r
    return Cost(0.0, FP32_BYTES * ((L.k + 1) * L.n * L.r + 3 * L.n * L.k) + (FP32_BYTES + L.elem) * params
                + 3 * L.elem * L.n * L.d_in)


def _base(L: Layer) -> Cost:
    # y0 = x Wᵀ (reads x, W; writes y0) and dx = dy W (reads dy, W; writes dx)
    return Cost(4.0 * L.n * L.d_in * L.d_out,
                L.elem * (2 * L.d_in * L.d_out + 2 * L.n * L.d_in + 2 * L.n * L.d_out))


@dataclasses.dataclass(frozen=True)
class Part:
    """One modelled piece of a fused forward + backward step: its GPU kernel name (as the profiler
    lists it; None for PyTorch glue and cuBLAS) and its cost."""

    kernel: str | None
    cost: Callable[[Layer], Cost]


KERNELS = {  # the Triton kernels of one forward + backward, in launch order
    "shrink": Part("shrink_route_kernel", _shrink),
    "expand": Part("expand_kernel", _expand),
    "g": Part("bwd_g_kernel", _bwd_g),
    "dx": Part("bwd_dx_kernel", _bwd_dx),
    "dar": Part("bwd_dar_kernel", _bwd_dar),
    "db": Part("bwd_db_kernel", _bwd_db),
}
GLUE = Part(None, _glue)
BASE = Part(None, _base)


def roofline_time(cost: Cost, gpu: Gpu) -> float:
    """Seconds: max(flops / peak tensor FLOP/s, bytes / HBM bandwidth)."""
    return max(cost.flops / gpu.tensor_flops, cost.bytes / gpu.hbm_bytes_per_s)


def bound(cost: Cost, gpu: Gpu) -> str:
    """'compute' or 'memory': which roof sets the time."""
    return "compute" if cost.flops / gpu.tensor_flops >= cost.bytes / gpu.hbm_bytes_per_s else "memory"


def layer_model(layer: Layer, gpu: Gpu) -> list[dict]:
    """One row per kernel, then 'glue', 'adapter' (kernels + glue), 'base' and 'fused' (base +
    adapter): flops, bytes, intensity (FLOP/byte), bound and roofline seconds."""
    parts = [(name, part.cost(layer)) for name, part in KERNELS.items()] + [("glue", GLUE.cost(layer))]
    adapter = Cost(sum(c.flops for _, c in parts), sum(c.bytes for _, c in parts))
    base = BASE.cost(layer)
    rows = []
    for name, cost in parts:
        rows.append(_row(name, cost, roofline_time(cost, gpu), gpu))
    adapter_s = sum(r["seconds"] for r in rows)  # kernels run one after the other: times add
    rows.append(_row("adapter", adapter, adapter_s, gpu))
    base_s = roofline_time(base, gpu)
    rows.append(_row("base", base, base_s, gpu))
    rows.append(_row("fused", Cost(base.flops + adapter.flops, base.bytes + adapter.bytes), base_s + adapter_s, gpu))
    return rows


def _row(name: str, cost: Cost, seconds: float, gpu: Gpu) -> dict:
    return {"part": name, "flops": cost.flops, "bytes": cost.bytes,
            "intensity": cost.flops / cost.bytes if cost.bytes else float("inf"),
            "bound": bound(cost, gpu), "seconds": seconds}


def measured_parts(profile_rows: list[dict]) -> dict:
    """{part: µs per step} of the fused method from ``avmt_kernels.bench --profile`` rows: each
    Triton kernel by name, 'base' = the cuBLAS GEMMs, 'glue' = every other kernel."""
    by_kernel = {part.kernel: name for name, part in KERNELS.items()}
    out = {name: 0.0 for name in (*KERNELS, "glue", "base")}
    for e in profile_rows:
        if e["method"] != "fused":
            continue
        name = by_kernel.get(e["kernel"]) or ("base" if _is_cublas(e["kernel"]) else "glue")
        out[name] += e["us_per_step"]
    return out


_CUBLAS_MARKERS = ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "sm80_", "ampere_")  # cuBLAS/cuBLASLt kernel names


def _is_cublas(kernel: str) -> bool:
    low = kernel.lower()
    return any(m in low for m in _CUBLAS_MARKERS) and "at::native" not in low
