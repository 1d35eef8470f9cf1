"""Correctness of the compiled kernels on a CUDA GPU, config by config, against a float64 reference.

    python -m avmt_kernels.gpu_check [--json PATH] [--quick]

The interpreter tests (``pytest tests/kernels``) run every ``tl.dot`` in fp32 with one fixed block
configuration, so they never see what only a GPU does: bf16/fp16 dot operands, tensor-core
layouts, software pipelining and the other block shapes of the autotune lists. This check runs
forward + backward of ``ilora_fused`` on the GPU with every kernel pinned to one autotune config
at a time ("round" j pins each kernel to config j of its list as ``prune_configs`` leaves it for the
case on this GPU, wrapping around shorter lists), so every config the autotuner can pick is
executed, and compares y and the five gradients with the float64
reference (``avmt_kernels.reference.ilora_reference``, dropout mask included) by
‖out − ref‖ / ‖ref‖. It then probes two launch properties: recompiles caused by the dropout seed
(wall time of the first call per seed after warm-up), and a token count above the 65 535 limit of
the second grid axis. fp32 cases run with TF32 allowed (the kernel) or not (the PyTorch fall-back,
see ``avmt_kernels.ilora.fp32_strategy``). Exits 1 when a check fails, 2 without a usable CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import reference as ref
from .ilora import (KERNEL_CONFIGS, KERNEL_NAMES, _kernels, _max_shared_mem, _plan, ilora_fused,
                    prune_configs, triton_unusable_reason)

NAMES = ("y", "dx", "dy0", "dA", "dB", "dR")
KERNELS = KERNEL_NAMES
# ‖out − ref‖ / ‖ref‖ allowed per activation dtype: fp16/bf16 round each dot operand (11 / 8 bits
# of mantissa); fp32 runs TF32 dots (operands read with 10 mantissa bits, truncated: a biased
# error, see tests/kernels/test_kernel_limits.py). fp32 without TF32 runs PyTorch's fp32 GEMMs.
TOLERANCE = {torch.float32: 8 * 2.0**-10, torch.float16: 5e-3, torch.bfloat16: 3e-2}
FP32_NO_TF32_TOLERANCE = 1e-5

# name, (N, d_in, d_out, r, K, top_k, dropout p), activation dtype, parameter dtype, every config?,
# allow TF32 (fp32 only: True runs the kernel, False the PyTorch fall-back)
CASES = [
    ("bf16 r64 top2 drop", (1000, 512, 1536, 64, 3, 2, 0.1), torch.bfloat16, torch.bfloat16, True, True),
    ("fp16 r128 dense drop", (777, 384, 1000, 128, 3, None, 0.05), torch.float16, torch.float16, True, True),
    ("fp32 tf32 odd shapes", (70, 45, 53, 8, 3, 2, 0.2), torch.float32, torch.float32, True, True),
    ("bf16 split-K r64", (256, 2048, 384, 64, 3, 2, 0.1), torch.bfloat16, torch.bfloat16, True, True),
    ("fp32 no-tf32 (torch)", (70, 45, 53, 8, 3, 2, 0.2), torch.float32, torch.float32, False, False),
    ("bf16 x, fp32 params", (300, 256, 320, 16, 2, None, 0.0), torch.bfloat16, torch.float32, False, True),
    ("bf16 K8 top3", (333, 100, 370, 16, 8, 3, 0.0), torch.bfloat16, torch.bfloat16, False, True),
    ("bf16 r256 K2", (200, 400, 300, 256, 2, None, 0.0), torch.bfloat16, torch.bfloat16, False, True),
]


def case_configs(shape, act, par, device) -> dict:
    """Per kernel, the configs the autotuner would consider for this case on ``device``
    (``prune_configs`` with the device's shared memory and the case's bucketed N)."""
    N, d_in, d_out, r, K = shape[:5]
    dims = dict(N=1 << max(0, N - 1).bit_length(), D_IN=d_in, D_OUT=d_out, R=r, K=K)
    smem = _max_shared_mem(device.index or 0)
    return {name: prune_configs(name, KERNEL_CONFIGS[name], max_shared_mem=smem, dtype=act, param_dtype=par,
                                dims=dims) for name in KERNELS}


def pin_round(j: int | None, configs: dict | None = None) -> None:
    """Pin every autotuned kernel to config ``j`` (mod its list length) of ``configs`` (default: the
    full lists); None restores the full lists."""
    state = _kernels()
    if not state.autotuned:  # the interpreter runs its one fixed configuration
        return
    _plan.cache_clear()  # the per-shape plans remember the configs chosen so far
    for name in KERNELS:
        tuner = getattr(state, name)
        full = KERNEL_CONFIGS[name]
        pick = (configs or {}).get(name, full)
        tuner.configs = list(full) if j is None else [pick[j % len(pick)]]
        tuner.cache = {}


def _inputs(shape, act_dtype, par_dtype, device, seed):
    """float64 (x, y0, A, B, R, dy) rounded to the run dtypes, so the reference sees the same values."""
    N, d_in, d_out, r, K = shape[:5]
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0, dtype):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).double().to(device)

    return (rnd(N, d_in, dtype=act_dtype), rnd(N, d_out, dtype=act_dtype),
            rnd(r, d_in, scale=d_in ** -0.5, dtype=par_dtype), rnd(K, d_out, r, scale=r ** -0.5, dtype=par_dtype),
            rnd(K, d_in, scale=0.5, dtype=par_dtype), rnd(N, d_out, dtype=act_dtype))


def _forward_backward(fn, tensors, dtypes, kw):
    """(y, dx, dy0, dA, dB, dR) of ``fn`` with the leaves cast to ``dtypes``; y0 enters as a non-leaf."""
    *leaves_64, gy = tensors
    leaves = [t.to(d).clone().requires_grad_() for t, d in zip(leaves_64, dtypes)]
    x, y0, A, B, R = leaves
    y = fn(x, y0 * 1, A, B, R, **kw)
    y.backward(gy.to(y.dtype))
    return [y.detach()] + [leaves[i].grad for i in (0, 1, 2, 3, 4)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; inf when got holds a non-finite value."""
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_case(name, shape, act, par, rounds, device, allow_tf32=True) -> list[dict]:
    """One row per config round: the relative error of y and every gradient."""
    N, d_in, d_out, r, K, top_k, p = shape
    tensors = _inputs(shape, act, par, device, seed=N + K)
    kw = dict(scaling=1.7, temperature=0.8, top_k=top_k, dropout_p=p, seed=1234 + K)
    want = _forward_backward(ref.ilora_reference, tensors, [torch.float64] * 5, kw)
    configs = case_configs(shape, act, par, device) if _kernels().autotuned else None
    tol = TOLERANCE[act] if act != torch.float32 or allow_tf32 else FP32_NO_TF32_TOLERANCE
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    rows = []
    try:
        for j in rounds:
            pin_round(j, configs)
            row = {"case": name, "round": j, "shape": list(shape[:5]), "top_k": top_k, "dropout_p": p,
                   "dtype": str(act).split(".")[-1], "param_dtype": str(par).split(".")[-1],
                   "allow_tf32": allow_tf32}
            if configs is not None:
                row["configs"] = {k: str(c[j % len(c)]) for k, c in configs.items()}
            t0 = time.perf_counter()
            try:
                got = _forward_backward(ilora_fused, tensors, [act, act, par, par, par], kw)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # a config that cannot compile or load is a failed row, not a crash
                row.update(first_call_s=time.perf_counter() - t0, rel_err={n: float("nan") for n in NAMES},
                           ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                rows.append(row)
                continue
            errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, want)}
            row.update(first_call_s=time.perf_counter() - t0, rel_err=errs,
                       ok=all(e <= tol for e in errs.values()))
            rows.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return rows


