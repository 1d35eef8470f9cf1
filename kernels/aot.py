"""Ahead-of-time compile check of the fused I-LoRA kernels for named GPU targets (no GPU needed).

    python -m avmt_kernels.aot [--arch 90 80] [--dtype bf16 fp16] [--shapes qwen2.5-7b]
                               [--configs default|all] [--json PATH] [--tokens 4096] [--dropout 0.05]

What it compiles: the wrapper (``avmt_kernels.ilora.ilora_fused``) runs forward + backward on CPU
tensors of each benchmark layer shape (``avmt_kernels.bench.MODELS``) with every autotuned kernel
replaced by a recorder, so each launch's arguments are exactly the wrapper's. Each recorded launch
is then specialised the way triton's JIT specialises it (``native_specialize_impl``: pointer
dtypes, int width, ints equal to 1, divisibility by 16) and compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` down to a cubin with the ptxas shipped in the triton wheel.

Per compiled config it reports registers and spills (``cuobjdump --dump-resource-usage``: REG and
STACK+LOCAL bytes per thread; triton's own ``n_spills`` is that local size / 4), shared memory
(triton's ``metadata.shared``, the dynamic shared memory the launch asks for) against the target's
opt-in limit, whether the PTX uses ``mma.sync`` / ``wgmma.mma_async``, and compile seconds.

Configs: the autotune list of each kernel (``ilora.KERNEL_CONFIGS`` when it exists, else the
``configs`` of the autotuners ``ilora._kernels()`` builds), pruned per layer and target by
``ilora.prune_configs`` when it exists. "Compiled on first call" = configs surviving pruning. The
default config of a kernel is the first surviving one. ``--configs default`` compiles only those.

Exit status 1 (with the reasons) on a compile error, on spills at a default config, or on shared
memory over the target's limit at a config that pruning lets through; 2 on a usage error or a
missing toolchain. Triton's cache (``TRITON_CACHE_DIR``, default ~/.triton/cache) makes reruns fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from .bench import _DTYPES, MODELS


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: CUDA capability, opt-in shared memory per block, SM count of its GPUs."""

    arch: int
    max_shared_mem: int  # bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin
    sms: int  # streaming multiprocessors of the GPUs benchmarked on this arch (split heuristics)
    gpus: str


TARGETS = {
    90: Target(90, 232_448, 132, "H100 / H200 SXM"),
    80: Target(80, 166_912, 108, "A100"),
}

_RESOURCE_LINE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")
_RESOURCE_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


