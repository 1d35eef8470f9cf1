"""Benchmark of the fused I-LoRA kernel against its baselines (needs a CUDA GPU).

    python -m avmt_kernels.bench [--json PATH] [--tokens 4096] [--models qwen2.5-7b,crab-7b]
                                 [--dropout 0.05] [--dtype bf16] [--rep 200]

For every adapted linear layer of the model shapes below it times forward + backward
(x requires grad, the base weight is frozen, A / B / R are trainable) of

- ``base``:    the frozen base linear alone, y0 = x Wᵀ;
- ``loop``:    base + the per-head loop as Crab's released layer does it (A·drop(x) recomputed per head);
- ``stacked``: base + the PyTorch stacked form (one GEMM over K·r, addmm into y0);
- ``fused``:   base + ``avmt_kernels.ilora.ilora_fused``;

and prints achieved TFLOP/s (useful FLOPs: base + stacked adapter, see ``flops``), the speedup of
the fused kernel over each baseline, and the FLOP floor = base time × (base + adapter FLOPs) /
base FLOPs (the time if the adapter ran at the base GEMM's efficiency). Timings are medians of
``triton.testing.do_bench``. Exits with status 2 and a message when no CUDA GPU is available.

    python -m avmt_kernels.bench --model [--gpu h100|h200|a100] [--measured PATH]

prints the roofline model (``avmt_kernels.roofline``) of every kernel at these shapes instead, and
needs no GPU: FLOPs, HBM bytes and max(FLOPs / peak, bytes / bandwidth) per kernel and per layer,
next to bench's FLOP floor. With ``--measured`` (a ``--profile --json`` report of this script; its
tokens and dtype are used) or on a CUDA GPU (then measured here), each part also gets its measured
time and measured / roofline.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from .roofline import GPUS, Layer, layer_model, measured_parts

MODELS = {
    # name: (r, K, [(layer, d_in, d_out, count per transformer block)])
    "qwen2.5-7b": (128, 3, [("q_proj/o_proj", 3584, 3584, 2), ("gate_proj/up_proj", 3584, 18944, 2),
                            ("down_proj", 18944, 3584, 1)]),
    "crab-7b": (8, 3, [("q_proj/o_proj", 4096, 4096, 2), ("gate_proj/up_proj", 4096, 11008, 2),
                       ("down_proj", 11008, 4096, 1)]),
}
METHODS = ("base", "loop", "stacked", "fused")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def flops(n: int, d_in: int, d_out: int, r: int, k: int) -> tuple[float, float]:
    """(base, adapter) FLOPs of one forward+backward at N tokens with a frozen base weight.

    base = 4·N·d_in·d_out (forward + dx). adapter (stacked form) = forward 2N(d_in(r+K) + K·r·d_out)
    + backward 4N(K·r·d_out + d_in(r+K)) = 6N(d_in(r+K) + K·r·d_out).
    """
    base = 4.0 * n * d_in * d_out
    adapter = 6.0 * n * (d_in * (r + k) + k * r * d_out)
    return base, adapter


def _make_step(method: str, x, w_base, A, B, R, dy, scaling: float, p: float):
    """Closure running one forward + backward of ``method``."""
    from .ilora import ilora_fused

    K, d_out, r = B.shape
    state = {"seed": 0}

    def base():
        F.linear(x, w_base).backward(dy)

    def loop():
        y = F.linear(x, w_base)
        w = torch.softmax(F.linear(x, R), dim=-1)
        for k in range(K):
            y = y + scaling * w[:, k : k + 1] * F.linear(F.linear(F.dropout(x, p), A), B[k])
        y.backward(dy)

    def stacked():
        y0 = F.linear(x, w_base)
        z = F.linear(F.dropout(x, p), A)  # [N, r]
        w = torch.softmax(F.linear(x, R), dim=-1)  # [N, K]
        zw = (w.unsqueeze(-1) * z.unsqueeze(-2)).reshape(-1, K * r)
        b_cat = B.permute(1, 0, 2).reshape(d_out, K * r)
        torch.addmm(y0, zw, b_cat.t(), alpha=scaling).backward(dy)

    def fused():
        state["seed"] += 1
        y = ilora_fused(x, F.linear(x, w_base), A, B, R, scaling, dropout_p=p, seed=state["seed"])
        y.backward(dy)

    return {"base": base, "loop": loop, "stacked": stacked, "fused": fused}[method]


def layer_tensors(n: int, d_in: int, d_out: int, r: int, K: int, dtype, device: torch.device):
    """Random (x [n, d_in] (grad), w_base [d_out, d_in], A [r, d_in], B [K, d_out, r], R [K, d_in]
    (A, B, R with grad), dy [n, d_out]) of one adapted layer, seeded."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        t = (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    return (rnd(n, d_in, grad=True), rnd(d_out, d_in, scale=d_in ** -0.5), rnd(r, d_in, scale=d_in ** -0.5, grad=True),
            rnd(K, d_out, r, scale=r ** -0.5, grad=True), rnd(K, d_in, scale=d_in ** -0.5, grad=True), rnd(n, d_out))


