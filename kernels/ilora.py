"""Fused I-LoRA forward and backward (Triton), wrapped in a torch.autograd.Function.

Public API::

    triton_usable(device) -> bool
    ilora_fused(x [..., d_in], y0 [..., d_out], lora_A [r, d_in], lora_B [K, d_out, r],
                lora_router [K, d_in], scaling, temperature=1.0, top_k=None,
                dropout_p=0.0, seed=0, inplace=None) -> y [..., d_out]

y = y0 + s Σ_k w_k (drop(x) Aᵀ) B_kᵀ with w = (top-k) softmax(x Rᵀ / τ); see
``avmt_kernels.reference`` for the PyTorch definition and the dropout mask.

Forward = shrink+route over x (split over d_in plus a reduce kernel when there are too few row
blocks to fill the GPU), then expand into y0's buffer. Backward = g = dy·B_k per head (epilogue
dw and the per-head dz), a glue kernel (dz = Σ_k, softmax Jacobian dl), dx, dA+dR (one pass over
x), dB (second GEMM over dy). The dropout mask is regenerated from the seed, never stored.
Saved for backward: x (already kept alive by the base linear), z [N, r] and w [N, K] in fp32.

Interface for tools (AOT compile checks, roofline models):
``KERNEL_CONFIGS`` (kernel name -> autotune list), ``prune_configs`` (what remains for a target;
the autotuner's prune hook calls it), ``smem_estimate``, ``kernel_fn`` (the raw @triton.jit
function), ``launch_grid`` / ``KERNEL_NAMES``.

Block sizes are autotuned on CUDA (key: bucketed N and the layer's dimensions); under the
Triton interpreter (TRITON_INTERPRET=1 when triton is first imported) one fixed configuration is
used and every tl.dot runs in fp32 (the interpreter's bf16 dot is wrong). ``set_rounding("gpu")``
(or AVMT_KERNEL_ROUNDING=gpu) makes the interpreter round every dot operand exactly as the
compiled kernel does (bf16 / fp16 / TF32), so CPU tests see the GPU's rounding.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import torch

from .reference import ilora_reference, normalize_seed

try:  # triton is optional: the module imports (and triton_usable answers) without it
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing/broken
    triton = None
    tl = None
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

__all__ = ["ilora_fused", "triton_usable", "triton_unusable_reason", "dropout_mask_triton",
           "interpreting", "MAX_HEADS", "MAX_RANK", "MAX_DIM", "KERNEL_NAMES", "KERNEL_CONFIGS",
           "kernel_fn", "prune_configs", "smem_estimate", "launch_grid", "fp32_strategy",
           "set_rounding", "rounding"]

MAX_HEADS = 16  # K is padded to 16 lanes (the tl.dot minimum)
MAX_RANK = 256  # z tiles hold the whole rank: [BLOCK_M, next_pow2(r)]
GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid limits per axis
_MIN_D_BLOCK = 64  # smallest block over d_in / d_out on a grid axis 1 (configs and interpreter)
MAX_DIM = GRID_LIMITS[1] * _MIN_D_BLOCK  # largest d_in / d_out: their blocks sit on grid axis 1
_ROW_GRANULE = 128  # rows per N-split are a multiple of every BLOCK_M in the configs
_INTERP_SMS = 4  # pretend SM count under the interpreter (exercises the split paths)
_SPLIT_K_GRANULE = 256  # d_in per shrink slice is a multiple of every BLOCK_K in the configs
_SPLIT_K_MIN = 1024  # smallest d_in slice worth a program of its own (compiled)
ROUNDINGS = ("fp32", "gpu")
_rounding = os.environ.get("AVMT_KERNEL_ROUNDING", "fp32")
# fp16 activations: the router gradient dl (often below fp16's normal range 6.1e-5) enters its
# two dots (dl·R, dlᵀ·x) as fp32 on TF32 tensor cores instead of being cast to fp16. "fp16"
# restores the plain cast (kept so the tests can show the underflow it causes).
_FP16_ROUTER_DOT = "tf32"


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


def interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter. Triton fixes this when it is first
    imported (TRITON_INTERPRET=1 at that moment): triton.language's own helpers are then
    interpreted functions, and so must ours be."""
    if _TRITON_ERROR is not None:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


