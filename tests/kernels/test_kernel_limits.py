"""Launch properties of the fused I-LoRA kernels that hold without a GPU: seed specialisation,
grid limits, the fp32 strategy, config pruning, and the split-K shrink path (Triton interpreter)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from avmt_kernels import ilora  # noqa: E402
from avmt_kernels import reference as ref  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ilora.interpreting(), reason="triton was imported without TRITON_INTERPRET=1 earlier in this process")

H100_SMEM, A100_SMEM = 232_448, 166_912
SEEDS = (0, 1, 16, 48, 2**31 + 3, 2**40 + 9, 2**63 - 1)
GRADS = ("y", "dx", "dy0", "dA", "dB", "dR")


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _fwd_bwd(fn, tensors, dtype, gy_fn, **kw):
    """(y, dx, dy0, dA, dB, dR) of ``fn`` on float64 ``tensors`` (x, y0, A, B, R) cast to ``dtype``,
    with y0 a non-leaf and dy = gy_fn(y). Asserts that y was accumulated into y0 in place."""
    leaves = [v.to(dtype).requires_grad_() for v in tensors]
    y0 = leaves[1] * 1
    y = fn(leaves[0], y0, *leaves[2:], **kw)
    y.backward(gy_fn(y.detach()))
    return [y.detach()] + [v.grad for v in leaves], y is y0, type(y.grad_fn).__name__


def _random(shapes, seed):
    """float64 tensors: (shape, scale) pairs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) * scale for shape, scale in shapes]


# --------------------------------------------------------------------------- seed specialisation
def _specialization(fn, seed_value, int_value=7):
    """Triton's specialisation key of a launch of ``fn`` (as the compiled launcher computes it),
    with every integer argument ``int_value``, tensors absent, and the seed ``seed_value``."""
    jit = JITFunction(fn.fn, **fn.kwargs)  # the compiled-mode twin of the interpreted kernel
    binder = create_function_from_signature(jit.signature, jit.params, None)
    args = {p.name: None if p.is_constexpr else seed_value if p.name == "seed" else int_value
            for p in jit.params}
    _, spec, _ = binder(**args)
    return dict(zip(args, spec))


@pytest.mark.parametrize("name", ["shrink", "dx", "dar", "mask"])
def test_seed_does_not_change_the_compiled_variant(name):
    """Triton specialises an int argument equal to 1 (a constant), divisible by 16, or >= 2**31
    (int64), and compiles a new variant for each: 2.4-3.3 s per new seed class on an H200. Seeds
    are annotated tl.int64 and in do_not_specialize, so every seed gives the same key."""
    fn = ilora.kernel_fn(name)
    assert "seed" in inspect.signature(fn.fn).parameters
    keys = {str(_specialization(fn, s)["seed"]) for s in SEEDS}
    assert keys == {"('i64', None)"}, keys
    # the same launcher does specialise an ordinary int argument (the test can see a recompile)
    assert len({str(_specialization(fn, 7, v)["N"]) for v in (1, 16, 17, 2**31 + 3)}) == 4


# --------------------------------------------------------------------------- grids
def _all_grids(N, d_in, d_out, K, sms=132):
    """Every kernel's grid for every config (and the interpreter blocks), with the split counts the
    wrapper would choose on a GPU with ``sms`` SMs."""
    s_split, _ = ilora.shrink_split(N, d_in, sms)
    dar_split, _ = ilora._split_rows(N, ilora._cdiv(d_in, 64), sms, ilora._ROW_GRANULE)
    db_split, _ = ilora._split_rows(N, K * ilora._cdiv(d_out, 64), sms, ilora._ROW_GRANULE)
    base = dict(N=N, D_IN=d_in, D_OUT=d_out, K=K)
    splits = {"shrink": s_split, "dar": dar_split, "db": db_split}
    for name in ilora.KERNEL_NAMES + ("mask",):
        blocks = [c.kwargs for c in ilora.KERNEL_CONFIGS.get(name, [])] + [ilora._INTERP_BLOCKS[name]]
        for b in blocks:
            yield name, b, ilora.launch_grid(name, dict(base, SPLIT=splits.get(name, 1)), b)


