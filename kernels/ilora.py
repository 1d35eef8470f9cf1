"""Fused I-LoRA forward and backward (Triton), wrapped in a torch.autograd.Function.

Public API::

    triton_usable(device) -> bool
    ilora_fused(x [..., d_in], y0 [..., d_out], lora_A [r, d_in], lora_B [K, d_out, r],
                lora_router [K, d_in], scaling, temperature=1.0, top_k=None,
                dropout_p=0.0, seed=0, inplace=None) -> y [..., d_out]

y = y0 + s Σ_k w_k (drop(x) Aᵀ) B_kᵀ with w = (top-k) softmax(x Rᵀ / τ); see
``avmt_kernels.reference`` for the PyTorch definition and the dropout mask.

Forward = 2 kernels (shrink+route over x, expand into y0's buffer). Backward = 4 kernels:
g = dy·B_k per head (first GEMM over dy, epilogue dw and dz), dx, dA+dR (one pass over x),
dB (second GEMM over dy); plus O(N·K·r) PyTorch glue (sum of the per-head dz, softmax
Jacobian on [N, K]). The dropout mask is regenerated from the seed, never stored.
Saved for backward: x (already kept alive by the base linear), z [N, r] and w [N, K] in fp32.

Block sizes are autotuned on CUDA (key: bucketed N and the layer's dimensions); under the
Triton interpreter (TRITON_INTERPRET=1 when triton is first imported) one fixed large
configuration is used and every tl.dot runs in fp32 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch

from .reference import normalize_seed

try:  # triton is optional: the module imports (and triton_usable answers) without it
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing/broken
    triton = None
    tl = None
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

__all__ = ["ilora_fused", "triton_usable", "triton_unusable_reason", "dropout_mask_triton",
           "interpreting", "MAX_HEADS", "MAX_RANK"]

MAX_HEADS = 16  # K is padded to 16 lanes (the tl.dot minimum)
MAX_RANK = 256  # z tiles hold the whole rank: [BLOCK_M, next_pow2(r)]
_ROW_GRANULE = 128  # rows per N-split are a multiple of every BLOCK_M in the configs
_INTERP_SMS = 4  # pretend SM count under the interpreter (exercises the split-N path)


# --------------------------------------------------------------------------- availability
def triton_unusable_reason(device) -> str | None:
    """None when the fused kernel can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return ("the Triton kernels run on CPU only through the interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported in the process")
    return (f"device type {device.type!r} is not supported by the Triton kernels "
            "(CUDA, or CPU via the interpreter)")


def triton_usable(device) -> bool:
    """True when ``ilora_fused`` can run on ``device``: CUDA + importable triton, or CPU with the
    Triton interpreter active (TRITON_INTERPRET=1 when triton was first imported in the process)."""
    return triton_unusable_reason(device) is None


# --------------------------------------------------------------------------- launch helpers
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _n_bucket(n: int) -> int:
    """Autotune key for the token count: the next power of two (avoids retuning per batch)."""
    return _pow2(n, 1)


def _dot_config(dtype: torch.dtype):
    """(tl dtype of tl.dot operands, input_precision) for activations of ``dtype``."""
    interp = interpreting()
    if interp or dtype == torch.float32:
        allow_tf32 = (not interp) and torch.backends.cuda.matmul.allow_tf32
        return tl.float32, ("tf32" if allow_tf32 else "ieee")
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"


def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return _INTERP_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_rows(n: int, programs: int, device: torch.device, granule: int) -> tuple[int, int]:
    """(number of N-splits, rows per split) so that programs × splits fills ~2 waves of SMs."""
    want = max(1, math.ceil(2 * _num_sms(device) / max(1, programs)))
    split = max(1, min(want, math.ceil(n / granule)))
    rows = math.ceil(math.ceil(n / split) / granule) * granule
    return math.ceil(n / rows), rows