def set_rounding(mode: str) -> None:
    """Interpreter dot-operand rounding: "fp32" (operands enter the fp32 dot unrounded) or "gpu"
    (each operand is rounded to bf16 / fp16 / TF32 exactly as the compiled kernel casts it, then
    the dot runs in fp32). Compiled kernels always round as the GPU does; this affects only the
    interpreter. The default comes from the environment variable AVMT_KERNEL_ROUNDING."""
    global _rounding
    if mode not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {mode!r}")
    _rounding = mode
    _plan.cache_clear()


def rounding() -> str:
    """The interpreter's dot-operand rounding mode (see ``set_rounding``)."""
    return _rounding


def fp32_strategy(device_type: str, interpret: bool, allow_tf32: bool, mode: str = "fp32") -> str:
    """How fp32 activations run: "tf32" (kernel, TF32 tensor-core dots), "ieee" (kernel, exact
    fp32 dots: only under the interpreter's default rounding, where it checks the kernel logic) or
    "torch" (the stacked PyTorch form ``reference.ilora_reference``, same gradients).

    Compiled, fp32 dots without tensor cores are slow and most fp32 configs spill, so the kernel
    runs fp32 only as TF32, and only when torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``); otherwise PyTorch's fp32 GEMMs are used. The
    interpreter in "gpu" rounding mode follows the compiled rule.
    """
    if interpret and mode == "fp32":
        return "ieee"
    return "tf32" if allow_tf32 else "torch"


# --------------------------------------------------------------------------- configs
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


KERNEL_NAMES = ("shrink", "route", "expand", "g", "glue", "dx", "dar", "db")
_FN_NAMES = {"shrink": "shrink_route_kernel", "route": "route_reduce_kernel", "expand": "expand_kernel",
             "g": "bwd_g_kernel", "glue": "bwd_glue_kernel", "dx": "bwd_dx_kernel", "dar": "bwd_dar_kernel",
             "db": "bwd_db_kernel", "mask": "dropout_mask_kernel"}