# --------------------------------------------------------------------------- toolchain
def _nvidia_tool(name: str) -> str | None:
    """Path of an NVIDIA binary shipped with triton (or pointed to by TRITON_<NAME>_PATH), or None."""
    import triton

    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    attr = name.replace("-", "_")
    if knobs is not None and hasattr(type(knobs), attr):
        tool = getattr(knobs, attr)
        return tool.path if tool is not None else None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def toolchain_missing_reason() -> str | None:
    """None when this triton can compile a cubin for a named target here, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except Exception as exc:  # triton missing or broken
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return f"triton {triton.__version__} has the pre-3.3 ASTSource(fn, signature, constants) API"
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return f"triton {triton.__version__} has no native_specialize_impl (added by triton-lang/triton#7771)"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = _nvidia_tool(tool)
        except Exception as exc:  # a knob that cannot resolve its binary
            path = None
            why = f" ({type(exc).__name__}: {exc})"
        else:
            why = ""
        if path is None:
            return f"{tool} is not available to triton{why}: set TRITON_{tool.upper()}_PATH"
    return None


# --------------------------------------------------------------------------- kernels and configs
def kernel_table() -> dict:
    """{name: (JITFunction, [triton.Config, ...])}: the autotune list of every kernel the wrapper
    tunes. From ``ilora.KERNEL_CONFIGS`` / ``ilora.kernel_fn`` when they exist, else read off the
    autotuners ``ilora._kernels()`` builds."""
    from triton.runtime.autotuner import Autotuner

    from . import ilora

    if hasattr(ilora, "KERNEL_CONFIGS") and hasattr(ilora, "kernel_fn"):
        return {name: (ilora.kernel_fn(name), list(cfgs)) for name, cfgs in ilora.KERNEL_CONFIGS.items()}
    return {name: (obj.fn, list(obj.configs)) for name, obj in vars(ilora._kernels()).items()
            if isinstance(obj, Autotuner)}


def prune(name: str, configs: list, target: Target, dtype: torch.dtype, dims: dict) -> list:
    """The configs the autotuner compiles on first call for ``target`` (all when the wrapper
    has no ``prune_configs``)."""
    from . import ilora

    if not hasattr(ilora, "prune_configs"):
        return list(configs)
    return list(ilora.prune_configs(name, configs, max_shared_mem=target.max_shared_mem, dtype=dtype, dims=dims))


def config_label(cfg) -> str:
    """'BLOCK_M=64 BLOCK_K=128 w8 s3' for a triton.Config."""
    blocks = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


@dataclasses.dataclass
class Launch:
    """One kernel launch as the wrapper issues it: recorder name, grid (a function of the
    meta-parameter dict), positional and keyword arguments (without the config's block sizes)."""

    name: str
    grid: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name: str, sink: list):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, grid, args, kwargs))

    def run(self, *args, grid, warmup=False, **kwargs):
        self.sink.append(Launch(self.name, grid, args, kwargs))


@contextmanager
def _recording(sms: int):
    """Inside: the wrapper's kernels are recorders, CPU counts as a usable device and the SM count
    is ``sms``. Yields the list the launches are appended to."""
    from triton.runtime.jit import KernelInterface

    from . import ilora

    real = ilora._kernels()
    launches: list[Launch] = []
    fake = SimpleNamespace(**{k: _Recorder(k, launches) if isinstance(v, KernelInterface) else v
                              for k, v in vars(real).items()})
    patches = {"_STATE": fake, "_kernels": lambda: fake, "triton_unusable_reason": lambda device: None}
    if hasattr(ilora, "_num_sms"):
        patches["_num_sms"] = lambda device: sms
    saved = {k: getattr(ilora, k) for k in patches}
    # per-shape plans memoised by the wrapper depend on the SM count: forget them on both sides
    memos = [v for v in vars(ilora).values() if callable(getattr(v, "cache_clear", None))]
    for k, v in patches.items():
        setattr(ilora, k, v)
    for memo in memos:
        memo.cache_clear()
    try:
        yield launches
    finally:
        for k, v in saved.items():
            setattr(ilora, k, v)
        for memo in memos:
            memo.cache_clear()


def capture_launches(n: int, d_in: int, d_out: int, r: int, k: int, dtype: torch.dtype, dropout_p: float,
                     target: Target, allow_tf32: bool = False, seed: int = 0x5EED) -> list[Launch]:
    """The kernel launches of one ``ilora_fused`` forward + backward at x [n, d_in], y0 [n, d_out],
    A [r, d_in], B [k, d_out, r], R [k, d_in] in ``dtype`` (uninitialised CPU tensors; nothing runs
    but the PyTorch glue between the kernels, or the PyTorch path where the wrapper picks it), with
    ``target``'s SM count and ``torch.backends.cuda.matmul.allow_tf32`` set to ``allow_tf32``.
    The seed is a generic value (neither 1 nor a multiple of 16)."""
    from . import ilora

    def leaf(*shape):
        return torch.empty(*shape, dtype=dtype).requires_grad_()

    x, A, B, R = leaf(n, d_in), leaf(r, d_in), leaf(k, d_out, r), leaf(k, d_in)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with _recording(target.sms) as launches:
            y = ilora.ilora_fused(x, torch.empty(n, d_out, dtype=dtype), A, B, R, 2.0, dropout_p=dropout_p,
                                  seed=seed)
            y.backward(torch.empty_like(y))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return launches


