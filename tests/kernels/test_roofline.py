"""Roofline model of the fused I-LoRA layer (``avmt_kernels.roofline``, ``bench --model``)."""

import json
from pathlib import Path

import pytest

from avmt_kernels import bench
from avmt_kernels.roofline import GPUS, KERNELS, Cost, Gpu, Layer, bound, layer_model, measured_parts, roofline_time

MEASURED = (Path(__file__).resolve().parents[2] / "kernels" / "measurements" / "h200_2026-11-30"
            / "bench_qwen_profile.json")

# N=2, d_in=4, d_out=8, r=2, K=3, bf16; counted by hand from each kernel's operands:
# shrink  flops 2·2·4·(2+3)=80      bytes 2·(2·4 + 5·4) + 4·2·5 = 96
# expand  flops 2·2·3·2·8=192       bytes 4·2·5 + 2·(3·8·2 + 2·2·8) = 200
# g       flops 192                 bytes 2·(2·8 + 48) + 4·(2·5 + 2·3 + 3·2·2) = 240
# dx      flops 2·2·5·4=80          bytes 4·2·5 + 2·(5·4 + 2·4) = 96
# dar     flops 80                  bytes 2·2·4 + 4·(2·5 + 5·4) = 136
# db      flops 192                 bytes 2·2·8 + 4·(2·5 + 3·8·2) = 264
# glue    flops 0                   bytes 4·(4·2·2 + 3·2·3) + (4+2)·(8+12+48) + 3·2·2·4 = 592
# base    flops 4·2·4·8=256         bytes 2·(2·4·8 + 2·2·4 + 2·2·8) = 224
HAND = {"shrink": (80, 96), "expand": (192, 200), "g": (192, 240), "dx": (80, 96), "dar": (80, 136),
        "db": (192, 264), "glue": (0, 592), "base": (256, 224)}


def test_counts_match_hand_computed_small_case():
    rows = {r["part"]: r for r in layer_model(Layer(2, 4, 8, 2, 3, 2), GPUS["h200"])}
    for part, (flops, nbytes) in HAND.items():
        assert (rows[part]["flops"], rows[part]["bytes"]) == (flops, nbytes), part
    kernels = [p for p in HAND if p != "base"]
    assert rows["adapter"]["flops"] == sum(HAND[p][0] for p in kernels)
    assert rows["adapter"]["bytes"] == sum(HAND[p][1] for p in kernels)
    assert rows["fused"]["flops"] == rows["adapter"]["flops"] + 256


@pytest.mark.parametrize("model", sorted(bench.MODELS))
def test_kernel_flops_equal_bench_adapter_flops(model):
    """The kernels' tensor-core FLOPs add up to bench.flops' adapter count (6N(d_in(r+K) + K·r·d_out))."""
    r, k, layers = bench.MODELS[model]
    for _, d_in, d_out, _ in layers:
        rows = {e["part"]: e for e in layer_model(Layer(4096, d_in, d_out, r, k), GPUS["h100"])}
        fb, fa = bench.flops(4096, d_in, d_out, r, k)
        assert sum(rows[p]["flops"] for p in KERNELS) == fa
        assert rows["base"]["flops"] == fb


def test_roofline_time_takes_the_higher_roof():
    gpu = Gpu("toy", tensor_flops=100.0, hbm_bytes_per_s=10.0, source="test")
    assert roofline_time(Cost(1000.0, 50.0), gpu) == 10.0 and bound(Cost(1000.0, 50.0), gpu) == "compute"
    assert roofline_time(Cost(100.0, 50.0), gpu) == 5.0 and bound(Cost(100.0, 50.0), gpu) == "memory"
    rows = {r["part"]: r for r in layer_model(Layer(2, 4, 8, 2, 3, 2), gpu)}
    # every part here is memory-bound on the toy GPU: seconds = bytes / 10, and kernel times add up
    assert rows["shrink"]["seconds"] == 9.6
    assert rows["adapter"]["seconds"] == pytest.approx(sum(HAND[p][1] for p in HAND if p != "base") / 10)
    assert rows["fused"]["seconds"] == pytest.approx(rows["adapter"]["seconds"] + 22.4)


def test_peak_table():
    assert (GPUS["h100"].tensor_flops, GPUS["h100"].hbm_bytes_per_s) == (989e12, 3.35e12)
    assert (GPUS["h200"].tensor_flops, GPUS["h200"].hbm_bytes_per_s) == (989e12, 4.8e12)
    assert (GPUS["a100"].tensor_flops, GPUS["a100"].hbm_bytes_per_s) == (312e12, 2.039e12)


def test_measured_parts_classifies_profile_rows():
    rows = [
        {"method": "fused", "kernel": "shrink_route_kernel", "us_per_step": 10.0},
        {"method": "fused", "kernel": "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", "us_per_step": 100.0},
        {"method": "fused", "kernel": "sm90_xmma_gemm_bf16bf16_bf16f32", "us_per_step": 50.0},
        {"method": "fused", "kernel": "void at::native::reduce_kernel<128, 4>", "us_per_step": 3.0},
        {"method": "fused", "kernel": "void at::native::vectorized_elementwise_kernel<8>", "us_per_step": 2.0},
        {"method": "stacked", "kernel": "shrink_route_kernel", "us_per_step": 99.0},
    ]
    parts = measured_parts(rows)
    assert parts["shrink"] == 10.0 and parts["base"] == 150.0 and parts["glue"] == 5.0 and parts["db"] == 0.0


def test_bench_model_cli(capsys, monkeypatch):
    """--model needs no GPU; with the H200 measurement each part gets its measured time and ratio."""
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)  # on a GPU it would measure
    assert bench.main(["--model", "--gpu", "a100", "--models", "crab-7b"]) == 0
    out = capsys.readouterr().out
    assert "A100 SXM 80GB" in out and "crab-7b down_proj" in out and "bench floor" in out
    assert bench.main(["--model", "--measured", str(MEASURED), "--models", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    shrink_down = next(line for line in out.split("qwen2.5-7b down_proj")[1].splitlines() if "shrink" in line)
    assert "398.4" in shrink_down  # the profiled shrink_route_kernel µs at down_proj
    with pytest.raises(SystemExit):
        bench.main(["--measured", str(MEASURED)])


def test_bench_model_without_profile(tmp_path, capsys, monkeypatch):
    """A --json report without --profile: only the fused wall time is compared."""
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    report = json.loads(MEASURED.read_text())
    del report["profile"]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert bench.main(["--model", "--measured", str(path), "--models", "qwen2.5-7b"]) == 0
    down = capsys.readouterr().out.split("qwen2.5-7b down_proj")[1].splitlines()
    assert "-" in next(line for line in down if "shrink" in line).split()[-1]
    assert "2777.5" in next(line for line in down if line.split() and line.split()[0] == "fused")
    assert bench.main(["--model", "--measured", str(path), "--models", "crab-7b"]) == 2