def _cfg(kw: dict, warps: int, stages: int):
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Fixed configuration under the interpreter (big blocks run fastest there).
_INTERP_BLOCKS = {
    "shrink": {"BLOCK_M": 64, "BLOCK_K": 64},
    "expand": {"BLOCK_M": 64, "BLOCK_N": 64},
    "g": {"BLOCK_M": 64, "BLOCK_O": 64},
    "dx": {"BLOCK_M": 64, "BLOCK_K": 64},
    "dar": {"BLOCK_M": 64, "BLOCK_K": 64},
    "db": {"BLOCK_M": 64, "BLOCK_O": 64},
    "mask": {"BLOCK_M": 64, "BLOCK_K": 64},
}

_STATE: SimpleNamespace | None = None  # the kernels, built on first use


def interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter. Triton fixes this when it is first
    imported (TRITON_INTERPRET=1 at that moment): triton.language's own helpers are then
    interpreted functions, and so must ours be."""
    if _TRITON_ERROR is not None:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


def _kernels() -> SimpleNamespace:
    """Build the kernels once per process, in the mode TRITON_INTERPRET selects at that moment:
    interpreted (fixed blocks) or compiled and autotuned over a real config list."""
    global _STATE
    if _STATE is not None:
        return _STATE
    interp = interpreting()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interp else "0"  # our @triton.jit must match triton.language's
    try:
        from . import _ilora_kernels as K
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    if K.INTERPRET != interp:  # pragma: no cover - imported elsewhere in the other mode
        raise RuntimeError("avmt_kernels._ilora_kernels was imported with TRITON_INTERPRET different from "
                           "the value triton itself was imported with; import avmt_kernels.ilora instead")
    if interp:
        _STATE = SimpleNamespace(
            interpret=True, autotuned=False, mask=K.dropout_mask_kernel,
            shrink=K.shrink_route_kernel, expand=K.expand_kernel, g=K.bwd_g_kernel,
            dx=K.bwd_dx_kernel, dar=K.bwd_dar_kernel, db=K.bwd_db_kernel)
        return _STATE
    key_in = ["N_BUCKET", "D_IN", "R_PAD", "K_PAD"]
    key_out = ["N_BUCKET", "D_OUT", "R_PAD", "K"]

    def tuned(kernel, blocks, table, key, **kw):
        configs = [_cfg(dict(zip(blocks, row[:2])), row[2], row[3]) for row in table]
        return triton.autotune(configs=configs, key=key, **kw)(kernel)

    _STATE = SimpleNamespace(
        interpret=False, autotuned=True, mask=K.dropout_mask_kernel,
        shrink=tuned(K.shrink_route_kernel, ("BLOCK_M", "BLOCK_K"), [
            (16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 4),
            (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3)], key_in + ["TOP_K", "HAS_DROPOUT"]),
        expand=tuned(K.expand_kernel, ("BLOCK_M", "BLOCK_N"), [
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3),
            (64, 256, 8, 3), (128, 256, 8, 3)], key_out, restore_value=["Y"]),
        g=tuned(K.bwd_g_kernel, ("BLOCK_M", "BLOCK_O"), [
            (32, 64, 4, 3), (32, 128, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)], key_out),
        dx=tuned(K.bwd_dx_kernel, ("BLOCK_M", "BLOCK_K"), [
            (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
            key_in + ["HAS_DROPOUT"]),
        dar=tuned(K.bwd_dar_kernel, ("BLOCK_M", "BLOCK_K"), [
            (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3), (128, 32, 4, 3)],
            key_in + ["HAS_DROPOUT"]),
        db=tuned(K.bwd_db_kernel, ("BLOCK_M", "BLOCK_O"), [
            (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3)], key_out),
    )
    return _STATE


def _launch(name: str, grid, *args, **kwargs):
    """Launch kernel ``name``: autotuned on CUDA, the fixed interpreter blocks otherwise.
    ``grid`` is a function of the block-size dict."""
    state = _kernels()
    kernel = getattr(state, name)
    if state.autotuned:
        kernel[lambda meta: grid(meta)](*args, **kwargs)
    else:
        blocks = _INTERP_BLOCKS[name]
        kernel[grid(blocks)](*args, **kwargs, **blocks)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2-D tensor with a unit last stride (row stride free)."""
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------- kernels, host side
def dropout_mask_triton(seed: int, shape, p: float, device) -> torch.Tensor:
    """Keep mask [*shape] (bool) drawn by the fused kernels; must equal reference.dropout_mask."""
    reason = triton_unusable_reason(device)
    if reason is not None:
        raise RuntimeError(f"dropout_mask_triton cannot run: {reason}")
    shape = tuple(int(s) for s in shape)
    d_in = shape[-1]
    n = math.prod(shape[:-1])
    out = torch.empty((n, d_in), dtype=torch.int8, device=device)
    b = _INTERP_BLOCKS["mask"]
    grid = (_cdiv(n, b["BLOCK_M"]), _cdiv(d_in, b["BLOCK_K"]))
    _kernels().mask[grid](out, n, d_in, _cdiv(d_in, 4), float(p), normalize_seed(seed), **b)
    return out.bool().reshape(shape)


