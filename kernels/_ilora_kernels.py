"""Triton kernels of the fused I-LoRA layer (imported only when triton is importable).

Notation (token level, all row-major, last dimension contiguous):
x [N, d_in], A [r, d_in], R [K, d_in], B [K, d_out, r], z [N, r] (fp32), w [N, K] (fp32).
``R_PAD`` / ``K_PAD`` are r / K padded to a power of two >= 16 (the minimum tl.dot size);
padded lanes are loaded as zeros (or -inf logits) and never stored.

Kernels (the launchers live in ``avmt_kernels.ilora``):

- ``shrink_route_kernel``: one pass over x -> z = drop(x) Aᵀ and logits = x Rᵀ, softmax /
  temperature / top-k renormalisation in the epilogue; writes z and w.
- ``expand_kernel``: y += s Σ_k w_k z B_kᵀ in place, one reduction over K·r.
- ``bwd_g_kernel``: g_k = dy B_k (one GEMM over dy), epilogue dw_k = s<g_k, z> and the
  per-head dz contribution s w_k g_k.
- ``bwd_dx_kernel``: dx = drop'(dz A) + dl R.
- ``bwd_dar_kernel``: dA = dzᵀ drop(x), dR = dlᵀ x in one pass over x (split over N).
- ``bwd_db_kernel``: dB_k = s dyᵀ (w_k z) (second and last GEMM over dy; split over N).
- ``dropout_mask_kernel``: writes the keep mask (used by the tests to prove that the
  PyTorch reference ``avmt_kernels.reference.dropout_mask`` is bit-identical).

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
def dropout_mask_kernel(OUT, N, D_IN, D4, p_drop, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT [N, D_IN] int8 <- keep mask of the fused kernels for this seed."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(seed, rows, pid_k * BLOCK_K, D4, p_drop, BLOCK_M, BLOCK_K)
    ok = (rows[:, None] < N) & (cols[None, :] < D_IN)
    tl.store(OUT + rows[:, None].to(tl.int64) * D_IN + cols[None, :], keep.to(tl.int8), mask=ok)


@triton.jit
def shrink_route_kernel(
    X, A, R, Z, W,
    N, D_IN, D4, RANK, K, N_BUCKET,
    stride_xm, stride_am, stride_rm,
    inv_temp, p_drop, drop_scale, seed,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, TOP_K: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z [N, RANK] fp32 <- drop(X) Aᵀ;  W [N, K] fp32 <- (top-k) softmax(X Rᵀ · inv_temp)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rr = tl.arange(0, R_PAD)
    kk = tl.arange(0, K_PAD)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    acc_z = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D_IN
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a_t = tl.load(A + rr[None, :] * stride_am + cols[:, None],
                      mask=(rr[None, :] < RANK) & col_ok[:, None], other=0.0)
        r_t = tl.load(R + kk[None, :] * stride_rm + cols[:, None],
                      mask=(kk[None, :] < K) & col_ok[:, None], other=0.0)
        xd = x.to(DOT_DTYPE)
        acc_l = tl.dot(xd, r_t.to(DOT_DTYPE), acc_l, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
            xd = tl.where(keep, xd, tl.zeros_like(xd))
        acc_z = tl.dot(xd, a_t.to(DOT_DTYPE), acc_z, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc_z = acc_z * drop_scale
    # ---- routing epilogue: temperature, optional top-k, softmax over the kept heads
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
    w = e / tl.sum(e, axis=1)[:, None]
    z_ptrs = Z + rows.to(tl.int64)[:, None] * RANK + rr[None, :]
    tl.store(z_ptrs, acc_z, mask=row_ok[:, None] & (rr[None, :] < RANK))
    w_ptrs = W + rows.to(tl.int64)[:, None] * K + kk[None, :]
    tl.store(w_ptrs, w, mask=row_ok[:, None] & (kk[None, :] < K))


@triton.jit
def expand_kernel(
    Y, Z, W, B,
    N, D_OUT, RANK, K, N_BUCKET,
    stride_ym, stride_bk, stride_bo, scaling,
    R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y [N, D_OUT] += scaling · Σ_k (W[:, k] · Z) B_kᵀ, in place (one reduction over K·RANK)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D_OUT
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K):
        wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
        for r0 in range(0, R_PAD, BLOCK_R):
            rc = r0 + tl.arange(0, BLOCK_R)
            rc_ok = rc < RANK
            zt = tl.load(Z + rows64[:, None] * RANK + rc[None, :],
                         mask=row_ok[:, None] & rc_ok[None, :], other=0.0)
            zt = (zt * wk[:, None]).to(DOT_DTYPE)
            bt = tl.load(B + k * stride_bk + cols[None, :].to(tl.int64) * stride_bo + rc[:, None],
                         mask=col_ok[None, :] & rc_ok[:, None], other=0.0)
            acc = tl.dot(zt, bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    y_ptrs = Y + rows64[:, None] * stride_ym + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32) + scaling * acc
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def bwd_g_kernel(
    DY, B, Z, W, DW, GW,
    N, D_OUT, RANK, K, N_BUCKET,
    stride_dym, stride_bk, stride_bo, scaling,
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """g_k = DY B_k [N, RANK];  DW[:, k] <- scaling·<g_k, Z>;  GW[k] <- scaling·W[:, k]·g_k (fp32)."""
    k = tl.program_id(0)  # heads fastest: the K programs of a row block share its dy tiles in L2
    pid_m = tl.program_id(1)
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
        acc = tl.dot(dy.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    ok = row_ok[:, None] & rr_ok[None, :]
    z = tl.load(Z + rows64[:, None] * RANK + rr[None, :], mask=ok, other=0.0)
    dw = scaling * tl.sum(acc * z, axis=1)
    tl.store(DW + rows64 * K + k, dw, mask=row_ok)
    wk = tl.load(W + rows64 * K + k, mask=row_ok, other=0.0)
    gw = (scaling * wk)[:, None] * acc
    tl.store(GW + k.to(tl.int64) * N * RANK + rows64[:, None] * RANK + rr[None, :], gw, mask=ok)


@triton.jit
def bwd_dx_kernel(
    DZ, DL, A, R, DX,
    N, D_IN, D4, RANK, K, N_BUCKET,
    stride_am, stride_rm, stride_dxm,
    p_drop, drop_scale, seed,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """DX [N, D_IN] <- drop'(DZ A) + DL R  (DZ [N, RANK], DL [N, K] fp32; mask regenerated)."""
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
        acc = tl.dot(dz.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
        acc = tl.where(keep, acc * drop_scale, 0.0)
    kk = tl.arange(0, K_PAD)
    dl = tl.load(DL + rows64[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
    rt = tl.load(R + kk[:, None] * stride_rm + cols[None, :],
                 mask=(kk[:, None] < K) & col_ok[None, :], other=0.0)
    acc = tl.dot(dl.to(DOT_DTYPE), rt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], acc.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def bwd_dar_kernel(
    X, DZ, DL, DA, DR,
    N, D_IN, D4, RANK, K, N_BUCKET, rows_per_split,
    stride_xm,
    p_drop, drop_scale, seed,
    R_PAD: tl.constexpr, K_PAD: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split s of N: DA[s] [RANK, D_IN] <- DZᵀ drop(X),  DR[s] [K, D_IN] <- DLᵀ X  (fp32 partials)."""
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
        xd = x.to(DOT_DTYPE)
        acc_r = tl.dot(dlt.to(DOT_DTYPE), xd, acc_r, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, k0, D4, p_drop, BLOCK_M, BLOCK_K)
            xd = tl.where(keep, xd, tl.zeros_like(xd))
        acc_a = tl.dot(dzt.to(DOT_DTYPE), xd, acc_a, input_precision=PRECISION)
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
    R_PAD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Split s of N: DB[s, k] [D_OUT, RANK] <- scaling · DYᵀ (W[:, k] · Z)  (fp32 partials)."""
    k = tl.program_id(0)  # heads fastest: the K programs of an output block share dy tiles in L2
    pid_o = tl.program_id(1)
    split = tl.program_id(2)
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
        zw = (z * wk[:, None]).to(DOT_DTYPE)
        acc = tl.dot(dyt.to(DOT_DTYPE), zw, acc, input_precision=PRECISION)
    base = DB + (split.to(tl.int64) * K + k) * D_OUT * RANK
    tl.store(base + oc[:, None].to(tl.int64) * RANK + rr[None, :], scaling * acc,
             mask=oc_ok[:, None] & rr_ok[None, :])
