"""The kernels with the GPU's dot-operand rounding, on CPU (Triton interpreter, ``set_rounding("gpu")``).

Compiled, every tl.dot operand is cast to the activation dtype (bf16 / fp16; TF32 for fp32
activations and for fp16's router-gradient dots) before the fp32-accumulating dot. The interpreter
normally runs exact fp32 dots; in "gpu" mode it rounds each operand exactly as the compiled kernel
does and then runs the fp32 dot, so these tests see what a GPU computes.

Tolerances (‖out − ref‖ / ‖ref‖ against a float64 reference on the same, representable inputs):
with unit roundoff u (bf16 2⁻⁸, fp16 2⁻¹¹; TF32 read by truncation 2⁻¹⁰), every output passes
through at most four roundings to u: an input operand, the fp32 intermediate rounded before the
next dot (z·w, dz, dl), the other operand, and the output cast. For unstructured data the absolute
error of a length-L dot grows like sqrt(L)·u·|a|·|b| and so does the norm of the result, so the
sqrt(L) cancels in the relative error: four independent roundings give about sqrt(4)·u = 2u. The
tolerance is 4u, twice that. (The worst case, L·u with sign-coherent errors, is not what rounding to
nearest produces here; the gpu_check on an H200 measured 0.6u for bf16 and fp16.)
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from avmt_kernels import ilora  # noqa: E402
from avmt_kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ilora.interpreting(), reason="triton was imported without TRITON_INTERPRET=1 earlier in this process")

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
NAMES = ("y", "dx", "dy0", "dA", "dB", "dR")


@pytest.fixture
def gpu_rounding():
    saved = ilora.rounding()
    ilora.set_rounding("gpu")
    yield
    ilora.set_rounding(saved)


def _rel(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


def _inputs(N, d_in, d_out, r, K, dtypes, *, seed, b_scale=1.0, dy_scale=1.0):
    """float64 (x, y0, A, B, R, dy), each rounded to the dtype it will have (so the reference sees
    the kernel's exact inputs)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, dtype):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).double()

    x_dt, y_dt, p_dt = dtypes
    return (rnd(N, d_in, dtype=x_dt), rnd(N, d_out, dtype=y_dt), rnd(r, d_in, scale=d_in ** -0.5, dtype=p_dt),
            rnd(K, d_out, r, scale=b_scale * r ** -0.5, dtype=p_dt), rnd(K, d_in, scale=0.5, dtype=p_dt),
            rnd(N, d_out, scale=dy_scale, dtype=y_dt))


def _fwd_bwd(fn, tensors, dtypes, **kw):
    """(y, dx, dy0, dA, dB, dR) of ``fn``; leaves cast to ``dtypes`` (x, y0, params), y0 a non-leaf."""
    *leaves64, gy = tensors
    x_dt, y_dt, p_dt = dtypes
    leaves = [t.to(d).clone().requires_grad_() for t, d in zip(leaves64, (x_dt, y_dt, p_dt, p_dt, p_dt))]
    x, y0, A, B, R = leaves
    y = fn(x, y0 * 1, A, B, R, **kw)
    y.backward(gy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_all_gradients_with_gpu_rounding(dtype, gpu_rounding):
    dtypes = (dtype, dtype, dtype)
    t = _inputs(64, 128, 96, 16, 3, dtypes, seed=1)
    kw = dict(scaling=2.0, temperature=0.7, top_k=2, dropout_p=0.1, seed=9)
    got = _fwd_bwd(ilora.ilora_fused, t, dtypes, **kw)
    want = _fwd_bwd(ref.ilora_reference, t, (torch.float64,) * 3, **kw)
    errs = {n: _rel(a, b) for n, a, b in zip(NAMES, got, want)}
    assert all(a.dtype == dtype for a in got), [a.dtype for a in got]
    assert all(e <= 4 * U[dtype] for e in errs.values()), errs


def _emulated_y(x, y0, A, B, R, scaling, temperature):
    """Forward in float64 with the compiled kernel's roundings made explicit (bf16 x, fp32 params
    and y0): A, R, B and the fp32 product z·w_k are rounded to bf16 before their dots."""
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    z = (x @ bf(A).t()).float().double()
    w = torch.softmax((x @ bf(R).t()).float().double() / temperature, dim=-1).float().double()
    out = y0.clone()
    for k in range(B.shape[0]):
        out += scaling * (bf((z * w[:, k : k + 1]).float()) @ bf(B[k]).t())
    return out


def test_gpu_rounding_reproduces_the_compiled_operand_rounding():
    """Sharp check of the mode itself: bf16 x with fp32 parameters and an fp32 y0 (so the output
    is not rounded), against a float64 forward that applies the compiled kernel's roundings
    explicitly. "gpu" agrees to fp32 accumulation error; "fp32" (no operand rounding) does not."""
    dtypes = (torch.bfloat16, torch.float32, torch.float32)
    x, y0, A, B, R, _ = _inputs(64, 96, 80, 16, 3, dtypes, seed=2)
    want = _emulated_y(x, y0, A, B, R, 1.5, 0.8)
    errs = {}
    saved = ilora.rounding()
    try:
        for mode in ("gpu", "fp32"):
            ilora.set_rounding(mode)
            y = ilora.ilora_fused(x.bfloat16(), y0.float(), A.float(), B.float(), R.float(), 1.5,
                                  temperature=0.8)
            errs[mode] = _rel(y - y0, want - y0)
    finally:
        ilora.set_rounding(saved)
    assert errs["gpu"] < 1e-5 < errs["fp32"] / 10, errs


def test_fp16_router_gradient_does_not_underflow(gpu_rounding, monkeypatch):
    """fp16, LoRA B near its zero initialisation (B ~ 1e-2/sqrt(r)) and dy ~ 1e-4 (a scaled loss):
    dl = w ⊙ (dw − <w, dw>)/τ is ~1e-6, below fp16's normal range (6.1e-5), where a cast to fp16
    keeps only a few bits. The router dots (dl·R, dlᵀ·x) therefore take dl in fp32 rounded to TF32
    (8 exponent bits, 10 mantissa bits); x and R are exact in TF32. dR (fp32 master weights) is then
    within 4u of the reference; with dl cast to fp16 it is not."""
    dtypes = (torch.float16, torch.float16, torch.float32)
    t = _inputs(64, 128, 128, 16, 3, dtypes, seed=0, b_scale=1e-2, dy_scale=1e-4)
    kw = dict(scaling=2.0, temperature=1.0)
    want = _fwd_bwd(ref.ilora_reference, t, (torch.float64,) * 3, **kw)[5]
    err = {}
    for router_dot in ("tf32", "fp16"):
        monkeypatch.setattr(ilora, "_FP16_ROUTER_DOT", router_dot)
        err[router_dot] = _rel(_fwd_bwd(ilora.ilora_fused, t, dtypes, **kw)[5], want)
    tol = 4 * U[torch.float16]
    assert err["tf32"] <= tol < err["fp16"], err