def _forward(x, y, A, B, R, scaling, temperature, top_k, dropout_p, seed):
    """Shrink+route then expand into ``y`` in place. Returns (z [N, r] fp32, w [N, K] fp32)."""
    N, d_in = x.shape
    K, d_out, r = B.shape
    R_PAD, K_PAD = _pow2(r), _pow2(K)
    dot_dtype, precision = _dot_config(x.dtype)
    z = torch.empty((N, r), dtype=torch.float32, device=x.device)
    w = torch.empty((N, K), dtype=torch.float32, device=x.device)
    has_drop = dropout_p > 0.0
    nb = _n_bucket(N)
    _launch("shrink", lambda m: (_cdiv(N, m["BLOCK_M"]),),
            x, A, R, z, w, N, d_in, _cdiv(d_in, 4), r, K, nb,
            x.stride(0), A.stride(0), R.stride(0),
            1.0 / temperature, float(dropout_p), 1.0 / (1.0 - dropout_p), seed,
            R_PAD=R_PAD, K_PAD=K_PAD, TOP_K=(top_k or 0), HAS_DROPOUT=has_drop,
            DOT_DTYPE=dot_dtype, PRECISION=precision)
    _launch("expand", lambda m: (_cdiv(N, m["BLOCK_M"]), _cdiv(d_out, m["BLOCK_N"])),
            y, z, w, B, N, d_out, r, K, nb,
            y.stride(0), B.stride(0), B.stride(1), float(scaling),
            R_PAD=R_PAD, BLOCK_R=min(R_PAD, 64), DOT_DTYPE=dot_dtype, PRECISION=precision)
    return z, w


