"""Fused I-LoRA Triton kernel vs the PyTorch reference, on CPU through the Triton interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from avmt_kernels import reference as ref  # noqa: E402
from avmt_kernels.ilora import (  # noqa: E402
    dropout_mask_triton,
    ilora_fused,
    interpreting,
    triton_unusable_reason,
    triton_usable,
)

pytestmark = pytest.mark.skipif(not interpreting(), reason="triton was imported without TRITON_INTERPRET=1 earlier in this process")

NAMES = ("x", "y0", "A", "B", "R")


def _inputs(N, d_in, d_out, r, K, seed=0, lead=None):
    """float64 master copies of (x, y0, A, B, R); B is non-zero so every gradient is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    x = rnd(*(lead or (N,)), d_in)
    y0 = rnd(*(lead or (N,)), d_out)
    return x, y0, rnd(r, d_in, scale=d_in ** -0.5), rnd(K, d_out, r, scale=r ** -0.5), rnd(K, d_in, scale=0.5)


def _run(fn, tensors, dtype, gy, **kw):
    """y and the gradients of (x, y0, A, B, R) of fn; y0 enters as a non-leaf (in-place path)."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in tensors]
    x, y0, A, B, R = leaves
    y = fn(x, y0 * 1, A, B, R, **kw)
    y.backward(gy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def _close(name, got, want, rtol):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale + 1e-6, f"{name}: max abs err {err:.3e} vs scale {scale:.3e}"


CASES = [
    # N, d_in, d_out, r, K, top_k, dropout_p
    (70, 45, 53, 8, 1, None, 0.0),
    (70, 45, 53, 8, 3, None, 0.0),
    (70, 45, 53, 8, 3, 2, 0.2),
    (33, 100, 37, 16, 8, 3, 0.0),
    (70, 61, 90, 4, 8, None, 0.1),
    (65, 40, 70, 100, 3, 1, 0.3),
    (20, 40, 30, 256, 2, None, 0.0),
]


@pytest.mark.parametrize("N,d_in,d_out,r,K,top_k,p", CASES)
def test_fp32_forward_and_all_gradients(N, d_in, d_out, r, K, top_k, p):
    t = _inputs(N, d_in, d_out, r, K, seed=N + K)
    gy = torch.randn(N, d_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(scaling=1.7, temperature=0.8, top_k=top_k, dropout_p=p, seed=1234 + K)
    y, grads = _run(ilora_fused, t, torch.float32, gy, **kw)
    y_ref, grads_ref = _run(ref.ilora_reference, t, torch.float64, gy, **kw)
    assert y.dtype == torch.float32
    _close("y", y, y_ref, 1e-5)
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert a.dtype == torch.float32, name
        _close(f"d{name}", a, b, 1e-4)
    if K == 1:  # w ≡ 1: the router gets no gradient
        assert grads[4].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    N, d_in, d_out, r, K = 70, 45, 53, 16, 3
    t = [v.to(dtype).double() for v in _inputs(N, d_in, d_out, r, K, seed=3)]  # representable inputs
    gy = torch.randn(N, d_out, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gy = gy.to(dtype).double()
    kw = dict(scaling=2.0, top_k=2, dropout_p=0.1, seed=77)
    y, grads = _run(ilora_fused, t, dtype, gy, **kw)
    y_ref, grads_ref = _run(ref.ilora_reference, t, torch.float64, gy, **kw)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    _close("y", y, y_ref, tol)
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert a.dtype == dtype, name
        _close(f"d{name}", a, b, tol)


def test_mixed_dtypes_fp32_params_bf16_activations():
    N, d_in, d_out, r, K = 40, 45, 53, 8, 2
    x, y0, A, B, R = _inputs(N, d_in, d_out, r, K, seed=4)
    xb = x.to(torch.bfloat16).requires_grad_()
    params = [p.float().requires_grad_() for p in (A, B, R)]
    y = ilora_fused(xb, y0.to(torch.bfloat16), *params, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in params)
    want = ref.ilora_reference(xb.detach().double(), y0.to(torch.bfloat16).double(), A.float().double(),
                               B.float().double(), R.float().double(), 2.0)
    _close("y", y, want, 2e-2)


def test_leading_dims_inplace_and_leaf_y0():
    N, d_in, d_out, r, K = 70, 45, 53, 8, 3
    x, y0, A, B, R = (v.float() for v in _inputs(N, d_in, d_out, r, K, seed=5, lead=(2, 35)))
    want = ref.ilora_reference(x, y0, A, B, R, 1.5)
    # non-leaf y0 (the base layer's output): accumulated in place, y0's storage is returned
    y0_nl = y0.clone()
    y = ilora_fused(x, y0_nl, A, B, R, 1.5)
    assert y.shape == (2, 35, d_out) and y.data_ptr() == y0_nl.data_ptr()
    _close("y", y, want, 1e-5)
    # leaf y0 requiring grad: left untouched, gets dy
    y0_leaf = y0.clone().requires_grad_()
    y = ilora_fused(x, y0_leaf, A, B, R, 1.5)
    assert torch.equal(y0_leaf.detach(), y0) and y.data_ptr() != y0_leaf.data_ptr()
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.equal(y0_leaf.grad, gy)
    # an in-place update of a non-leaf y0 with leading dims keeps the kernel's own backward on y0
    # (no CopySlices over a reshaped view: that costs a zero fill and four [N, d_out] copies per step)
    xg = x.clone().requires_grad_()
    y0_nl = y0.clone().requires_grad_() * 1
    y = ilora_fused(xg, y0_nl, A, B, R, 1.5)
    assert y is y0_nl and type(y.grad_fn).__name__ == "_ILoRAFusedBackward"
    y.backward(gy)
    assert xg.grad.shape == x.shape and torch.isfinite(xg.grad).all()
    # a non-contiguous y0 is not written: y comes back in a contiguous copy
    y0_t = y0.transpose(0, 1).contiguous().transpose(0, 1)
    keep = y0_t.clone()
    y = ilora_fused(x, y0_t, A, B, R, 1.5)
    assert torch.equal(y0_t, keep) and y.is_contiguous()
    _close("y", y, want, 1e-5)
    # inplace=False never touches y0
    y0_copy = y0.clone()
    y = ilora_fused(x, y0_copy, A, B, R, 1.5, inplace=False)
    assert torch.equal(y0_copy, y0)
    _close("y", y, want, 1e-5)


def test_only_B_trainable_and_no_grad_inference():
    N, d_in, d_out, r, K = 50, 45, 53, 8, 3
    x, y0, A, B, R = (v.float() for v in _inputs(N, d_in, d_out, r, K, seed=6))
    Bp = B.clone().requires_grad_()
    ilora_fused(x, y0.clone(), A, Bp, R, 2.0, top_k=2).sum().backward()
    Br = B.clone().requires_grad_()
    ref.ilora_reference(x, y0, A, Br, R, 2.0, top_k=2).sum().backward()
    _close("dB", Bp.grad, Br.grad, 1e-4)
    with torch.no_grad():
        y = ilora_fused(x, y0.clone(), A, Bp, R, 2.0)
    assert not y.requires_grad
    _close("y", y, ref.ilora_reference(x, y0, A, B, R, 2.0), 1e-5)


def test_empty_batch_and_autocast():
    x, y0, A, B, R = (v.float().requires_grad_() for v in _inputs(0, 12, 14, 4, 2))
    y = ilora_fused(x, y0 * 1, A, B, R, 1.0)
    y.sum().backward()
    assert y.shape == (0, 14) and A.grad.abs().sum() == 0 and x.grad.shape == (0, 12)
    x, y0, A, B, R = (v.float() for v in _inputs(30, 45, 53, 8, 2, seed=10))
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ilora_fused(xg, y0.clone(), A, B, R, 2.0)
    y.sum().backward()
    assert y.dtype == torch.float32 and xg.grad.dtype == torch.float32
    want = ref.ilora_reference(x.to(torch.bfloat16).double(), y0.double(), A.double(), B.double(),
                               R.double(), 2.0)
    _close("y", y, want, 1e-2)


def test_zero_B_is_identity_and_topk_K_is_dense():
    N, d_in, d_out, r, K = 40, 45, 53, 8, 3
    x, y0, A, B, R = (v.float() for v in _inputs(N, d_in, d_out, r, K, seed=7))
    y = ilora_fused(x, y0.clone(), A, torch.zeros_like(B), R, 2.0, dropout_p=0.5, seed=3)
    assert torch.equal(y, y0)
    dense = ilora_fused(x, y0.clone(), A, B, R, 2.0)
    assert torch.equal(ilora_fused(x, y0.clone(), A, B, R, 2.0, top_k=K), dense)


def test_dropout_seed_determinism():
    N, d_in, d_out, r, K = 40, 45, 53, 8, 2
    x, y0, A, B, R = (v.float() for v in _inputs(N, d_in, d_out, r, K, seed=8))
    run = lambda seed: ilora_fused(x, y0.clone(), A, B, R, 2.0, dropout_p=0.3, seed=seed)  # noqa: E731
    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))
    assert not torch.allclose(run(11), ilora_fused(x, y0.clone(), A, B, R, 2.0))


@pytest.mark.parametrize("shape,p,seed",
                         [((70, 45), 0.3, 123), ((3, 5, 61), 0.05, 2**40 + 7), ((17, 8), 0.5, -5)])
def test_dropout_mask_reference_is_bit_identical(shape, p, seed):
    got = dropout_mask_triton(seed, shape, p, "cpu")
    want = ref.dropout_mask(seed, shape, p, "cpu")
    assert got.shape == want.shape == shape and want.dtype == torch.bool
    assert torch.equal(got, want)
    n = want.numel()
    assert abs(want.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9
    assert not torch.equal(want, ref.dropout_mask(seed + 1, shape, p, "cpu"))


def test_reference_loop_equals_stacked_and_K1_is_lora():
    N, d_in, d_out, r, K = 30, 20, 25, 6, 4
    x, y0, A, B, R = _inputs(N, d_in, d_out, r, K, seed=9)
    kw = dict(temperature=0.5, top_k=2, dropout_p=0.2, seed=5)
    stacked = ref.ilora_reference(x, y0, A, B, R, 1.5, **kw)
    for recompute in (False, True):
        loop = ref.ilora_reference_loop(x, y0, A, B, R, 1.5, recompute_shrink=recompute, **kw)
        torch.testing.assert_close(loop, stacked)
    y1 = ref.ilora_reference(x, y0, A, B[:1], R[:1], 1.5)
    torch.testing.assert_close(y1, y0 + 1.5 * x @ A.t() @ B[0].t())
    w = ref.route_weights(x, R, 0.5, top_k=2)
    assert torch.equal((w > 0).sum(-1), torch.full((N,), 2))
    assert torch.allclose(w.sum(-1), torch.ones(N, dtype=w.dtype))


def test_topk_ties_pick_lower_head():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    keep = ref.topk_keep(logits, 2)
    assert keep.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_argument_validation_and_usability():
    x, y0, A, B, R = (v.float() for v in _inputs(10, 12, 14, 4, 2))
    with pytest.raises(ValueError, match="inconsistent"):
        ilora_fused(x, y0, A, B[:, :, :3], R, 1.0)
    with pytest.raises(ValueError, match="d_in"):
        ilora_fused(x[:, :5], y0, A, B, R, 1.0)
    with pytest.raises(ValueError, match="heads"):
        ilora_fused(x, y0, A, torch.zeros(17, 14, 4), torch.zeros(17, 12), 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ilora_fused(x, y0, A, B, R, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="top_k"):
        ilora_fused(x, y0, A, B, R, 1.0, top_k=0)
    with pytest.raises(ValueError, match="dtype"):
        ilora_fused(x.double(), y0, A, B, R, 1.0)
    assert triton_usable(torch.device("cpu")) and triton_unusable_reason("cpu") is None
    assert not triton_usable("meta") and "meta" in triton_unusable_reason("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_bench_needs_cuda(capsys):
    from avmt_kernels import bench

    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    fb, fa = bench.flops(4096, 3584, 18944, 128, 3)
    assert fb == 4 * 4096 * 3584 * 18944 and fa == 6 * 4096 * (3584 * 131 + 3 * 128 * 18944)


@pytest.mark.parametrize("case", [c for c in __import__("avmt_kernels.gpu_check").gpu_check.CASES
                                  if c[1][0] * c[1][1] <= 200_000],  # N · d_in: the interpreter's cost
                         ids=lambda c: c[0])
def test_gpu_check_cases_pass_under_the_interpreter(case):
    """The GPU check's comparison (every gradient, dropout mask included) holds on the interpreter
    path, so a failure on a GPU points at the compiled kernels, not at the check."""
    from avmt_kernels.gpu_check import NAMES, check_case

    name, shape, act, par, _, tf32 = case
    (row,) = check_case(name, shape, act, par, [0], torch.device("cpu"), allow_tf32=tf32)
    assert set(row["rel_err"]) == set(NAMES) and row["ok"], row


def test_bench_profile_lists_each_methods_operators():
    """bench --profile's table, on the interpreter's CPU operators (on a GPU: the CUDA kernels)."""
    from avmt_kernels.bench import format_profile, profile_layer

    rows = profile_layer(64, 48, 40, 8, 3, torch.float32, 0.1, torch.device("cpu"), steps=2)
    assert {e["method"] for e in rows} == {"stacked", "fused"}
    fused = [e["kernel"] for e in rows if e["method"] == "fused"]
    assert "_ILoRAFused" in fused and "_ILoRAFusedBackward" in fused
    assert all(e["us_per_step"] > 0 for e in rows)
    text = format_profile("layer", rows, top=3)
    assert "fused:" in text and "stacked:" in text
