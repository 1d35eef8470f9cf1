"""Triton kernels of the fused I-LoRA layer (imported only when triton is importable).

Notation (token level, all row-major, last dimension contiguous):
x [N, d_in], A [r, d_in], R [K, d_in], B [K, d_out, r], z [N, r] (fp32), w [N, K] (fp32).
``R_PAD`` / ``K_PAD`` are r / K padded to a power of two >= 16 (the minimum tl.dot size);
padded lanes are loaded as zeros (or -inf logits) and never stored.

Kernels (the launchers, configs and grids live in ``avmt_kernels.ilora``):

- ``shrink_route_kernel``: one pass over x -> z = drop(x) Aᵀ and logits = x Rᵀ, softmax /
  temperature / top-k renormalisation in the epilogue; writes z and w. With ``PARTIAL`` it
  covers one slice of d_in (split-K) and writes fp32 partial z / logits instead; then
- ``route_reduce_kernel`` sums the partials and runs the same routing epilogue.
- ``expand_kernel``: y += s Σ_k w_k z B_kᵀ in place, one reduction over K·r.
- ``bwd_g_kernel``: g_k = dy B_k (one GEMM over dy), epilogue dw_k = s<g_k, z> and the
  per-head dz contribution s w_k g_k.
- ``bwd_glue_kernel``: dz = Σ_k s w_k g_k and the softmax Jacobian dl = w ⊙ (dw − <w, dw>) / τ.
- ``bwd_dx_kernel``: dx = drop'(dz A) + dl R.
- ``bwd_dar_kernel``: dA = dzᵀ drop(x), dR = dlᵀ x in one pass over x (split over N).
- ``bwd_db_kernel``: dB_k = s dyᵀ (w_k z) (second and last GEMM over dy; split over N).
- ``dropout_mask_kernel``: writes the keep mask (used by the tests to prove that the
  PyTorch reference ``avmt_kernels.reference.dropout_mask`` is bit-identical).

Dot operands go through ``_as_dot(v, ROUND, DOT)``: compiled, ROUND is "none" and the operand is
cast to DOT (bf16/fp16, or fp32 for TF32 dots), which rounds it. Under the interpreter DOT is fp32
(its bf16 dot is wrong) and ROUND ("bf16", "fp16", "tf32") reproduces that rounding bit for bit in
fp32, so interpreter tests see the compiled kernel's operand rounding.

Seeds are annotated ``tl.int64`` and listed in ``do_not_specialize``: one compiled variant serves
every seed (triton otherwise specialises ints equal to 1, divisible by 16, or >= 2**31).

Dropout mask: element (n, i) of x is kept iff ``u > p`` where u is the uniform float that
``tl.rand`` would produce from lane ``i % 4`` of ``tl.randint4x(seed, n * ceil(d_in/4) + i // 4)``
(Philox-4x32-10, one Philox call per four elements). The mask is regenerated from the seed
wherever it is needed and never stored.
"""

import os

import triton
import triton.language as tl

try:  # triton >= 3.2; older releases read the environment variable directly
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # pragma: no cover
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SEED_ARGS = ["seed"]  # do_not_specialize of every kernel that takes a dropout seed