# --------------------------------------------------------------------------- compile
def specialize(fn, bound: dict, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile(ASTSource(fn, ...))``, specialised on the
    argument values ``bound`` ({param name: value}) as triton's JIT launcher does."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name]
        if p.is_constexpr:
            kind, attr = "constexpr", None
        else:
            kind, attr = native_specialize_impl(backend, value, p.is_const, not p.do_not_specialize,
                                                not p.do_not_specialize_on_alignment)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr if not p.is_constexpr else value
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def parse_resource_usage(text: str) -> dict:
    """{function: {"regs", "stack", "local", "static_shared"}} from ``cuobjdump --dump-resource-usage``."""
    out = {}
    for func, line in _RESOURCE_LINE.findall(text):
        fields = {k: int(v) for k, v in _RESOURCE_FIELD.findall(line)}
        out[func] = {"regs": fields["REG"], "stack": fields.get("STACK", 0), "local": fields.get("LOCAL", 0),
                     "static_shared": fields.get("SHARED", 0)}
    return out


def resource_usage(cubin: bytes, function: str) -> dict:
    """Registers, stack/local bytes per thread and static shared memory of ``function`` in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    return parse_resource_usage(text)[function]


def compile_config(fn, launch: Launch, cfg, target: Target) -> dict:
    """Compile ``fn`` for ``target`` at ``launch``'s arguments and config ``cfg``. Returns the
    measured row fields (regs, spill_bytes, shared, mma, wgmma, seconds, programs) or ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    gpu = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gpu)
    names = set(fn.arg_names)
    every = cfg.all_kwargs()
    bound = fn.signature.bind(*launch.args, **launch.kwargs, **{k: v for k, v in every.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in every.items() if k not in names and v is not None}
    grid = launch.grid(dict(bound.arguments))
    row = {"programs": math.prod(grid if isinstance(grid, tuple) else (grid,))}
    signature, constexprs, attrs = specialize(fn, bound.arguments, backend)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                  options=backend.parse_options(options).__dict__)
    except Exception as exc:  # any compile failure is a finding of the check, reported per config
        row.update(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                   seconds=time.perf_counter() - start)
        return row
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    ptx = compiled.asm["ptx"]
    row.update(regs=usage["regs"], spill_bytes=usage["stack"] + usage["local"], shared=int(compiled.metadata.shared),
               static_shared=usage["static_shared"],
               mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx, seconds=seconds, error=None)
    return row


# --------------------------------------------------------------------------- the check
def check_rows(rows: list[dict], targets: dict) -> list[str]:
    """The reasons the check fails: a compile error anywhere, spills at a default config, shared
    memory over the target's limit at a config that pruning lets through."""
    failures = []
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] sm_{row['arch']} {row['dtype']}"
        if row.get("error"):
            failures.append(f"{where}: compile error: {row['error']}")
            continue
        if row["default"] and row["spill_bytes"] > 0:
            failures.append(f"{where}: default config spills {row['spill_bytes']} bytes per thread")
        limit = targets[row["arch"]].max_shared_mem
        if row["launched"] and row["shared"] > limit:
            failures.append(f"{where}: shared memory {row['shared']} B over the sm_{row['arch']} limit {limit} B, "
                            "and pruning lets this config through")
    return failures