def seed_recompile_probe(device) -> list[dict]:
    """Wall time of the first forward+backward per dropout seed after a warm-up: a recompile shows
    as a call hundreds of times slower than the warm ones."""
    pin_round(0)
    N, d_in, d_out, r, K = 512, 256, 256, 16, 3
    x = torch.randn(N, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(r, d_in, device=device) * d_in ** -0.5).bfloat16().requires_grad_()
    B = (torch.randn(K, d_out, r, device=device) * r ** -0.5).bfloat16().requires_grad_()
    R = torch.randn(K, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    y0 = torch.randn(N, d_out, device=device, dtype=torch.bfloat16)

    def call(seed):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ilora_fused(x, y0.clone(), A, B, R, 2.0, dropout_p=0.1, seed=seed).sum().backward()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    call(3), call(5)  # warm-up: the first compile
    warm = min(call(7) for _ in range(3))
    return [{"seed": s, "ms": 1e3 * call(s), "warm_ms": 1e3 * warm} for s in (1, 16, 48, 2 ** 31 + 3, 2 ** 40 + 9)]


def grid_limit_probe(device, n: int = 2 ** 21 + 2 ** 17) -> dict:
    """Forward+backward at ``n`` tokens with small layer dims; reports the error if the launch fails."""
    pin_round(0)
    d, r, K = 64, 8, 3
    try:
        x = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        A = (torch.randn(r, d, device=device) * d ** -0.5).bfloat16().requires_grad_()
        B = (torch.randn(K, d, r, device=device) * r ** -0.5).bfloat16().requires_grad_()
        R = torch.randn(K, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = ilora_fused(x, torch.zeros(n, d, device=device, dtype=torch.bfloat16), A, B, R, 2.0)
        y.float().sum().backward()
        torch.cuda.synchronize(device)
        want_dB = ref.ilora_reference(x.detach()[-4096:].float(), torch.zeros(4096, d, device=device), A.float(),
                                      B.float(), R.float(), 2.0)
        err = rel_err(y[-4096:], want_dB)
        return {"tokens": n, "ok": err < 3e-2 and bool(torch.isfinite(B.grad).all()), "tail_rel_err": err}
    except Exception as exc:  # the probe reports any launch failure instead of stopping the check
        return {"tokens": n, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m avmt_kernels.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write every row as JSON to PATH")
    ap.add_argument("--quick", action="store_true", help="config round 0 only, no probes")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    reason = "CUDA is not available to torch" if not torch.cuda.is_available() else triton_unusable_reason(device)
    if reason is not None:
        print(f"avmt_kernels.gpu_check needs a CUDA GPU: {reason}", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "rows": []}
    print(f"I-LoRA kernels on {report['device']} (torch {report['torch']}, triton {report['triton']}): "
          f"‖out − ref‖/‖ref‖ vs float64, tolerance fp32 (TF32) {TOLERANCE[torch.float32]:g}, "
          f"fp16 {TOLERANCE[torch.float16]:g}, bf16 {TOLERANCE[torch.bfloat16]:g}", flush=True)
    print(f"{'case':<22} {'round':>5} {'first s':>7} " + " ".join(f"{n:>9}" for n in NAMES) + "  ok", flush=True)
    for name, shape, act, par, every, tf32 in CASES:
        n_rounds = max(len(c) for c in case_configs(shape, act, par, device).values())
        rounds = range(n_rounds) if every and not args.quick else [0]
        for row in check_case(name, shape, act, par, rounds, device, allow_tf32=tf32):
            report["rows"].append(row)
            print(f"{name:<22} {row['round']:>5} {row['first_call_s']:>7.2f} "
                  + " ".join(f"{row['rel_err'][n]:>9.2e}" for n in NAMES) + f"  {'yes' if row['ok'] else 'NO'}"
                  + (f"  {row['error']}" if "error" in row else ""), flush=True)
    ok = all(r["ok"] for r in report["rows"])
    if not args.quick:
        report["seed_probe"] = seed_recompile_probe(device)
        print("dropout seed -> first call ms (warm call ms): " + ", ".join(
            f"{p['seed']}: {p['ms']:.1f} ({p['warm_ms']:.1f})" for p in report["seed_probe"]), flush=True)
        report["grid_probe"] = grid_limit_probe(device)
        print(f"{report['grid_probe']['tokens']} tokens: {report['grid_probe']}", flush=True)
    pin_round(None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"{sum(r['ok'] for r in report['rows'])}/{len(report['rows'])} config rounds within tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
