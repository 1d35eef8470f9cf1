"""Ahead-of-time compile check of the fused I-LoRA kernels (``python -m avmt_kernels.aot``).

The compile test runs the check in a subprocess: conftest sets TRITON_INTERPRET=1 for this process,
and triton fixes interpreter mode when it is first imported.
"""

import json
import os
import subprocess
import sys

import pytest

from avmt_kernels import aot

_CUOBJDUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function expand_kernel:
  REG:234 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function shrink_route_kernel:
  REG:255 STACK:24 SHARED:0 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = aot.parse_resource_usage(_CUOBJDUMP)
    assert usage == {
        "expand_kernel": {"regs": 234, "stack": 0, "local": 0, "static_shared": 1024},
        "shrink_route_kernel": {"regs": 255, "stack": 24, "local": 8, "static_shared": 0},
    }


def _row(**kw):
    row = {"kernel": "expand", "arch": 90, "dtype": "bf16", "config": "BLOCK_M=64 BLOCK_N=64 w4 s3",
           "launched": True, "default": False, "regs": 128, "spill_bytes": 0, "shared": 65536,
           "mma": False, "wgmma": True, "seconds": 0.5, "error": None}
    return {**row, **kw}


def test_check_rows_limits():
    """Fails on a compile error, on spills at a default config and on shared memory over the target's
    limit at a config pruning lets through; spills elsewhere and oversized pruned configs pass."""
    limit90, limit80 = aot.TARGETS[90].max_shared_mem, aot.TARGETS[80].max_shared_mem
    assert (limit90, limit80) == (232_448, 166_912)
    passing = [
        _row(),
        _row(spill_bytes=16),  # spills, but not at the default config
        _row(shared=limit90),  # exactly at the limit
        _row(shared=limit90 + 1, launched=False),  # over, but pruned away
        _row(arch=80, shared=limit80, default=True),
    ]
    assert aot.check_rows(passing, aot.TARGETS) == []
    failing = {
        "compile error": _row(error="CompilationError: boom"),
        "default config spills 8 bytes": _row(default=True, spill_bytes=8),
        f"shared memory {limit80 + 1} B over the sm_80 limit": _row(arch=80, shared=limit80 + 1),
    }
    for reason, row in failing.items():
        found = aot.check_rows(passing + [row], aot.TARGETS)
        assert len(found) == 1 and reason in found[0], (reason, found)


def test_format_row_flags():
    line = aot.format_row(_row(spill_bytes=8, shared=aot.TARGETS[90].max_shared_mem + 1, default=True), aot.TARGETS)
    assert "SPILLS" in line and "SMEM>LIMIT" in line and "default" in line
    assert aot.format_row(_row(), aot.TARGETS).endswith("ok")
    assert "ERROR CompilationError" in aot.format_row(_row(error="CompilationError: x"), aot.TARGETS)


def test_aot_compiles_default_configs(tmp_path):
    """sm_90 and sm_80, bf16, every kernel the wrapper launches at the Qwen2.5-7B shapes, at its
    default config: compiles to a cubin without spills and within shared memory (exit 0)."""
    reason = aot.toolchain_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "avmt_kernels.aot", "--arch", "90", "80", "--dtype", "bf16",
                           "--configs", "default", "--json", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    launched = {e["kernel"] for e in report["first_call"]}
    assert len(launched) >= 6
    for arch in (90, 80):
        compiled = {r["kernel"] for r in report["rows"] if r["arch"] == arch and r["default"]}
        assert compiled == launched, (arch, compiled, launched)
    assert all(r["regs"] > 0 for r in report["rows"])
    assert any(r["wgmma"] for r in report["rows"] if r["arch"] == 90)
    sm80 = [r for r in report["rows"] if r["arch"] == 80]
    assert any(r["mma"] for r in sm80) and not any(r["wgmma"] for r in sm80)  # wgmma is Hopper-only