@pytest.mark.parametrize("N,d_in,d_out,K", [
    (10**8, ilora.MAX_DIM, ilora.MAX_DIM, 16), (10**8, 3584, 18944, 3), (2_228_224, 64, 64, 3), (1, 1, 1, 1)])
def test_every_grid_axis_is_within_cuda_limits(N, d_in, d_out, K):
    """CUDA caps grid axis 0 at 2**31 - 1 and axes 1 and 2 at 65 535. The token dimension sits on
    axis 0 (2,228,224 tokens used to put 69,632 row blocks on bwd_g's axis 1: 'invalid argument'
    on the H200); axis 1 holds d tiles (d <= MAX_DIM), K, or an N-split count."""
    for name, blocks, grid in _all_grids(N, d_in, d_out, K):
        assert len(grid) <= 3, (name, blocks, grid)
        assert all(1 <= g <= lim for g, lim in zip(grid, ilora.GRID_LIMITS)), (name, blocks, grid)
    old_g_axis1 = ilora._cdiv(2_228_224, 32)  # the former bwd_g grid (K, cdiv(N, BLOCK_M)) at BLOCK_M 32
    assert old_g_axis1 > ilora.GRID_LIMITS[1]


def test_dimensions_beyond_the_grid_are_refused():
    x, y0 = torch.zeros(2, ilora.MAX_DIM + 1), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="d_in, d_out <="):
        ilora.ilora_fused(x, y0, torch.zeros(2, ilora.MAX_DIM + 1), torch.zeros(1, 4, 2),
                          torch.zeros(1, ilora.MAX_DIM + 1), 1.0)


def test_split_k_shrink_and_split_n_backward_match_the_reference():
    """Few row blocks (2 against the interpreter's 4 pretend SMs) and a long d_in: shrink runs
    split over d_in with the route_reduce kernel, dA/dR and dB split over N."""
    N, d_in, d_out, r, K = 70, 300, 53, 8, 3
    plan = ilora._plan(N, d_in, d_out, r, K, torch.float32, torch.device("cpu"), 2, True, "fp32", False,
                       "tf32")
    assert plan.s_split == 3 and plan.kps == 128 and plan.dar_split == 2 and plan.db_split == 2
    t = _random([((N, d_in), 1.0), ((N, d_out), 1.0), ((r, d_in), d_in ** -0.5), ((K, d_out, r), r ** -0.5),
                 ((K, d_in), 0.5)], seed=3)
    kw = dict(scaling=1.3, temperature=0.9, top_k=2, dropout_p=0.2, seed=2**40 + 1)
    got, _, _ = _fwd_bwd(ilora.ilora_fused, t, torch.float32, torch.ones_like, **kw)
    want, _, _ = _fwd_bwd(ref.ilora_reference, t, torch.float64, torch.ones_like, **kw)
    for name, a, b in zip(GRADS, got, want):
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