# (block names, rows of (block sizes..., num_warps, num_stages)). Hopper-oriented rows (larger
# tiles, 4 stages) follow the originals; prune_configs drops what cannot fit or is wasteful.
_TABLES = {
    "shrink": (("BLOCK_M", "BLOCK_K"), [
        (16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (32, 128, 8, 4), (64, 64, 4, 3), (64, 64, 8, 3),
        (64, 128, 8, 3), (64, 128, 4, 4), (128, 64, 8, 4), (64, 256, 8, 3)]),
    "route": (("BLOCK_M",), [(32, 4, 1), (64, 4, 1), (16, 2, 1)]),
    "expand": (("BLOCK_M", "BLOCK_N", "FLAT"), [  # FLAT: one flat K·r loop (1) or head × rank loops (0)
        (64, 64, 0, 4, 3), (64, 128, 0, 4, 3), (128, 64, 0, 4, 3), (128, 128, 0, 8, 3), (128, 256, 0, 8, 3),
        (64, 64, 1, 4, 3), (128, 64, 1, 4, 3), (128, 128, 1, 8, 3), (128, 128, 1, 8, 4), (128, 256, 1, 8, 3),
        (256, 128, 1, 8, 3)]),
    "g": (("BLOCK_M", "BLOCK_O"), [
        (32, 64, 4, 3), (32, 128, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
        (64, 128, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3)]),
    "glue": (("BLOCK_M",), [(32, 4, 1), (64, 4, 1), (16, 2, 1)]),
    "dx": (("BLOCK_M", "BLOCK_K"), [
        (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
        (64, 256, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4)]),
    "dar": (("BLOCK_M", "BLOCK_K"), [
        (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3), (128, 32, 4, 3),
        (64, 128, 8, 3), (64, 128, 8, 4), (32, 256, 8, 3)]),
    "db": (("BLOCK_M", "BLOCK_O"), [
        (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
        (64, 256, 8, 3), (32, 256, 8, 4), (64, 128, 8, 4)]),
}
# autotune keys (argument names); the autotuner adds every tensor argument's dtype
_KEYS = {
    "shrink": ["N_BUCKET", "D_IN", "R_PAD", "K_PAD", "TOP_K", "HAS_DROPOUT", "PARTIAL", "k_per_split"],
    "route": ["N_BUCKET", "R_PAD", "K_PAD", "TOP_K"],
    "expand": ["N_BUCKET", "D_OUT", "R_PAD", "K"],
    "g": ["N_BUCKET", "D_OUT", "R_PAD", "K"],
    "glue": ["N_BUCKET", "R_PAD", "K_PAD"],
    "dx": ["N_BUCKET", "D_IN", "R_PAD", "K_PAD", "HAS_DROPOUT"],
    "dar": ["N_BUCKET", "D_IN", "R_PAD", "K_PAD", "HAS_DROPOUT", "rows_per_split"],
    "db": ["N_BUCKET", "D_OUT", "R_PAD", "K", "rows_per_split"],
}
# the argument whose dtype is the activation dtype / the parameter dtype of each kernel (for the
# shared-memory estimate of the autotuner's prune hook)
_ACT_ARG = {"shrink": "X", "route": "Z", "expand": "Y", "g": "DY", "glue": "DZ", "dx": "DX", "dar": "X",
            "db": "DY"}
_PARAM_ARG = {"shrink": "A", "expand": "B", "g": "B", "dx": "A"}
# Fixed configuration under the interpreter (big blocks run fastest there).
_INTERP_BLOCKS = {
    "shrink": {"BLOCK_M": 64, "BLOCK_K": 64},
    "route": {"BLOCK_M": 64},
    "expand": {"BLOCK_M": 64, "BLOCK_N": 64, "FLAT": 1},
    "g": {"BLOCK_M": 64, "BLOCK_O": 64},
    "glue": {"BLOCK_M": 64},
    "dx": {"BLOCK_M": 64, "BLOCK_K": 64},
    "dar": {"BLOCK_M": 64, "BLOCK_K": 64},
    "db": {"BLOCK_M": 64, "BLOCK_O": 64},
    "mask": {"BLOCK_M": 64, "BLOCK_K": 64},
}


def _configs(name: str) -> list:
    blocks, rows = _TABLES[name]
    return [triton.Config(dict(zip(blocks, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


KERNEL_CONFIGS: dict = {} if triton is None else {name: _configs(name) for name in KERNEL_NAMES}


def _block_r(r_pad: int) -> int:
    """Rank step of the expand / dx reduction loops."""
    return min(r_pad, 64)


def smem_estimate(name: str, blocks: dict, num_stages: int, *, act_bytes: int, param_bytes: int,
                  r_pad: int, k_pad: int, dl_bytes: int | None = None) -> int:
    """Shared memory (bytes) the software pipeline of kernel ``name`` needs for one config: every
    tile loaded inside its reduction loop, buffered ``num_stages`` times, in the dtype it is
    loaded in (activation / parameter bytes; z, w, dl and the fp32 partials: 4 bytes; dz: the
    activation's), plus tiles loaded once for a dot after the loop. r_pad / k_pad are r / K padded to a power
    of two >= 16. ``dl_bytes``: bytes of the router-gradient dot's operands (4 for fp16 and fp32,
    whose router dots run in fp32/TF32; else ``act_bytes``).

    - shrink: S·BK·(BM·a + (r_pad + k_pad)·p)          (x, A, R tiles)
    - expand: S·BR·(4·BM + BN·p), BR = min(r_pad, 64)   (z fp32, B)
    - g:      S·BO·(BM·a + r_pad·p)                     (dy, B)
    - dx:     S·BR·(BM·a + BK·p) + k_pad·BK·max(p, dl)  (dz, A; then R once)
    - dar:    S·BM·(BK·a + r_pad·a + 4·k_pad)           (x, dz, dl) + BM·BK·dl when dl != a
    - db:     S·BM·(BO·a + 4·r_pad + 4)                 (dy, z fp32, w)
    - route, glue: 0 (no dots)
    """
    s, a, p = int(num_stages), int(act_bytes), int(param_bytes)
    dl = a if dl_bytes is None else int(dl_bytes)
    bm = blocks.get("BLOCK_M", 0)
    if name == "shrink":
        return s * blocks["BLOCK_K"] * (bm * a + (r_pad + k_pad) * p)
    if name == "expand":
        return s * _block_r(r_pad) * (4 * bm + blocks["BLOCK_N"] * p)
    if name == "g":
        return s * blocks["BLOCK_O"] * (bm * a + r_pad * p)
    if name == "dx":
        bk = blocks["BLOCK_K"]
        return s * _block_r(r_pad) * (bm * a + bk * p) + k_pad * bk * max(p, dl)
    if name == "dar":
        bk = blocks["BLOCK_K"]
        return s * bm * (bk * a + r_pad * a + 4 * k_pad) + (bm * bk * dl if dl != a else 0)
    if name == "db":
        return s * bm * (blocks["BLOCK_O"] * a + 4 * r_pad + 4)
    if name in ("route", "glue", "mask"):
        return 0
    raise KeyError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")


# the problem dimension each block size tiles (for the waste check)
_BLOCK_DIM = {"BLOCK_M": "N", "BLOCK_K": "D_IN", "BLOCK_N": "D_OUT", "BLOCK_O": "D_OUT"}


def _dtype_bytes(dtype) -> int:
    return dtype.itemsize if isinstance(dtype, torch.dtype) else int(dtype)


def prune_configs(name: str, configs: list, *, max_shared_mem: int, dtype: torch.dtype, dims: dict,
                  param_dtype: torch.dtype | None = None) -> list:
    """The configs of kernel ``name`` worth compiling for a target: those whose ``smem_estimate`` fits
    ``max_shared_mem`` (sm_90: 232 448 bytes, sm_80: 166 912), then of those the ones with no block
    larger than its padded dimension (BLOCK_M <= next_pow2(N), BLOCK_K <= next_pow2(D_IN),
    BLOCK_N / BLOCK_O <= next_pow2(D_OUT), each at least 16). Never empty: when nothing fits, the
    config with the smallest estimate is kept; when every fitting config is wasteful, the one with
    the smallest tile. ``dims``: N, D_IN, D_OUT, R, K (ints); ``dtype`` the activation dtype,
    ``param_dtype`` the parameters' (default: ``dtype``). The autotuner's prune hook calls this
    with N = the bucketed token count (its key), so the pruned list is a function of the key.
    """
    a = _dtype_bytes(dtype)
    p = _dtype_bytes(param_dtype if param_dtype is not None else dtype)
    r_pad, k_pad = _pow2(dims["R"]), _pow2(dims["K"])
    dl = 4 if dtype in (torch.float16, torch.float32) else a
    est = {id(c): smem_estimate(name, c.kwargs, c.num_stages, act_bytes=a, param_bytes=p, r_pad=r_pad,
                                k_pad=k_pad, dl_bytes=dl) for c in configs}
    fits = [c for c in configs if est[id(c)] <= max_shared_mem]
    if not fits:
        return [min(configs, key=lambda c: est[id(c)])]
    caps = {b: _pow2(dims[d]) for b, d in _BLOCK_DIM.items() if d in dims}
    lean = [c for c in fits if all(v <= caps.get(b, v) for b, v in c.kwargs.items())]
    if not lean:
        return [min(fits, key=lambda c: math.prod(v for b, v in c.kwargs.items() if b in _BLOCK_DIM))]
    return lean


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def _prune_hook(name: str):
    """early_config_prune for kernel ``name``: ``prune_configs`` with the launch's dims and dtypes."""

    def hook(configs, named_args, **kwargs):
        act = named_args[_ACT_ARG[name]]
        par = named_args.get(_PARAM_ARG.get(name, ""), act)
        dims = {"N": named_args["N_BUCKET"], "D_IN": named_args.get("D_IN", 1),
                "D_OUT": named_args.get("D_OUT", 1), "R": named_args["RANK"], "K": named_args["K"]}
        return prune_configs(name, configs, max_shared_mem=_max_shared_mem(act.device.index or 0),
                             dtype=act.dtype, param_dtype=par.dtype, dims=dims)

    return hook


# --------------------------------------------------------------------------- grids
def launch_grid(name: str, dims: dict, blocks: dict) -> tuple:
    """Grid of kernel ``name`` for ``dims`` (N, D_IN, D_OUT, K, and SPLIT: d_in slices of shrink /
    N splits of dar and db) and a config's ``blocks``. Axis 0 carries the token dimension (or, for
    dar / db, the d tiles; their N axis is the split count, at most a few times the SM count);
    axis 1 carries at most cdiv(d, 64) <= 65 535 for d <= MAX_DIM, or K, or a split count."""
    n = dims["N"]
    if name == "shrink":
        return (_cdiv(n, blocks["BLOCK_M"]), dims.get("SPLIT", 1))
    if name in ("route", "glue"):
        return (_cdiv(n, blocks["BLOCK_M"]),)
    if name == "expand":
        return (_cdiv(n, blocks["BLOCK_M"]), _cdiv(dims["D_OUT"], blocks["BLOCK_N"]))
    if name == "g":
        return (_cdiv(n, blocks["BLOCK_M"]) * dims["K"],)
    if name in ("dx", "mask"):
        return (_cdiv(n, blocks["BLOCK_M"]), _cdiv(dims["D_IN"], blocks["BLOCK_K"]))
    if name == "dar":
        return (_cdiv(dims["D_IN"], blocks["BLOCK_K"]), dims.get("SPLIT", 1))
    if name == "db":
        return (dims["K"] * _cdiv(dims["D_OUT"], blocks["BLOCK_O"]), dims.get("SPLIT", 1))
    raise KeyError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")


# --------------------------------------------------------------------------- kernels
_STATE: SimpleNamespace | None = None  # the kernels, built on first use


def _module():
    """avmt_kernels._ilora_kernels, imported in the mode triton itself was imported in."""
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
    return K


def kernel_fn(name: str):
    """The raw @triton.jit function of kernel ``name`` (one of KERNEL_NAMES, or "mask")."""
    if _TRITON_ERROR is not None:
        raise RuntimeError(_TRITON_ERROR)
    if name not in _FN_NAMES:
        raise KeyError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES + ('mask',)}")
    return getattr(_module(), _FN_NAMES[name])


def _kernels() -> SimpleNamespace:
    """Build the kernels once per process, in the mode TRITON_INTERPRET selects at that moment:
    interpreted (fixed blocks) or compiled and autotuned over KERNEL_CONFIGS (pruned per key)."""
    global _STATE
    if _STATE is not None:
        return _STATE
    interp = interpreting()
    fns = {name: kernel_fn(name) for name in KERNEL_NAMES}
    if interp:
        _STATE = SimpleNamespace(interpret=True, autotuned=False, mask=kernel_fn("mask"), **fns)
        return _STATE
    tuned = {name: triton.autotune(configs=KERNEL_CONFIGS[name], key=_KEYS[name],
                                   prune_configs_by={"early_config_prune": _prune_hook(name)},
                                   restore_value=["Y"] if name == "expand" else None)(fns[name])
             for name in KERNEL_NAMES}
    _STATE = SimpleNamespace(interpret=False, autotuned=True, mask=kernel_fn("mask"), **tuned)
    return _STATE


# --------------------------------------------------------------------------- per-shape plan
def _num_sms(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return _INTERP_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_rows(n: int, programs: int, sms: int, granule: int) -> tuple[int, int]:
    """(number of N-splits, rows per split) so that programs × splits fills ~2 waves of SMs."""
    want = max(1, math.ceil(2 * sms / max(1, programs)))
    split = max(1, min(want, math.ceil(n / granule)))
    rows = math.ceil(math.ceil(n / split) / granule) * granule
    return math.ceil(n / rows), rows


def shrink_split(n: int, d_in: int, sms: int, *, granule: int = _SPLIT_K_GRANULE,
                 min_slice: int = _SPLIT_K_MIN, block_m: int = 64) -> tuple[int, int]:
    """(d_in slices, d_in per slice) of the shrink pass. Split-K only when the row blocks
    cdiv(n, block_m) number fewer than the SMs (well under the ~2 waves the GPU wants); then
    enough slices of at least ``min_slice`` columns (a multiple of ``granule``) for ~2 waves."""
    programs = _cdiv(n, block_m)
    if not 0 < programs < sms:
        return 1, d_in
    split = min(_cdiv(2 * sms, programs), max(1, d_in // min_slice))
    if split <= 1:
        return 1, d_in
    per = _cdiv(_cdiv(d_in, split), granule) * granule
    return _cdiv(d_in, per), per


def _dot_modes(dtype: torch.dtype, interp: bool, mode: str, allow_tf32: bool, router_dot: str):
    """Dot constexprs for activations of ``dtype``: (ROUND, DOT_DTYPE, PRECISION) of the dots, the
    same triple for the router-gradient dots (dl·R, dlᵀ·x), and the torch dtype dz is stored in."""
    if dtype == torch.float32:
        strategy = fp32_strategy("cpu" if interp else "cuda", interp, allow_tf32, mode)
        if strategy == "ieee":
            main = ("none", tl.float32, "ieee")
        else:  # "tf32" ("torch" never reaches the kernels)
            main = ("tf32t", tl.float32, "ieee") if interp else ("none", tl.float32, "tf32")
        return main, main, torch.float32
    half = {torch.float16: ("fp16", tl.float16), torch.bfloat16: ("bf16", tl.bfloat16)}[dtype]
    router_tf32 = dtype == torch.float16 and router_dot == "tf32"
    if not interp:  # the router dots' operands are rounded to TF32 (nearest even) in the kernel
        main = ("none", half[1], "tf32")
        return main, (("tf32", tl.float32, "tf32") if router_tf32 else main), dtype
    if mode == "fp32":
        main = ("none", tl.float32, "ieee")
        return main, main, torch.float32
    main = (half[0], tl.float32, "ieee")
    # dz is kept in fp32 and rounded at each dot (the interpreter's bf16 store truncates)
    return main, (("tf32", tl.float32, "ieee") if router_tf32 else main), torch.float32


@functools.lru_cache(maxsize=256)
def _plan(N: int, d_in: int, d_out: int, r: int, K: int, dtype: torch.dtype, device: torch.device,
          top_k: int, has_drop: bool, mode: str, allow_tf32: bool, router_dot: str,
          other_dtypes: tuple = ()) -> SimpleNamespace:
    """Everything about a launch that depends only on the shape and dtypes (x's ``dtype``;
    ``other_dtypes``: y0's and the parameters'), computed once: constexprs, split counts, grids'
    dims, and (``tuned``) each kernel's autotuned config with its grid once the autotuner has
    chosen it, so later calls launch the JITFunction directly."""
    interp = interpreting()
    sms = _num_sms(device)
    main, router, dz_dtype = _dot_modes(dtype, interp, mode, allow_tf32, router_dot)
    if interp:
        s_split, kps = shrink_split(N, d_in, sms, granule=_INTERP_BLOCKS["shrink"]["BLOCK_K"],
                                    min_slice=_INTERP_BLOCKS["shrink"]["BLOCK_K"],
                                    block_m=_INTERP_BLOCKS["shrink"]["BLOCK_M"])
        bk, bo = _INTERP_BLOCKS["dar"]["BLOCK_K"], _INTERP_BLOCKS["db"]["BLOCK_O"]
        granule = _INTERP_BLOCKS["dar"]["BLOCK_M"]
    else:
        s_split, kps = shrink_split(N, d_in, sms)
        bk, bo, granule = 64, 64, _ROW_GRANULE
    dar_split, dar_rows = _split_rows(max(N, 1), _cdiv(d_in, bk), sms, granule)
    db_split, db_rows = _split_rows(max(N, 1), K * _cdiv(d_out, bo), sms, granule)
    base = {"N": N, "D_IN": d_in, "D_OUT": d_out, "K": K}
    R_PAD, K_PAD = _pow2(r), _pow2(K)
    return SimpleNamespace(
        R_PAD=R_PAD, K_PAD=K_PAD, nb=_n_bucket(N), D4=_cdiv(d_in, 4), BLOCK_R=_block_r(R_PAD),
        main=dict(ROUND=main[0], DOT_DTYPE=main[1], PRECISION=main[2]),
        router=dict(DL_ROUND=router[0], DL_DTYPE=router[1], DL_PRECISION=router[2]),
        dz_dtype=dz_dtype, s_split=s_split, kps=kps, dar_split=dar_split, dar_rows=dar_rows,
        db_split=db_split, db_rows=db_rows, tuned={},
        dims={name: dict(base, SPLIT={"shrink": s_split, "dar": dar_split, "db": db_split}.get(name, 1))
              for name in KERNEL_NAMES})


def _n_bucket(n: int) -> int:
    """Autotune key for the token count: the next power of two (avoids retuning per batch)."""
    return _pow2(n, 1)


def _launch(state, plan, name: str, *args, **kwargs):
    """Launch kernel ``name``: autotuned on CUDA (through the autotuner the first time for this
    plan, then straight to the JITFunction with the config it chose), the fixed interpreter blocks
    otherwise."""
    dims = plan.dims[name]
    if not state.autotuned:
        blocks = _INTERP_BLOCKS[name]
        getattr(state, name)[launch_grid(name, dims, blocks)](*args, **kwargs, **blocks)
        return
    tuned = plan.tuned.get(name)
    if tuned is not None:
        fn, grid, config_kwargs = tuned
        fn[grid](*args, **kwargs, **config_kwargs)
        return
    kernel = getattr(state, name)
    kernel[lambda meta: launch_grid(name, dims, meta)](*args, **kwargs)
    config = getattr(kernel, "best_config", None)
    if config is not None:
        plan.tuned[name] = (kernel.fn, launch_grid(name, dims, config.kwargs), config.all_kwargs())


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
    grid = launch_grid("mask", {"N": n, "D_IN": d_in}, b)
    _kernels().mask[grid](out, n, d_in, _cdiv(d_in, 4), float(p), normalize_seed(seed), **b)
    return out.bool().reshape(shape)


def _forward(state, plan, x, y, A, B, R, scaling, temperature, top_k, dropout_p, seed):
    """Shrink+route then expand into ``y`` in place. Returns (z [N, r] fp32, w [N, K] fp32)."""
    N, d_in = x.shape
    K, d_out, r = B.shape
    dev = x.device
    z = torch.empty((N, r), dtype=torch.float32, device=dev)
    w = torch.empty((N, K), dtype=torch.float32, device=dev)
    split = plan.s_split
    zp, lp = (torch.empty((split, N, r), dtype=torch.float32, device=dev),
              torch.empty((split, N, K), dtype=torch.float32, device=dev)) if split > 1 else (z, w)
    inv_temp = 1.0 / temperature
    _launch(state, plan, "shrink",
            x, A, R, z, w, zp, lp, N, d_in, plan.D4, r, K, plan.nb, plan.kps,
            x.stride(0), A.stride(0), R.stride(0),
            inv_temp, float(dropout_p), 1.0 / (1.0 - dropout_p), seed,
            R_PAD=plan.R_PAD, K_PAD=plan.K_PAD, TOP_K=(top_k or 0), HAS_DROPOUT=dropout_p > 0.0,
            PARTIAL=split > 1, **plan.main)
    if split > 1:
        _launch(state, plan, "route", zp, lp, z, w, N, r, K, plan.nb, split, inv_temp,
                R_PAD=plan.R_PAD, K_PAD=plan.K_PAD, TOP_K=(top_k or 0))
    _launch(state, plan, "expand",
            y, z, w, B, N, d_out, r, K, plan.nb,
            y.stride(0), B.stride(0), B.stride(1), float(scaling),
            R_PAD=plan.R_PAD, BLOCK_R=plan.BLOCK_R, **plan.main)
    return z, w


class _ILoRAFused(torch.autograd.Function):
    """Autograd wrapper: y0 [..., d_out] and x [..., d_in] keep their leading dims here and are
    flattened to rows inside, so an in-place call marks y0 itself dirty. (Flattening outside would
    hand autograd a view of y0, whose in-place update costs a CopySlices backward: a zero fill and
    four [N, d_out] copies per step, measured on an H200.) In place requires a contiguous y0."""

    @staticmethod
    def forward(ctx, y0, x, A, B, R, scaling, temperature, top_k, dropout_p, seed, inplace, plan):
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
            z, w = _forward(_kernels(), plan, x2, y.view(-1, y.shape[-1]), A, B, R, scaling, temperature,
                            top_k, dropout_p, seed)
        ctx.save_for_backward(x2, A, B, R, z, w)
        ctx.cfg = (scaling, temperature, dropout_p, seed, plan)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, R, z, w = ctx.saved_tensors
        scaling, temperature, dropout_p, seed, plan = ctx.cfg
        need_y0, need_x, need_A, need_B, need_R = ctx.needs_input_grad[:5]
        dy_full = dy
        dy = _rows(dy.reshape(-1, dy.shape[-1]))
        N, d_in = x.shape
        K, d_out, r = B.shape
        dev = x.device
        dx = dA = dB = dR = None
        if N == 0:  # no tokens: zero parameter gradients, empty dx
            grads = [x.new_zeros(ctx.x_shape) if need_x else None] + [
                torch.zeros_like(t) if need else None for t, need in ((A, need_A), (B, need_B), (R, need_R))]
            return (dy_full if need_y0 else None, *grads, None, None, None, None, None, None, None)
        state = _kernels()
        has_drop = dropout_p > 0.0
        drop_scale = 1.0 / (1.0 - dropout_p)
        pads = dict(R_PAD=plan.R_PAD, K_PAD=plan.K_PAD)
        if need_x or need_A or need_R:
            dw = torch.empty((N, K), dtype=torch.float32, device=dev)
            gw = torch.empty((K, N, r), dtype=torch.float32, device=dev)
            _launch(state, plan, "g",
                    dy, B, z, w, dw, gw, N, d_out, r, K, plan.nb,
                    dy.stride(0), B.stride(0), B.stride(1), float(scaling),
                    R_PAD=plan.R_PAD, **plan.main)
            dz = torch.empty((N, r), dtype=plan.dz_dtype, device=dev)
            dl = torch.empty((N, K), dtype=torch.float32, device=dev)
            _launch(state, plan, "glue", gw, dw, w, dz, dl, N, r, K, plan.nb, 1.0 / temperature, **pads)
            if need_x:
                dx = torch.empty((N, d_in), dtype=x.dtype, device=dev)
                _launch(state, plan, "dx",
                        dz, dl, A, R, dx, N, d_in, plan.D4, r, K, plan.nb,
                        A.stride(0), R.stride(0), dx.stride(0), float(dropout_p), drop_scale, seed,
                        BLOCK_R=plan.BLOCK_R, HAS_DROPOUT=has_drop, **pads, **plan.main, **plan.router)
            if need_A or need_R:
                split = plan.dar_split
                da = torch.empty((split, r, d_in), dtype=torch.float32, device=dev)
                dr = torch.empty((split, K, d_in), dtype=torch.float32, device=dev)
                _launch(state, plan, "dar",
                        x, dz, dl, da, dr, N, d_in, plan.D4, r, K, plan.nb, plan.dar_rows,
                        x.stride(0), float(dropout_p), drop_scale, seed,
                        HAS_DROPOUT=has_drop, **pads, **plan.main, **plan.router)
                dA = (da[0] if split == 1 else da.sum(0)).to(A.dtype) if need_A else None
                dR = (dr[0] if split == 1 else dr.sum(0)).to(R.dtype) if need_R else None
        if need_B:
            split = plan.db_split
            db = torch.empty((split, K, d_out, r), dtype=torch.float32, device=dev)
            _launch(state, plan, "db",
                    dy, z, w, db, N, d_out, r, K, plan.nb, plan.db_rows, dy.stride(0), float(scaling),
                    R_PAD=plan.R_PAD, **plan.main)
            dB = (db[0] if split == 1 else db.sum(0)).to(B.dtype)
        dy0 = dy_full if need_y0 else None
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return dy0, dx, dA, dB, dR, None, None, None, None, None, None, None


def _stacked(x, y0, A, B, R, scaling, temperature, top_k, dropout_p, seed, inplace):
    """The PyTorch stacked form (``reference.ilora_reference``) in x's dtype, with the kernel's
    dropout mask, in-place contract and gradients (dy0 = dy; parameters get theirs in their dtype)."""
    dt = x.dtype
    delta = ilora_reference(x, 0.0, A.to(dt), B.to(dt), R.to(dt), scaling, temperature, top_k,
                            dropout_p, seed).to(y0.dtype)
    return y0.add_(delta) if inplace else y0 + delta


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
      input's dtype. fp32 x runs the kernel with TF32 dots when
      ``torch.backends.cuda.matmul.allow_tf32`` is True, else the stacked PyTorch form
      (``reference.ilora_reference``: same result, mask and gradients); see ``fp32_strategy``.
    - limits: 1 <= K <= 16, 1 <= r <= 256, d_in and d_out <= MAX_DIM (4 194 240); any N.
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
    if d_in > MAX_DIM or d_out > MAX_DIM:
        raise ValueError(f"the fused kernel supports d_in, d_out <= {MAX_DIM} (their blocks sit on a grid "
                         f"axis limited to 65 535); got d_in={d_in}, d_out={d_out}")
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
    seed = normalize_seed(seed)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    strategy = fp32_strategy(x.device.type, interpreting(), allow_tf32, _rounding)
    if x.dtype == torch.float32 and strategy == "torch":
        return _stacked(x, y0, lora_A, lora_B, lora_router, float(scaling), float(temperature), top_k,
                        float(dropout_p), seed, inplace)
    plan = _plan(math.prod(x.shape[:-1]), d_in, d_out, r, K, x.dtype, x.device, top_k or 0, dropout_p > 0.0,
                 _rounding, allow_tf32, _FP16_ROUTER_DOT,
                 (y0.dtype, lora_A.dtype, lora_B.dtype, lora_router.dtype))
    return _ILoRAFused.apply(y0, x, _rows(lora_A), _rows(lora_B), _rows(lora_router), float(scaling),
                             float(temperature), top_k, float(dropout_p), seed, bool(inplace), plan)