@triton.jit
def _uniform(i):
    """uint32 block -> float32 in [0, 1), the conversion tl.rand uses."""
    x = i.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep mask [BLOCK_M, BLOCK_K] for rows ``rows`` and columns k0 .. k0+BLOCK_K (k0 % 4 == 0)."""
    q = (k0 // 4) + tl.arange(0, BLOCK_K // 4)
    counter = rows.to(tl.int64)[:, None] * D4 + q[None, :]
    i0, i1, i2, i3 = tl.randint4x(seed, counter)
    u = tl.interleave(tl.interleave(_uniform(i0), _uniform(i2)), tl.interleave(_uniform(i1), _uniform(i3)))
    return u > p_drop


@triton.jit
def _as_dot(v, ROUND: tl.constexpr, DOT: tl.constexpr):
    """``v`` as a tl.dot operand of dtype DOT. ROUND first rounds v in fp32 the way the compiled
    kernel's operand is rounded: "bf16" / "fp16" as a cast does (round to nearest even; bf16 by
    bits, since the interpreter's own bf16 cast truncates), "tf32" to 10 mantissa bits, nearest
    even (used compiled too, where it makes the TF32 dot's operand exact), "tf32t" truncated to 10
    mantissa bits (how tensor cores read an fp32 operand in a TF32 dot: interpreter only)."""
    if ROUND == "bf16":
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = b.to(tl.float32, bitcast=True)
    elif ROUND == "fp16":
        v = v.to(tl.float16)
    elif ROUND == "tf32":
        b = v.to(tl.float32).to(tl.uint32, bitcast=True)
        v = ((b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    elif ROUND == "tf32t":
        v = (v.to(tl.float32).to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return v.to(DOT)


@triton.jit
def _as_out(v, OUT: tl.constexpr, ROUND: tl.constexpr):
    """fp32 ``v`` cast to the output dtype OUT. When ROUND emulates the GPU (interpreter only), a bf16
    output is rounded to nearest even first, as the compiled cast does (the interpreter's truncates)."""
    if ROUND != "none":
        if OUT == tl.bfloat16:
            v = _as_dot(v, "bf16", tl.float32)
    return v.to(OUT)


@triton.jit
def _route(acc_l, rows, kk, K, inv_temp, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Routing weights [BLOCK_M, K_PAD] from raw logits: temperature, optional top-k, softmax."""
    logits = acc_l * inv_temp
    valid = (kk < K)[None, :] & (rows >= 0)[:, None]
    neg_inf = float("-inf")
    logits = tl.where(valid, logits, neg_inf)
    if TOP_K > 0:
        cur = logits
        sel = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int1)
        for _t in tl.static_range(TOP_K):
            mx = tl.max(cur, axis=1)
            first = tl.min(tl.where(cur == mx[:, None], kk[None, :], K_PAD), axis=1)
            pick = kk[None, :] == first[:, None]
            sel = sel | pick
            cur = tl.where(pick, neg_inf, cur)
        logits = tl.where(sel, logits, neg_inf)
    m = tl.max(logits, axis=1)
    e = tl.exp(logits - m[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit(do_not_specialize=SEED_ARGS)
def dropout_mask_kernel(OUT, N, D_IN, D4, p_drop, seed: tl.int64,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT [N, D_IN] int8 <- keep mask of the fused kernels for this seed.
    Grid (row blocks, column blocks)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, pid_k * BLOCK_K, D4, p_drop, BLOCK_M, BLOCK_K)
    ok = (rows[:, None] < N) & (cols[None, :] < D_IN)
    tl.store(OUT + rows[:, None].to(tl.int64) * D_IN + cols[None, :], keep.to(tl.int8), mask=ok)


@triton.jit(do_not_specialize=SEED_ARGS)
def shrink_route_kernel(
    X, A, R, Z, W, ZP, LP,
    N, D_IN, D4, RANK, K, N_BUCKET, k_per_split,
    stride_xm, stride_am, stride_rm,
    inv_temp, p_drop, drop_scale, seed: tl.int64,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, TOP_K: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PARTIAL: tl.constexpr, ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row blocks, d_in slices). Z [N, RANK] fp32 <- drop(X) Aᵀ; W [N, K] fp32 <- (top-k)
    softmax(X Rᵀ · inv_temp). With PARTIAL, slice s covers d_in [s·k_per_split, (s+1)·k_per_split)
    and writes ZP[s] [N, RANK] (dropout-scaled) and LP[s] [N, K] (raw logits) instead."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, K_PAD)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    acc_z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, D_IN)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a_t = tl.load(A + rr[None, :] * stride_am + cols[:, None],
                      mask=(rr[None, :] < RANK) & col_ok[:, None], other=0.0)
        r_t = tl.load(R + kk[None, :] * stride_rm + cols[:, None],
                      mask=(kk[None, :] < K) & col_ok[:, None], other=0.0)
        xd = _as_dot(x, ROUND, DOT_DTYPE)
        acc_l = tl.dot(xd, _as_dot(r_t, ROUND, DOT_DTYPE), acc_l, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
            xd = tl.where(keep, xd, tl.zeros_like(xd))
        acc_z = tl.dot(xd, _as_dot(a_t, ROUND, DOT_DTYPE), acc_z, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc_z = acc_z * drop_scale
    rows64 = rows.to(tl.int64)
    z_ok = row_ok[:, None] & (rr[None, :] < RANK)
    w_ok = row_ok[:, None] & (kk[None, :] < K)
    if PARTIAL:
        s64 = split.to(tl.int64)
        tl.store(ZP + s64 * N * RANK + rows64[:, None] * RANK + rr[None, :], acc_z, mask=z_ok)
        tl.store(LP + s64 * N * K + rows64[:, None] * K + kk[None, :], acc_l, mask=w_ok)
    else:
        w = _route(acc_l, rows, kk, K, inv_temp, TOP_K, K_PAD, BLOCK_M)
        tl.store(Z + rows64[:, None] * RANK + rr[None, :], acc_z, mask=z_ok)
        tl.store(W + rows64[:, None] * K + kk[None, :], w, mask=w_ok)


@triton.jit
def route_reduce_kernel(
    ZP, LP, Z, W,
    N, RANK, K, N_BUCKET, n_split, inv_temp,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid (row blocks,). Z <- Σ_s ZP[s];  W <- routing epilogue of Σ_s LP[s] (split-K shrink)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, K_PAD)
    z_ok = row_ok[:, None] & (rr[None, :] < RANK)
    w_ok = row_ok[:, None] & (kk[None, :] < K)
    acc_z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    n64 = tl.full((), 0, tl.int64) + N  # (N may be the constant 1)
    for s in range(0, n_split):
        acc_z += tl.load(ZP + n64 * s * RANK + rows64[:, None] * RANK + rr[None, :], mask=z_ok, other=0.0)
        acc_l += tl.load(LP + n64 * s * K + rows64[:, None] * K + kk[None, :], mask=w_ok, other=0.0)
    w = _route(acc_l, rows, kk, K, inv_temp, TOP_K, K_PAD, BLOCK_M)
    tl.store(Z + rows64[:, None] * RANK + rr[None, :], acc_z, mask=z_ok)
    tl.store(W + rows64[:, None] * K + kk[None, :], w, mask=w_ok)


@triton.jit
def expand_kernel(
    Y, Z, W, B,
    N, D_OUT, RANK, K, N_BUCKET,
    stride_ym, stride_bk, stride_bo, scaling,
    R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT: tl.constexpr,
):
    """Grid (row blocks, d_out blocks). Y [N, D_OUT] += scaling · Σ_k (W[:, k] · Z) B_kᵀ, in place.

    The K·R_PAD reduction runs as one flat loop in BLOCK_R steps (FLAT = 1: one loop for the
    software pipeliner) or as a head loop around a rank loop (FLAT = 0); the autotuner picks."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D_OUT
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT:
        for kr in range(0, K * R_PAD, BLOCK_R):
            k = kr // R_PAD
            r0 = tl.multiple_of(kr - k * R_PAD, BLOCK_R)  # keeps the z / B loads vectorised
            k64 = tl.full((), 0, tl.int64) + k
            rc = r0 + tl.arange(0, BLOCK_R)
            rc_ok = rc < RANK
            wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
            zt = tl.load(Z + rows64[:, None] * RANK + rc[None, :],
                         mask=row_ok[:, None] & rc_ok[None, :], other=0.0)
            bt = tl.load(B + k64 * stride_bk + cols64[None, :] * stride_bo + rc[:, None],
                         mask=col_ok[None, :] & rc_ok[:, None], other=0.0)
            acc = tl.dot(_as_dot(zt * wk[:, None], ROUND, DOT_DTYPE), _as_dot(bt, ROUND, DOT_DTYPE), acc,
                         input_precision=PRECISION)
    else:
        for k in range(0, K):
            k64 = tl.full((), 0, tl.int64) + k
            wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
            for r0 in range(0, R_PAD, BLOCK_R):
                rc = r0 + tl.arange(0, BLOCK_R)
                rc_ok = rc < RANK
                zt = tl.load(Z + rows64[:, None] * RANK + rc[None, :],
                             mask=row_ok[:, None] & rc_ok[None, :], other=0.0)
                bt = tl.load(B + k64 * stride_bk + cols64[None, :] * stride_bo + rc[:, None],
                             mask=col_ok[None, :] & rc_ok[:, None], other=0.0)
                acc = tl.dot(_as_dot(zt * wk[:, None], ROUND, DOT_DTYPE), _as_dot(bt, ROUND, DOT_DTYPE), acc,
                             input_precision=PRECISION)
    y_ptrs = Y + rows64[:, None] * stride_ym + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32) + scaling * acc
    tl.store(y_ptrs, _as_out(y, Y.dtype.element_ty, ROUND), mask=ok)


@triton.jit
def bwd_g_kernel(
    DY, B, Z, W, DW, GW,
    N, D_OUT, RANK, K, N_BUCKET,
    stride_dym, stride_bk, stride_bo, scaling,
    R_PAD: tl.constexpr, ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid (row blocks · K,), heads fastest (the K programs of a row block share its dy tiles in L2).
    g_k = DY B_k [N, RANK];  DW[:, k] <- scaling·<g_k, Z>;  GW[k] <- scaling·W[:, k]·g_k (fp32)."""
    pid = tl.program_id(0)
    k = pid % K
    pid_m = pid // K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    rr_ok = rr < RANK
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        oc = o0 + tl.arange(0, BLOCK_O)
        oc_ok = oc < D_OUT
        dy = tl.load(DY + rows64[:, None] * stride_dym + oc[None, :],
                     mask=row_ok[:, None] & oc_ok[None, :], other=0.0)
        bt = tl.load(B + k.to(tl.int64) * stride_bk + oc[:, None].to(tl.int64) * stride_bo + rr[None, :],
                     mask=oc_ok[:, None] & rr_ok[None, :], other=0.0)
        acc = tl.dot(_as_dot(dy, ROUND, DOT_DTYPE), _as_dot(bt, ROUND, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    ok = row_ok[:, None] & rr_ok[None, :]
    z = tl.load(Z + rows64[:, None] * RANK + rr[None, :], mask=ok, other=0.0)
    dw = scaling * tl.sum(acc * z, axis=1)
    tl.store(DW + rows64 * K + k, dw, mask=row_ok)
    wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
    gw = (scaling * wk)[:, None] * acc
    tl.store(GW + k.to(tl.int64) * N * RANK + rows64[:, None] * RANK + rr[None, :], gw, mask=ok)


@triton.jit
def bwd_glue_kernel(
    GW, DW, W, DZ, DL,
    N, RANK, K, N_BUCKET, inv_temp,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (row blocks,). DZ [N, RANK] <- Σ_k GW[k] (stored in DZ's dtype: the dtype the dot
    kernels round dz to anyway);  DL [N, K] fp32 <- W ⊙ (DW − <W, DW>) · inv_temp."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, K_PAD)
    z_ok = row_ok[:, None] & (rr[None, :] < RANK)
    w_ok = row_ok[:, None] & (kk[None, :] < K)
    dz = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n64 = tl.full((), 0, tl.int64) + N  # (N may be the constant 1)
    for k in range(0, K):
        dz += tl.load(GW + n64 * k * RANK + rows64[:, None] * RANK + rr[None, :], mask=z_ok, other=0.0)
    tl.store(DZ + rows64[:, None] * RANK + rr[None, :], dz.to(DZ.dtype.element_ty), mask=z_ok)
    w = tl.load(W + rows64[:, None] * K + kk[None, :], mask=w_ok, other=0.0)
    dw = tl.load(DW + rows64[:, None] * K + kk[None, :], mask=w_ok, other=0.0)
    dl = w * (dw - tl.sum(w * dw, axis=1)[:, None]) * inv_temp
    tl.store(DL + rows64[:, None] * K + kk[None, :], dl, mask=w_ok)


@triton.jit(do_not_specialize=SEED_ARGS)
def bwd_dx_kernel(
    DZ, DL, A, R, DX,
    N, D_IN, D4, RANK, K, N_BUCKET,
    stride_am, stride_rm, stride_dxm,
    p_drop, drop_scale, seed: tl.int64,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    DL_ROUND: tl.constexpr, DL_DTYPE: tl.constexpr, DL_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (row blocks, d_in blocks). DX [N, D_IN] <- drop'(DZ A) + DL R  (DL [N, K] fp32; the
    router term's dot runs in DL_DTYPE, fp32/TF32 for fp16 so that small dl do not underflow)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < D_IN
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R_PAD, BLOCK_R):
        rc = r0 + tl.arange(0, BLOCK_R)
        rc_ok = rc < RANK
        dz = tl.load(DZ + rows64[:, None] * RANK + rc[None, :],
                     mask=row_ok[:, None] & rc_ok[None, :], other=0.0)
        a = tl.load(A + rc[:, None] * stride_am + cols[None, :],
                    mask=rc_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(_as_dot(dz, ROUND, DOT_DTYPE), _as_dot(a, ROUND, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
        acc = tl.where(keep, acc * drop_scale, 0.0)
    kk = tl.arange(0, K_PAD)
    dl = tl.load(DL + rows64[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
    rt = tl.load(R + kk[:, None] * stride_rm + cols[None, :],
                 mask=(kk[:, None] < K) & col_ok[None, :], other=0.0)
    acc = tl.dot(_as_dot(dl, DL_ROUND, DL_DTYPE), _as_dot(rt, DL_ROUND, DL_DTYPE), acc,
                 input_precision=DL_PRECISION)
    tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], _as_out(acc, DX.dtype.element_ty, ROUND),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=SEED_ARGS)
def bwd_dar_kernel(
    X, DZ, DL, DA, DR,
    N, D_IN, D4, RANK, K, N_BUCKET, rows_per_split,
    stride_xm,
    p_drop, drop_scale, seed: tl.int64,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    DL_ROUND: tl.constexpr, DL_DTYPE: tl.constexpr, DL_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (d_in blocks, N splits). Split s: DA[s] [RANK, D_IN] <- DZᵀ drop(X),
    DR[s] [K, D_IN] <- DLᵀ X (fp32 partials; the DL dot runs in DL_DTYPE, see bwd_dx_kernel)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < D_IN
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, K_PAD)
    acc_a = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    acc_r = tl.zeros((K_PAD, BLOCK_K), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dzt = tl.load(DZ + rows64[None, :] * RANK + rr[:, None],
                      mask=row_ok[None, :] & (rr[:, None] < RANK), other=0.0)
        dlt = tl.load(DL + rows64[None, :] * K + kk[:, None],
                      mask=row_ok[None, :] & (kk[:, None] < K), other=0.0)
        acc_r = tl.dot(_as_dot(dlt, DL_ROUND, DL_DTYPE), _as_dot(x, DL_ROUND, DL_DTYPE), acc_r,
                       input_precision=DL_PRECISION)
        xd = _as_dot(x, ROUND, DOT_DTYPE)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
            xd = tl.where(keep, xd, tl.zeros_like(xd))
        acc_a = tl.dot(_as_dot(dzt, ROUND, DOT_DTYPE), xd, acc_a, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc_a = acc_a * drop_scale
    base_a = DA + split.to(tl.int64) * RANK * D_IN
    tl.store(base_a + rr[:, None] * D_IN + cols[None, :], acc_a, mask=(rr[:, None] < RANK) & col_ok[None, :])
    base_r = DR + split.to(tl.int64) * K * D_IN
    tl.store(base_r + kk[:, None] * D_IN + cols[None, :], acc_r, mask=(kk[:, None] < K) & col_ok[None, :])


@triton.jit
def bwd_db_kernel(
    DY, Z, W, DB,
    N, D_OUT, RANK, K, N_BUCKET, rows_per_split,
    stride_dym, scaling,
    R_PAD: tl.constexpr, ROUND: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Grid (d_out blocks · K, N splits), heads fastest (the K programs of an output block share dy
    tiles in L2). Split s: DB[s, k] [D_OUT, RANK] <- scaling · DYᵀ (W[:, k] · Z)  (fp32 partials)."""
    pid = tl.program_id(0)
    k = pid % K
    pid_o = pid // K
    split = tl.program_id(1)
    oc = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    oc_ok = oc < D_OUT
    rr = tl.arange(0, R_PAD)
    rr_ok = rr < RANK
    acc = tl.zeros((BLOCK_O, R_PAD), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        dyt = tl.load(DY + rows64[None, :] * stride_dym + oc[:, None],
                      mask=row_ok[None, :] & oc_ok[:, None], other=0.0)
        z = tl.load(Z + rows64[:, None] * RANK + rr[None, :],
                    mask=row_ok[:, None] & rr_ok[None, :], other=0.0)
        wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
        acc = tl.dot(_as_dot(dyt, ROUND, DOT_DTYPE), _as_dot(z * wk[:, None], ROUND, DOT_DTYPE), acc,
                     input_precision=PRECISION)
    base = DB + (split.to(tl.int64) * K + k) * D_OUT * RANK
    tl.store(base + oc[:, None].to(tl.int64) * RANK + rr[None, :], scaling * acc,
             mask=oc_ok[:, None] & rr_ok[None, :])