# --------------------------------------------------------------------------- fp32
def test_fp32_strategy():
    assert ilora.fp32_strategy("cuda", False, allow_tf32=True) == "tf32"
    assert ilora.fp32_strategy("cuda", False, allow_tf32=False) == "torch"
    # the interpreter default still runs the kernel (it checks the kernel logic)
    assert ilora.fp32_strategy("cpu", True, allow_tf32=False, mode="fp32") == "ieee"
    assert ilora.fp32_strategy("cpu", True, allow_tf32=True, mode="gpu") == "tf32"
    assert ilora.fp32_strategy("cpu", True, allow_tf32=False, mode="gpu") == "torch"


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_as_on_a_gpu(allow_tf32):
    """With the GPU's rules (rounding "gpu"): TF32 not allowed -> the stacked PyTorch path, which
    keeps the kernel's dropout mask, in-place contract and gradients (fp32 exact); allowed -> the
    kernel with TF32 dots. Tensor cores read an fp32 operand truncated to 10 mantissa bits: a
    relative error in [0, 2⁻¹⁰), biased (mean 2⁻¹¹, one sign), so the ≤ 4 roundings on an output's
    path (see test_rounding) add up linearly, not in quadrature: 4 · 2⁻¹⁰, doubled for the softmax
    Jacobian's cancellation in dl = w ⊙ (dw − <w, dw>): 8 · 2⁻¹⁰."""
    saved = ilora.rounding(), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    ilora.set_rounding("gpu")
    N, d_in, d_out, r, K = 40, 45, 53, 8, 3
    t = _random([((2, N // 2, d_in), 1.0), ((2, N // 2, d_out), 1.0), ((r, d_in), d_in ** -0.5),
                 ((K, d_out, r), r ** -0.5), ((K, d_in), 0.5)], seed=4)
    kw = dict(scaling=1.7, temperature=0.8, top_k=2, dropout_p=0.3, seed=77)
    try:
        got, in_place, grad_fn = _fwd_bwd(ilora.ilora_fused, t, torch.float32, torch.cos, **kw)
    finally:
        ilora.set_rounding(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
    want, _, _ = _fwd_bwd(ref.ilora_reference, t, torch.float64, torch.cos, **kw)
    assert in_place  # accumulated into the non-leaf y0, as the kernel does
    assert (grad_fn == "_ILoRAFusedBackward") == allow_tf32
    tol = 8 * 2.0**-10 if allow_tf32 else 1e-6
    for name, a, b in zip(GRADS, got, want):
        assert a.dtype == torch.float32 and _rel(a, b) <= tol, (name, a.dtype, _rel(a, b))


# --------------------------------------------------------------------------- config pruning
def _cfg(warps=4, stages=3, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def test_smem_estimate_hand_computed():
    def est(name, stages, act, par, dl=None, **blocks):  # r = 128 (R_PAD 128), K = 3 (K_PAD 16)
        return ilora.smem_estimate(name, blocks, stages, act_bytes=act, param_bytes=par, r_pad=128, k_pad=16,
                                   dl_bytes=dl)

    # shrink, bf16, BM 64, BK 256, 3 stages: 3·256·(64·2 + (128 + 16)·2)
    assert est("shrink", 3, 2, 2, BLOCK_M=64, BLOCK_K=256) == 319_488
    # expand, bf16, BLOCK_R = min(128, 64); BM 128, BN 128, 4 stages: 4·64·(4·128 + 128·2)
    assert est("expand", 4, 2, 2, BLOCK_M=128, BLOCK_N=128) == 196_608
    # g, bf16 dy with fp32 B: 3·64·(64·2 + 128·4)
    assert est("g", 3, 2, 4, BLOCK_M=64, BLOCK_O=64) == 122_880
    # dx, fp16 (router dot in fp32: dl 4 bytes), BR 64: 3·64·(64·2 + 128·2) + 16·128·4
    assert est("dx", 3, 2, 2, dl=4, BLOCK_M=64, BLOCK_K=128) == 81_920
    # dar, bf16: 3·64·(64·2 + 128·2 + 4·16); fp16 adds the fp32 copy of x for the router dot: 64·64·4
    assert est("dar", 3, 2, 2, BLOCK_M=64, BLOCK_K=64) == 86_016
    assert est("dar", 3, 2, 2, dl=4, BLOCK_M=64, BLOCK_K=64) == 86_016 + 16_384
    # db, fp32 activations: 4·32·(256·4 + 4·128 + 4)
    assert est("db", 4, 4, 4, BLOCK_M=32, BLOCK_O=256) == 197_120


def test_prune_configs_drops_what_cannot_fit_and_what_is_wasteful():
    big = dict(N=4096, D_IN=18944, D_OUT=3584, R=128, K=3)
    shrink = [_cfg(BLOCK_M=64, BLOCK_K=256), _cfg(BLOCK_M=64, BLOCK_K=64),
              _cfg(BLOCK_M=128, BLOCK_K=64, stages=4)]
    kept = ilora.prune_configs("shrink", shrink, max_shared_mem=H100_SMEM, dtype=torch.bfloat16, dims=big)
    assert kept == shrink[1:]  # 319,488 bytes do not fit; 3·64·(128+288) = 79,872, 4·64·(256+288) do
    # r = 8: the 256-wide tile fits (3·256·(64·2 + 32·2) = 147,456)
    assert len(ilora.prune_configs("shrink", shrink, max_shared_mem=H100_SMEM, dtype=torch.bfloat16,
                                   dims=dict(big, R=8))) == 3
    expand = [_cfg(BLOCK_M=128, BLOCK_N=128, stages=4), _cfg(BLOCK_M=64, BLOCK_N=64)]
    assert ilora.prune_configs("expand", expand, max_shared_mem=H100_SMEM, dtype=torch.bfloat16,
                               dims=big) == expand
    assert ilora.prune_configs("expand", expand, max_shared_mem=A100_SMEM, dtype=torch.bfloat16,
                               dims=big) == expand[1:]  # 196,608 > 166,912
    # wasteful: BLOCK_K 256 for d_in 100 (padded 128), BLOCK_M 64 for 8 tokens (padded 16)
    small = dict(N=8, D_IN=100, D_OUT=3584, R=8, K=3)
    tiles = [_cfg(BLOCK_M=16, BLOCK_K=256), _cfg(BLOCK_M=16, BLOCK_K=128), _cfg(BLOCK_M=64, BLOCK_K=64)]
    assert ilora.prune_configs("shrink", tiles, max_shared_mem=H100_SMEM, dtype=torch.bfloat16,
                               dims=small) == tiles[1:2]
    # never empty: nothing fits -> the smallest estimate; everything wasteful -> the smallest tile
    assert ilora.prune_configs("shrink", shrink[:1], max_shared_mem=1000, dtype=torch.bfloat16,
                               dims=big) == shrink[:1]
    assert ilora.prune_configs("shrink", tiles[1:], max_shared_mem=H100_SMEM, dtype=torch.bfloat16,
                               dims=dict(small, D_IN=16)) == tiles[1:2]
    # every table keeps at least one config for the Qwen2.5-7B down layer on sm_90 and sm_80
    for name, configs in ilora.KERNEL_CONFIGS.items():
        for smem in (H100_SMEM, A100_SMEM):
            for dt in (torch.bfloat16, torch.float32):
                kept = ilora.prune_configs(name, configs, max_shared_mem=smem, dtype=dt, dims=big)
                assert kept, (name, smem, dt)


def test_autotuner_prune_hook_is_prune_configs(monkeypatch):
    """The autotuner's early_config_prune reads dims and dtypes off the launch's arguments (N: the
    bucketed token count, the autotune key) and calls prune_configs."""
    monkeypatch.setattr(ilora, "_max_shared_mem", lambda index: A100_SMEM)
    N, d_out, r, K = 4096, 3584, 128, 3
    args = {"Y": torch.empty(0, dtype=torch.bfloat16), "B": torch.empty(0, dtype=torch.float32),
            "N_BUCKET": N, "D_OUT": d_out, "RANK": r, "K": K}
    configs = ilora.KERNEL_CONFIGS["expand"]
    got = ilora._prune_hook("expand")(configs, args, R_PAD=128)
    want = ilora.prune_configs("expand", configs, max_shared_mem=A100_SMEM, dtype=torch.bfloat16,
                               param_dtype=torch.float32, dims=dict(N=N, D_IN=1, D_OUT=d_out, R=r, K=K))
    assert got == want and 0 < len(got) < len(configs)


def test_expand_loop_variants_agree(monkeypatch):
    """expand_kernel's two reduction loops (FLAT 1: one K·r loop; FLAT 0: heads × rank chunks) visit
    the same tiles in the same order: identical results. r = 100 pads to 128: two rank chunks."""
    g = torch.Generator().manual_seed(5)
    N, d_in, d_out, r, K = 40, 30, 70, 100, 3
    x, y0 = torch.randn(N, d_in, generator=g), torch.randn(N, d_out, generator=g)
    A = torch.randn(r, d_in, generator=g) * 0.2
    B = torch.randn(K, d_out, r, generator=g) * 0.1
    R = torch.randn(K, d_in, generator=g)
    ys = {}
    for flat in (0, 1):
        monkeypatch.setitem(ilora._INTERP_BLOCKS, "expand", dict(ilora._INTERP_BLOCKS["expand"], FLAT=flat))
        ys[flat] = ilora.ilora_fused(x, y0.clone(), A, B, R, 1.5, top_k=2)
    assert torch.equal(ys[0], ys[1])
    want = ref.ilora_reference(x.double(), y0.double(), A.double(), B.double(), R.double(), 1.5, top_k=2)
    assert _rel(ys[1], want) <= 1e-6