class _ILoRAFused(torch.autograd.Function):
    """Autograd wrapper: y0 [..., d_out] and x [..., d_in] keep their leading dims here and are
    flattened to rows inside, so an in-place call marks y0 itself dirty. (Flattening outside would
    hand autograd a view of y0, whose in-place update costs a CopySlices backward: a zero fill and
    four [N, d_out] copies per step, measured on an H200.) In place requires a contiguous y0."""

    @staticmethod
    def forward(ctx, y0, x, A, B, R, scaling, temperature, top_k, dropout_p, seed, inplace):
        if inplace:
            y = y0
            ctx.mark_dirty(y0)
        else:
            y = y0.clone(memory_format=torch.contiguous_format)
        x2 = _rows(x.reshape(-1, x.shape[-1]))
        if x2.shape[0] == 0:  # no tokens: nothing to launch
            z = torch.empty((0, A.shape[0]), dtype=torch.float32, device=x.device)
            w = torch.empty((0, B.shape[0]), dtype=torch.float32, device=x.device)
        else:
            z, w = _forward(x2, y.view(-1, y.shape[-1]), A, B, R, scaling, temperature, top_k, dropout_p, seed)
        ctx.save_for_backward(x2, A, B, R, z, w)
        ctx.cfg = (scaling, temperature, top_k, dropout_p, seed)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, R, z, w = ctx.saved_tensors
        scaling, temperature, top_k, dropout_p, seed = ctx.cfg
        need_y0, need_x, need_A, need_B, need_R = ctx.needs_input_grad[:5]
        dy_full = dy
        dy = _rows(dy.reshape(-1, dy.shape[-1]))
        N, d_in = x.shape
        K, d_out, r = B.shape
        R_PAD, K_PAD = _pow2(r), _pow2(K)
        dot_dtype, precision = _dot_config(x.dtype)
        has_drop = dropout_p > 0.0
        nb = _n_bucket(N)
        dev = x.device
        dx = dA = dB = dR = None
        if N == 0:  # no tokens: zero parameter gradients, empty dx
            grads = [x.new_zeros(ctx.x_shape) if need_x else None] + [
                torch.zeros_like(t) if need else None for t, need in ((A, need_A), (B, need_B), (R, need_R))]
            return (dy_full if need_y0 else None, *grads, None, None, None, None, None, None)
        if need_x or need_A or need_R:
            dw = torch.empty((N, K), dtype=torch.float32, device=dev)
            gw = torch.empty((K, N, r), dtype=torch.float32, device=dev)
            _launch("g", lambda m: (K, _cdiv(N, m["BLOCK_M"])),
                    dy, B, z, w, dw, gw, N, d_out, r, K, nb,
                    dy.stride(0), B.stride(0), B.stride(1), float(scaling),
                    R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision)
            dz = gw[0] if K == 1 else gw.sum(0)  # [N, r]
            dl = (w * (dw - (w * dw).sum(-1, keepdim=True))) * (1.0 / temperature)  # softmax Jacobian [N, K]
            if need_x:
                dx = torch.empty((N, d_in), dtype=x.dtype, device=dev)
                _launch("dx", lambda m: (_cdiv(N, m["BLOCK_M"]), _cdiv(d_in, m["BLOCK_K"])),
                        dz, dl, A, R, dx, N, d_in, _cdiv(d_in, 4), r, K, nb,
                        A.stride(0), R.stride(0), dx.stride(0),
                        float(dropout_p), 1.0 / (1.0 - dropout_p), seed,
                        R_PAD=R_PAD, K_PAD=K_PAD, BLOCK_R=min(R_PAD, 64), HAS_DROPOUT=has_drop,
                        DOT_DTYPE=dot_dtype, PRECISION=precision)
            if need_A or need_R:
                bk = 64 if _kernels().autotuned else _INTERP_BLOCKS["dar"]["BLOCK_K"]
                granule = _ROW_GRANULE if _kernels().autotuned else _INTERP_BLOCKS["dar"]["BLOCK_M"]
                split, rows = _split_rows(N, _cdiv(d_in, bk), dev, granule)
                da = torch.empty((split, r, d_in), dtype=torch.float32, device=dev)
                dr = torch.empty((split, K, d_in), dtype=torch.float32, device=dev)
                _launch("dar", lambda m: (_cdiv(d_in, m["BLOCK_K"]), split),
                        x, dz, dl, da, dr, N, d_in, _cdiv(d_in, 4), r, K, nb, rows,
                        x.stride(0), float(dropout_p), 1.0 / (1.0 - dropout_p), seed,
                        R_PAD=R_PAD, K_PAD=K_PAD, HAS_DROPOUT=has_drop,
                        DOT_DTYPE=dot_dtype, PRECISION=precision)
                dA = (da[0] if split == 1 else da.sum(0)).to(A.dtype) if need_A else None
                dR = (dr[0] if split == 1 else dr.sum(0)).to(R.dtype) if need_R else None
        if need_B:
            bo = 64 if _kernels().autotuned else _INTERP_BLOCKS["db"]["BLOCK_O"]
            granule = _ROW_GRANULE if _kernels().autotuned else _INTERP_BLOCKS["db"]["BLOCK_M"]
            split, rows = _split_rows(N, K * _cdiv(d_out, bo), dev, granule)
            db = torch.empty((split, K, d_out, r), dtype=torch.float32, device=dev)
            _launch("db", lambda m: (K, _cdiv(d_out, m["BLOCK_O"]), split),
                    dy, z, w, db, N, d_out, r, K, nb, rows, dy.stride(0), float(scaling),
                    R_PAD=R_PAD, DOT_DTYPE=dot_dtype, PRECISION=precision)
            dB = (db[0] if split == 1 else db.sum(0)).to(B.dtype)
        dy0 = dy_full if need_y0 else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dy0, dx, dA, dB, dR, None, None, None, None, None, None


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def ilora_fused(x: torch.Tensor, y0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                lora_router: torch.Tensor, scaling: float, temperature: float = 1.0,
                top_k: int | None = None, dropout_p: float = 0.0, seed: int = 0,
                inplace: bool | None = None) -> torch.Tensor:
    """Fused I-LoRA: y = y0 + s · Σ_k w_k · (drop(x) Aᵀ) B_kᵀ,  w = (top-k) softmax(x Rᵀ / τ).

    Shapes: x [..., d_in], y0 [..., d_out] (same leading dims), lora_A [r, d_in],
    lora_B [K, d_out, r], lora_router [K, d_in]  ->  y [..., d_out] in y0's dtype.
    Autograd-capable w.r.t. x, y0, lora_A, lora_B, lora_router.

    - dtypes: x in {fp32, fp16, bf16}; parameters may have any of these dtypes (e.g. fp32
      master weights with bf16 activations); accumulation is fp32; gradients come back in each
      input's dtype.
    - limits: 1 <= K <= 16, 1 <= r <= 256; any N, d_in, d_out.
    - top_k: None (dense) or 1..K; keeps the top_k largest logits (ties -> lower head index)
      and renormalises the softmax over them.
    - dropout_p in [0, 1): drops x on the z path only (the router sees x), with the mask
      ``avmt_kernels.reference.dropout_mask(seed, x.shape, dropout_p)`` regenerated in backward.
      Pass a fresh seed every training step.
    - under torch.autocast, x is cast to the autocast dtype first (parameters stay as they are).
    - inplace: None (default) accumulates into y0's storage unless y0 is a leaf that requires
      grad (then a copy is made); after an in-place call y0 holds y. False always copies.

    Raises RuntimeError when the kernel cannot run on x's device (see triton_unusable_reason),
    ValueError on bad shapes / arguments.
    """
    reason = triton_unusable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"ilora_fused cannot run on {x.device}: {reason}")
    if lora_A.dim() != 2 or lora_B.dim() != 3 or lora_router.dim() != 2:
        raise ValueError("expected lora_A [r, d_in], lora_B [K, d_out, r], lora_router [K, d_in]; got "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}, {tuple(lora_router.shape)}")
    r, d_in = lora_A.shape
    K, d_out, r_b = lora_B.shape
    if r_b != r or tuple(lora_router.shape) != (K, d_in):
        raise ValueError(f"inconsistent shapes: lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, "
                         f"lora_router {tuple(lora_router.shape)} (want [r, d_in], [K, d_out, r], [K, d_in])")
    if x.shape[-1] != d_in or y0.shape[-1] != d_out or x.shape[:-1] != y0.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} / y0 {tuple(y0.shape)} do not match d_in={d_in}, d_out={d_out} "
                         "with equal leading dims")
    if not 1 <= K <= MAX_HEADS or not 1 <= r <= MAX_RANK:
        raise ValueError(f"the fused kernel supports 1 <= K <= {MAX_HEADS} heads and 1 <= r <= {MAX_RANK}; "
                         f"got K={K}, r={r}")
    named = (("x", x), ("y0", y0), ("lora_A", lora_A), ("lora_B", lora_B), ("lora_router", lora_router))
    for name, t in named:
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the fused kernel supports float32, float16, "
                             "bfloat16")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if top_k is not None:
        top_k = int(top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if top_k >= K:
            top_k = None
    if torch.is_autocast_enabled(x.device.type):  # run the adapter in the autocast compute dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if inplace is None:
        inplace = not (y0.is_leaf and y0.requires_grad)
    inplace = inplace and y0.is_contiguous()  # else y is accumulated in a contiguous copy
    A = _rows(lora_A)
    B = _rows(lora_B)
    R = _rows(lora_router)
    return _ILoRAFused.apply(y0, x, A, B, R, float(scaling), float(temperature), top_k,
                             float(dropout_p), normalize_seed(seed), bool(inplace))