def profile_layer(n: int, d_in: int, d_out: int, r: int, K: int, dtype, p: float, device: torch.device,
                  methods=("stacked", "fused"), steps: int = 20) -> list[dict]:
    """Kernel time per forward+backward step of each method, from torch.profiler: one dict per
    (method, kernel) with the mean µs per step and launches per step, slowest first. On CPU
    (interpreter) the CPU operators are listed instead."""
    from torch.profiler import ProfilerActivity, profile

    x, w_base, A, B, R, dy = layer_tensors(n, d_in, d_out, r, K, dtype, device)
    cuda = device.type == "cuda"
    rows = []
    for method in methods:
        step = _make_step(method, x, w_base, A, B, R, dy, 2.0, p)

        def clean_step():
            for t in (x, A, B, R):
                t.grad = None
            step()

        for _ in range(3):  # compile and autotune outside the profile
            clean_step()
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                clean_step()
            if cuda:
                torch.cuda.synchronize(device)
        for evt in prof.key_averages():
            us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
            if us > 0:
                rows.append({"method": method, "kernel": evt.key, "us_per_step": us / steps,
                             "launches_per_step": evt.count / steps})
    return sorted(rows, key=lambda e: (e["method"], -e["us_per_step"]))


def format_profile(title: str, rows: list[dict], top: int = 12) -> str:
    """The slowest ``top`` kernels of each method, with each method's total."""
    lines = [title]
    for method in dict.fromkeys(e["method"] for e in rows):
        mine = [e for e in rows if e["method"] == method]
        lines.append(f"  {method}: {sum(e['us_per_step'] for e in mine):.1f} µs per step in {len(mine)} kernels")
        lines += [f"    {e['us_per_step']:>9.1f} µs  {e['launches_per_step']:>4.1f}x  {e['kernel'][:90]}" for e in mine[:top]]
    return "\n".join(lines)


def bench_layer(n: int, d_in: int, d_out: int, r: int, K: int, dtype, p: float, rep: int,
                warmup: int) -> dict:
    """Times (ms, median) of every method for one layer shape, plus a correctness check."""
    import triton.testing

    from .ilora import ilora_fused
    from .reference import ilora_reference

    x, w_base, A, B, R, dy = layer_tensors(n, d_in, d_out, r, K, dtype, torch.device("cuda"))
    scaling = 2.0

    with torch.no_grad():  # correctness at this shape (no dropout): fused vs stacked reference in fp32
        y0 = F.linear(x, w_base)
        ref = ilora_reference(x.float(), y0.float(), A.float(), B.float(), R.float(), scaling)
        out = ilora_fused(x, y0.clone(), A, B, R, scaling).float()
        rel_err = ((out - ref).abs().max() / ref.abs().max()).item()

    times = {}
    for method in METHODS:
        step = _make_step(method, x, w_base, A, B, R, dy, scaling, p)
        step()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        times[method] = float(triton.testing.do_bench(step, warmup=warmup, rep=rep, grad_to_none=[x, A, B, R],
                                                      return_mode="median"))
    return {"times_ms": times, "fused_vs_stacked_max_rel_err": rel_err}


def run(tokens: int, models: list[str], dtype_name: str, p: float, rep: int, warmup: int) -> dict:
    """Benchmark every layer of ``models``; returns the JSON-able result dict."""
    dtype = _DTYPES[dtype_name]
    results = []
    for model in models:
        r, K, layers = MODELS[model]
        for layer, d_in, d_out, count in layers:
            res = bench_layer(tokens, d_in, d_out, r, K, dtype, p, rep, warmup)
            t = res["times_ms"]
            fb, fa = flops(tokens, d_in, d_out, r, K)
            floor = t["base"] * (fb + fa) / fb
            tflops = {m: ((fb if m == "base" else fb + fa) / (t[m] * 1e-3)) / 1e12 for m in METHODS}
            results.append({
                "model": model, "layer": layer, "count_per_block": count, "tokens": tokens,
                "d_in": d_in, "d_out": d_out, "r": r, "K": K,
                "flops_base": fb, "flops_adapter": fa,
                "times_ms": t, "tflops": tflops, "floor_ms": floor,
                "ratios": {
                    "loop_over_fused": t["loop"] / t["fused"],
                    "stacked_over_fused": t["stacked"] / t["fused"],
                    "fused_over_base": t["fused"] / t["base"],
                    "fused_over_floor": t["fused"] / floor,
                },
                "fused_vs_stacked_max_rel_err": res["fused_vs_stacked_max_rel_err"],
            })
    return {
        "device": torch.cuda.get_device_name(), "dtype": dtype_name, "tokens": tokens, "dropout_p": p,
        "torch": torch.__version__, "triton": __import__("triton").__version__, "results": results,
    }