def run_check(archs: list[int], dtypes: list[str], models: list[str], which: str, tokens: int,
              dropout_p: float, allow_tf32: bool = False, log=None) -> dict:
    """Compile every (target, dtype, kernel, config) and return the JSON-able report."""
    import triton

    table = kernel_table()
    rows: dict[tuple, dict] = {}
    first_call, no_launch = [], []
    start = time.perf_counter()
    for arch in archs:
        target = TARGETS[arch]
        for dtype_name in dtypes:
            dtype = _DTYPES[dtype_name]
            for model in models:
                r, k, layers = MODELS[model]
                for layer, d_in, d_out, _ in layers:
                    dims = {"N": tokens, "D_IN": d_in, "D_OUT": d_out, "R": r, "K": k}
                    launches = capture_launches(tokens, d_in, d_out, r, k, dtype, dropout_p, target, allow_tf32)
                    if not launches:
                        no_launch.append({"arch": arch, "dtype": dtype_name, "layer": f"{model} {layer}"})
                    for launch in launches:
                        if launch.name not in table:
                            raise RuntimeError(f"the wrapper launched {launch.name!r}, which has no config list "
                                               f"(known: {sorted(table)})")
                        fn, configs = table[launch.name]
                        kept = prune(launch.name, configs, target, dtype, dims)
                        kept_labels = [config_label(c) for c in kept]
                        first_call.append({"kernel": launch.name, "arch": arch, "dtype": dtype_name,
                                           "layer": f"{model} {layer}", "compiled_on_first_call": len(kept),
                                           "configs": len(configs)})
                        todo = kept[:1] if which == "default" else configs
                        for cfg in todo:
                            label = config_label(cfg)
                            bound_key = (launch.name, arch, dtype_name, label,
                                         repr(specialize_key(fn, launch, cfg, target)))
                            new = bound_key not in rows
                            if new:
                                rows[bound_key] = {"kernel": launch.name, "arch": arch, "dtype": dtype_name,
                                                   "config": label, "layers": [], "launched": False,
                                                   "default": False, **compile_config(fn, launch, cfg, target)}
                            row = rows[bound_key]
                            row["layers"].append(f"{model} {layer}")
                            row["launched"] |= label in kept_labels
                            row["default"] |= bool(kept_labels) and label == kept_labels[0]
                            if new and log is not None:
                                log(format_row(row, TARGETS))
    rows_list = list(rows.values())
    return {"triton": triton.__version__, "torch": torch.__version__, "configs": which, "tokens": tokens,
            "dropout_p": dropout_p, "allow_tf32": allow_tf32, "models": models, "no_launch": no_launch,
            "targets": {a: dataclasses.asdict(TARGETS[a]) for a in archs},
            "cache_dir": _cache_dir(), "seconds": time.perf_counter() - start, "rows": rows_list,
            "first_call": first_call, "failures": check_rows(rows_list, TARGETS)}


