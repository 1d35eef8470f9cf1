"""PyTorch reference of the I-LoRA layer and of the fused kernel's dropout mask.

Token-level notation: x [N, d_in], frozen base output y0 = W x + b [N, d_out],
A [r, d_in] (shared down projection), B [K, d_out, r] (one up projection per head),
R [K, d_in] (token router), s = alpha / r:

    z = drop(x) Aᵀ                     [N, r]
    w = softmax(x Rᵀ / τ)  (top-k: keep the k largest logits, renormalise)   [N, K]
    y = y0 + s Σ_k w_k z B_kᵀ = y0 + s [w_1 z, …, w_K z] [B_1 | … | B_K]ᵀ

Everything here runs in the dtype of its inputs (pass float64 tensors for a high-precision
reference) and is differentiable by autograd. Nothing here needs triton.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) scale


def normalize_seed(seed: int) -> int:
    """Map any Python int to the 63-bit non-negative seed both the kernel and the reference use."""
    return int(seed) % (1 << 63)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the uint32 constant a and uint32 values b.

    b is an int64 tensor holding values in [0, 2**32); 16-bit splitting keeps every partial
    product below 2**49, so nothing overflows int64.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo
    p_hi = b * a_hi
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_randint4x(seed: int, counter: torch.Tensor, n_rounds: int = 10):
    """Philox-4x32 exactly as ``tl.randint4x(seed, counter)`` for an int64 ``counter`` block.

    counter: int64 tensor of any shape (non-negative). Returns four int64 tensors of the
    same shape holding the uint32 outputs.
    """
    seed = normalize_seed(seed)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    counter = counter.to(torch.int64)
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(u: torch.Tensor) -> torch.Tensor:
    """uint32 values (int64 tensor) -> float32 in [0, 1), bit-identical to tl.rand's conversion."""
    t = torch.where(u >= (1 << 31), u ^ _M32, u)  # int32 bitcast, negative -> ~x
    return t.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=u.device)


def dropout_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """Keep mask the fused kernel draws for x of ``shape`` = (..., d_in) and this seed.

    Element (n, i) of the flattened x [N, d_in] is kept iff u > p, where u is the uniform
    float of lane i % 4 of ``tl.randint4x(seed, n * ceil(d_in / 4) + i // 4)``.
    Returns a bool tensor of ``shape`` (True = kept); kept values are scaled by 1 / (1 - p).
    """
    shape = tuple(int(s) for s in shape)
    d_in = shape[-1]
    n = 1
    for s in shape[:-1]:
        n *= s
    d4 = (d_in + 3) // 4
    counter = torch.arange(n, device=device, dtype=torch.int64)[:, None] * d4 + torch.arange(
        d4, device=device, dtype=torch.int64
    )[None, :]
    lanes = [_uniform(v) for v in philox_randint4x(seed, counter)]
    u = torch.stack(lanes, dim=-1).reshape(n, 4 * d4)[:, :d_in]
    p32 = torch.tensor(p, dtype=torch.float32, device=u.device)
    return (u > p32).reshape(shape)


def topk_keep(logits: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """Bool mask [..., K] of the top_k largest logits (ties -> the lower head index), or None."""
    K = logits.shape[-1]
    if top_k is None or top_k >= K:
        return None
    li = logits.unsqueeze(-1)  # [..., i, 1]
    lj = logits.unsqueeze(-2)  # [..., 1, j]
    idx = torch.arange(K, device=logits.device)
    before = idx[None, :] < idx[:, None]  # [i, j]: j < i
    rank = ((lj > li) | ((lj == li) & before)).sum(-1)
    return rank < top_k


def route_weights(x: torch.Tensor, lora_router: torch.Tensor, temperature: float = 1.0,
                  top_k: int | None = None) -> torch.Tensor:
    """Routing weights w [..., K] = softmax(x Rᵀ / τ), restricted to the top_k heads and renormalised.

    x: [..., d_in], lora_router: [K, d_in]. Computed in x's dtype.
    """
    logits = (x @ lora_router.t()) / temperature
    keep = topk_keep(logits, top_k)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _dropped(x: torch.Tensor, dropout_p: float, seed: int, mask: torch.Tensor | None) -> torch.Tensor:
    if dropout_p <= 0.0:
        return x
    if mask is None:
        mask = dropout_mask(seed, x.shape, dropout_p, x.device)
    return x * mask.to(x.dtype) * (1.0 / (1.0 - dropout_p))


def ilora_reference(x: torch.Tensor, y0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    lora_router: torch.Tensor, scaling: float, temperature: float = 1.0,
                    top_k: int | None = None, dropout_p: float = 0.0, seed: int = 0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stacked form: y = y0 + s · [w_1 z, …, w_K z] · [B_1 | … | B_K]ᵀ (one GEMM over K·r).

    x [..., d_in], y0 [..., d_out], lora_A [r, d_in], lora_B [K, d_out, r], lora_router [K, d_in]
    -> y [..., d_out]. Dropout (on the z path only) uses ``dropout_mask(seed, x.shape, p)``
    unless an explicit bool ``mask`` [..., d_in] is given.
    """
    K, d_out, r = lora_B.shape
    z = _dropped(x, dropout_p, seed, mask) @ lora_A.t()  # [..., r]
    w = route_weights(x, lora_router, temperature, top_k)  # [..., K]
    zw = (w.unsqueeze(-1) * z.unsqueeze(-2)).reshape(*z.shape[:-1], K * r)  # [..., K·r]
    b_cat = lora_B.permute(1, 0, 2).reshape(d_out, K * r)  # [d_out, K·r]
    return y0 + scaling * (zw @ b_cat.t())


def ilora_reference_loop(x: torch.Tensor, y0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         lora_router: torch.Tensor, scaling: float, temperature: float = 1.0,
                         top_k: int | None = None, dropout_p: float = 0.0, seed: int = 0,
                         mask: torch.Tensor | None = None, recompute_shrink: bool = False) -> torch.Tensor:
    """Explicit per-head loop: y = y0 + s Σ_k w_k · (z B_kᵀ); same shapes as ``ilora_reference``.

    ``recompute_shrink=True`` recomputes z = drop(x) Aᵀ inside the loop for every head, as
    Crab's released I-LoRA layer does (the unfused baseline of the benchmark).
    """
    K = lora_B.shape[0]
    w = route_weights(x, lora_router, temperature, top_k)
    xd = _dropped(x, dropout_p, seed, mask)
    z = None if recompute_shrink else xd @ lora_A.t()
    y = y0
    for k in range(K):
        zk = (xd @ lora_A.t()) if recompute_shrink else z
        y = y + scaling * w[..., k : k + 1] * (zk @ lora_B[k].t())
    return y