def format_table(report: dict) -> str:
    """Human-readable table of ``run``'s result."""
    head = (f"{'model':<11} {'layer':<18} {'d_in':>6} {'d_out':>6} {'r':>4} {'K':>2} | "
            + " ".join(f"{m + ' ms':>10}" for m in METHODS) + f" {'floor ms':>9} | "
            + " ".join(f"{m + ' TF/s':>12}" for m in METHODS)
            + f" | {'loop/fused':>10} {'stack/fused':>11} {'fused/base':>10} {'fused/floor':>11}")
    lines = [f"I-LoRA fwd+bwd on {report['device']}, {report['dtype']}, {report['tokens']} tokens, "
             f"dropout {report['dropout_p']}", head, "-" * len(head)]
    for e in report["results"]:
        t, tf, q = e["times_ms"], e["tflops"], e["ratios"]
        lines.append(f"{e['model']:<11} {e['layer']:<18} {e['d_in']:>6} {e['d_out']:>6} "
                     f"{e['r']:>4} {e['K']:>2} | "
                     + " ".join(f"{t[m]:>10.3f}" for m in METHODS) + f" {e['floor_ms']:>9.3f} | "
                     + " ".join(f"{tf[m]:>12.1f}" for m in METHODS)
                     + f" | {q['loop_over_fused']:>10.2f} {q['stacked_over_fused']:>11.2f} "
                     f"{q['fused_over_base']:>10.2f} {q['fused_over_floor']:>11.2f}")
    return "\n".join(lines)


def add_profile(report: dict, models: list[str], tokens: int, dtype_name: str, p: float) -> None:
    """Profile every layer (``profile_layer``) into ``report["profile"]``, printing each as it goes."""
    from .ilora import _kernels

    report["profile"] = []
    for model in models:
        r, K, layers = MODELS[model]
        for layer, d_in, d_out, _ in layers:
            rows = profile_layer(tokens, d_in, d_out, r, K, _DTYPES[dtype_name], p, torch.device("cuda"))
            report["profile"].append({"model": model, "layer": layer, "kernels": rows})
            print(format_profile(f"{model} {layer}: kernel time per fwd+bwd step", rows), flush=True)
            print("  autotuned: " + ", ".join(f"{name} {k.best_config}" for name, k in vars(_kernels()).items()
                                                if getattr(k, "best_config", None) is not None), flush=True)


def format_model(gpu_name: str, tokens: int, dtype_name: str, models: list[str], measured: dict | None) -> str:
    """The roofline table of every layer of ``models`` on ``GPUS[gpu_name]``; with ``measured`` (a
    ``--profile`` report at the same tokens and dtype) also the measured µs and measured / roofline."""
    gpu = GPUS[gpu_name]
    elem = _DTYPES[dtype_name].itemsize
    lines = [f"Roofline of the fused I-LoRA fwd+bwd on {gpu.name}: {gpu.tensor_flops / 1e12:.0f} TFLOP/s dense "
             f"16-bit tensor cores, {gpu.hbm_bytes_per_s / 1e12:.3g} TB/s HBM ({gpu.source}); {dtype_name}, "
             f"{tokens} tokens",
             "time = max(FLOPs / peak, bytes / bandwidth); bytes = each operand read once and each result written "
             "once (perfect on-chip reuse, one fp32 copy of split partials); kernel times add up"]
    if measured is not None:
        kernels = ("kernels = GPU time per step (torch.profiler), " if measured.get("profile")
                   else "no profile (per-kernel times need --profile), ")
        lines.append(f"measured: {measured['device']}, {measured['dtype']}, {measured['tokens']} tokens, "
                     f"torch {measured['torch']}, triton {measured['triton']}; {kernels}"
                     "fused = wall time (do_bench median)")
    head = (f"  {'part':<8} {'GFLOP':>8} {'MB':>9} {'FLOP/B':>7} {'bound':<7} {'roof µs':>9} {'meas µs':>9} "
            f"{'meas/roof':>9}")
    for model in models:
        r, K, layers = MODELS[model]
        for layer, d_in, d_out, _ in layers:
            rows = layer_model(Layer(tokens, d_in, d_out, r, K, elem), gpu)
            meas = _measured_layer(measured, model, layer) if measured is not None else None
            lines += ["", f"{model} {layer} ({d_in}->{d_out}, r {r}, K {K})", head]
            for row in rows:
                us = row["seconds"] * 1e6
                got = meas.get(row["part"]) if meas is not None else None
                lines.append(f"  {row['part']:<8} {row['flops'] / 1e9:>8.2f} {row['bytes'] / 1e6:>9.1f} "
                             f"{row['intensity']:>7.0f} {row['bound']:<7} {us:>9.1f} "
                             + (f"{got:>9.1f} {got / us:>9.2f}" if got is not None else f"{'-':>9} {'-':>9}"))
            fb, fa = flops(tokens, d_in, d_out, r, K)
            base_roof = next(row["seconds"] for row in rows if row["part"] == "base") * 1e6
            floor = (f"bench floor = base × (base + adapter FLOPs) / base FLOPs = {fb + fa:.3g} / {fb:.3g}: "
                     f"{base_roof * (fb + fa) / fb:.1f} µs at the roofline base")
            if meas is not None:
                floor += (f", {meas['base_wall'] * (fb + fa) / fb:.1f} µs at the measured base "
                          f"({meas['base_wall']:.1f} µs)")
            lines.append("  " + floor)
    return "\n".join(lines)