def specialize_key(fn, launch: Launch, cfg, target: Target) -> tuple:
    """What makes two launches compile to the same binary: the specialisation of their arguments."""
    from triton.compiler import make_backend
    from triton.backends.compiler import GPUTarget

    names = set(fn.arg_names)
    bound = fn.signature.bind(*launch.args, **launch.kwargs, **{k: v for k, v in cfg.kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = specialize(fn, bound.arguments, make_backend(GPUTarget("cuda", target.arch, 32)))
    return tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(attrs))


def _cache_dir() -> str:
    import triton

    cache = getattr(getattr(triton, "knobs", None), "cache", None)
    return str(cache.dir) if cache is not None else os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")


# --------------------------------------------------------------------------- output
_HEAD = (f"{'kernel':<7} {'sm':>3} {'dtype':<5} {'config':<40} {'first':>5} {'regs':>4} {'spill B':>7} "
         f"{'smem B':>7} {'%lim':>5} {'mma':>3} {'wgmma':>5} {'sec':>6}  status")


def format_row(row: dict, targets: dict) -> str:
    """One table line for a compiled (kernel, target, dtype, config)."""
    flag = "yes" if row["launched"] else "no"
    head = f"{row['kernel']:<7} {row['arch']:>3} {row['dtype']:<5} {row['config']:<40} {flag:>5}"
    if row.get("error"):
        return f"{head} {'':>4} {'':>7} {'':>7} {'':>5} {'':>3} {'':>5} {row['seconds']:>6.2f}  ERROR {row['error']}"
    limit = targets[row["arch"]].max_shared_mem
    status = []
    if row["spill_bytes"]:
        status.append("SPILLS")
    if row["shared"] > limit:
        status.append("SMEM>LIMIT")
    if row["default"]:
        status.append("default")
    return (f"{head} {row['regs']:>4} {row['spill_bytes']:>7} {row['shared']:>7} {100 * row['shared'] / limit:>5.0f} "
            f"{'yes' if row['mma'] else '-':>3} {'yes' if row['wgmma'] else '-':>5} {row['seconds']:>6.2f}  "
            + (" ".join(status) or "ok"))


def format_report(report: dict) -> str:
    """The table, the configs compiled on first call per kernel/target/dtype, and the verdict."""
    targets = {int(a): Target(**t) for a, t in report["targets"].items()}
    limits = ", ".join(f"sm_{a} {t.max_shared_mem:,} B" for a, t in targets.items())
    lines = [f"AOT compile of the fused I-LoRA kernels: triton {report['triton']}, configs {report['configs']}, "
             f"{report['tokens']} tokens, dropout {report['dropout_p']}, allow_tf32 {report.get('allow_tf32', False)}, "
             f"shapes {', '.join(report['models'])}",
             f"shared-memory limits: {limits}; 'first' = compiled on first call (survives pruning); "
             "spill B = local memory bytes per thread", _HEAD, "-" * len(_HEAD)]
    lines += [format_row(row, targets) for row in report["rows"]]
    lines.append("")
    lines.append("configs compiled on first call / configs in the list:")
    per = {}
    for e in report["first_call"]:
        per.setdefault((e["kernel"], e["arch"], e["dtype"]), []).append(e)
    for (kernel, arch, dtype), entries in per.items():
        counts = ", ".join(f"{e['layer'].split(' ', 1)[1]} {e['compiled_on_first_call']}/{e['configs']}"
                           for e in entries)
        lines.append(f"  {kernel:<7} sm_{arch} {dtype}: {counts}")
    for e in report.get("no_launch", []):
        lines.append(f"  sm_{e['arch']} {e['dtype']} {e['layer']}: no Triton launch (the wrapper ran its PyTorch path)")
    rows = report["rows"]
    spilled = sum(1 for r in rows if not r.get("error") and r["spill_bytes"])
    over = sum(1 for r in rows if not r.get("error") and r["shared"] > targets[r["arch"]].max_shared_mem)
    errors = sum(1 for r in rows if r.get("error"))
    lines.append(f"{len(rows)} compiles in {report['seconds']:.1f} s (cache {report['cache_dir']}): "
                 f"{errors} errors, {spilled} spill, {over} over the shared-memory limit")
    lines += [f"FAIL: {f}" for f in report["failures"]] or ["PASS"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 pass, 1 check failed, 2 usage/toolchain)."""
    ap = argparse.ArgumentParser(prog="python -m avmt_kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS, reverse=True), choices=sorted(TARGETS),
                    help="CUDA capabilities to compile for (default: all)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(_DTYPES))
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-7b"], choices=sorted(MODELS),
                    help="benchmark model shapes whose layers are compiled (avmt_kernels.bench.MODELS)")
    ap.add_argument("--configs", choices=("default", "all"), default="all",
                    help="compile every config in the lists, or only each kernel's default (first surviving)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step N (default 4096)")
    ap.add_argument("--dropout", type=float, default=0.05, help="adapter dropout p (default 0.05, as the bench)")
    ap.add_argument("--allow-tf32", action="store_true",
                    help="launch with torch.backends.cuda.matmul.allow_tf32 = True (how fp32 reaches TF32 kernels)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("avmt_kernels.aot compiles real binaries: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    reason = toolchain_missing_reason()
    if reason is not None:
        print(f"avmt_kernels.aot cannot compile here: {reason}", file=sys.stderr)
        return 2
    print(_HEAD, flush=True)
    report = run_check(args.arch, args.dtype, args.shapes, args.configs, args.tokens, args.dropout, args.allow_tf32,
                       log=lambda line: print(line, flush=True))
    print()
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