def _measured_layer(measured: dict, model: str, layer: str) -> dict:
    """{part: µs} measured for one layer: 'fused' and 'base_wall' = do_bench wall times; with a
    profile also the fused method's kernels by part, 'adapter' = their sum plus glue and 'base' =
    its cuBLAS GEMMs."""
    prof = [p for p in measured.get("profile", []) if p["model"] == model and p["layer"] == layer]
    res = [e for e in measured["results"] if e["model"] == model and e["layer"] == layer]
    if not res:
        raise ValueError(f"the measurement has no result for {model} {layer}: run the bench with --json "
                         "(and --profile for per-kernel times) at these shapes")
    parts = {}
    if prof:
        parts = measured_parts(prof[0]["kernels"])
        parts["adapter"] = sum(v for k, v in parts.items() if k != "base")
    parts["fused"] = res[0]["times_ms"]["fused"] * 1e3
    parts["base_wall"] = res[0]["times_ms"]["base"] * 1e3
    return parts


def model_main(args, models: list[str]) -> int:
    """``--model``: print the roofline table, with measurements from ``--measured`` or this GPU."""
    measured = None
    if args.measured:
        with open(args.measured) as f:
            measured = json.load(f)
        if measured["dtype"] not in _DTYPES:
            print(f"{args.measured}: dtype {measured['dtype']!r} is not one of {sorted(_DTYPES)}", file=sys.stderr)
            return 2
    elif torch.cuda.is_available():
        measured = run(args.tokens, models, args.dtype, args.dropout, args.rep, args.warmup)
        add_profile(measured, models, args.tokens, args.dtype, args.dropout)
    tokens = measured["tokens"] if measured is not None else args.tokens
    dtype_name = measured["dtype"] if measured is not None else args.dtype
    try:
        print(format_model(args.gpu, tokens, dtype_name, models, measured))
    except ValueError as exc:
        print(f"{args.measured}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 without a usable CUDA GPU)."""
    ap = argparse.ArgumentParser(prog="python -m avmt_kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step N (default 4096)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--dropout", type=float, default=0.05, help="adapter dropout p (default 0.05)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time per method, ms")
    ap.add_argument("--warmup", type=int, default=50, help="do_bench warmup time per method, ms")
    ap.add_argument("--profile", action="store_true",
                    help="also list each method's GPU kernels with their time per step (torch.profiler)")
    ap.add_argument("--model", action="store_true",
                    help="print the roofline model of every kernel at these shapes (no GPU needed)")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="peak numbers for --model (default h200)")
    ap.add_argument("--measured", metavar="PATH",
                    help="with --model: a --json report of this script to compare with (per kernel with --profile)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.measured and not args.model:
        ap.error("--measured needs --model")
    if args.model:
        return model_main(args, models)
    if not torch.cuda.is_available():
        print("avmt_kernels.bench needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              "(the kernels' correctness tests run on CPU: pytest tests/kernels).", file=sys.stderr)
        return 2
    from .ilora import triton_unusable_reason

    reason = triton_unusable_reason(torch.device("cuda"))
    if reason is not None:
        print(f"avmt_kernels.bench cannot run the fused kernel: {reason}", file=sys.stderr)
        return 2
    report = run(args.tokens, models, args.dtype, args.dropout, args.rep, args.warmup)
    print(format_table(report))
    if args.profile:
        add_profile(report, models, args.tokens, args.dtype, args.dropout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
