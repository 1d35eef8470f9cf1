"""``python -m avmt bench adapters --quick``: structure of the result (no timing assertions)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from avmt.bench import (
    ADAPTERS,
    TARGETS,
    VARIANTS,
    CrabLoopLinear,
    CrabPlusLoopLinear,
    build_variants,
    check_targets,
    format_targets,
    main,
)
from avmt.cli import main as cli_main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run through the real CLI entry point, and the JSON it wrote."""
    path = tmp_path_factory.mktemp("bench") / "adapters.json"
    threads = torch.get_num_threads()
    cli_main(["bench", "adapters", "--quick", "--json", str(path)])
    assert torch.get_num_threads() == threads  # --threads is restored afterwards
    return json.loads(path.read_text())


def test_quick_times_every_variant_and_overhead_is_time_minus_base(quick):
    assert quick["benchmark"] == "adapters" and quick["quick"] is True
    assert quick["variants"] == list(VARIANTS)
    assert quick["repeats"] == 2 and quick["threads"] == 1 and quick["clock"] == "cpu"
    results = quick["results"]
    assert {(e["r"], e["K"]) for e in results} == {(r, k) for r in (8, 128) for k in (1, 3, 8)}
    # the base layer is timed before and after every adapter step; its time pools every base step of the shape
    all_base = [t for e in results for t in e["rounds_ms"]["base"]]
    for ci, e in enumerate(results):
        assert set(e["times_ms"]) == set(VARIANTS) and set(e["overhead_ms"]) == set(ADAPTERS)
        assert e["times_ms"]["base"] == pytest.approx(statistics.median(all_base))
        assert all(t > 0 for v in VARIANTS for t in e["rounds_ms"][v] + e["wall_rounds_ms"][v])
        extra = 0
        for a in ADAPTERS:
            n = len(e["rounds_ms"][a])  # 2 rounds, then up to 2 extra samples while fewer than 2 are stable
            assert 2 <= n <= 4 and len(e["rel_rounds"][a]) == len(e["stable"][a]) == n
            assert n == 2 or sum(e["stable"][a][:-1]) < 2
            extra += n - 2
            good = [x for x, ok in zip(e["rel_rounds"][a], e["stable"][a]) if ok] or e["rel_rounds"][a]
            assert e["relative"][a] == pytest.approx(statistics.median(good))
            assert e["times_ms"][a] == pytest.approx(e["relative"][a] * e["times_ms"]["base"])
            assert e["overhead_ms"][a] == pytest.approx(e["times_ms"][a] - e["times_ms"]["base"])
        # extra samples come in passes of base, a, base, a', ..., base over the adapters still short
        assert 2 * (len(ADAPTERS) + 1) + extra + (extra > 0) <= len(e["rounds_ms"]["base"])
        assert len(e["rounds_ms"]["base"]) <= 2 * (len(ADAPTERS) + 1) + 2 * extra
        # each sample is the adapter step over the mean of the base steps just before and after it,
        # in an adapter order that rotates with the round and the configuration
        for i in range(2):
            offset = (i + ci) % len(ADAPTERS)
            order = ADAPTERS[offset:] + ADAPTERS[:offset]
            base_steps = e["rounds_ms"]["base"][i * (len(ADAPTERS) + 1) : (i + 1) * (len(ADAPTERS) + 1)]
            for j, a in enumerate(order):
                ref = e["rounds_ms"][a][i] / (0.5 * (base_steps[j] + base_steps[j + 1]))
                assert e["rel_rounds"][a][i] == pytest.approx(ref)
        # the loop forms (and LoRA at K = 1) compute the same layer as I-LoRA
        expected = {"crab_loop", "crab_plus_loop"} | ({"lora"} if e["K"] == 1 else set())
        assert set(e["max_rel_err"]) == expected
        assert all(err < 1e-4 for err in e["max_rel_err"].values()), e["max_rel_err"]


def test_quick_targets_section(quick):
    targets = quick["targets"]
    assert [(t["name"], t["r"], t["op"], t["threshold"]) for t in targets] == [tuple(x) for x in TARGETS]
    e = {(x["r"], x["K"]): x for x in quick["results"]}
    for t in targets:
        assert isinstance(t["passed"], bool) or (t["passed"] is None and t["measured"] is None)
        assert list(t["per_shape"]) == ["256x256"]
        if t["measured"] is None:
            continue
        ok = t["measured"] >= t["threshold"] if t["op"] == ">=" else t["measured"] <= t["threshold"]
        assert t["passed"] == ok
        # one shape: the ratio of sums is that shape's ratio, computed from the table's numbers
        if t["name"].startswith("layer"):
            ref = e[(t["r"], 3)]["times_ms"]["ilora"] / e[(t["r"], 3)]["times_ms"]["lora"]
        elif "K=8" in t["name"]:
            ref = e[(8, 8)]["overhead_ms"]["ilora"] / e[(8, 1)]["overhead_ms"]["ilora"]
        else:
            ovh = e[(t["r"], 3)]["overhead_ms"]
            ref = ovh[t["name"].split()[1]] / ovh["ilora"]
        assert t["measured"] == pytest.approx(ref)


def test_subset_run_skips_unmeasured_targets(capsys):
    argv = ["adapters", "--quick", "--repeats", "1", "--ranks", "8", "--heads", "3", "--shapes", "64x32"]
    result = main(argv)
    out = capsys.readouterr().out
    assert "64 x 32" in out and ("PASS" in out or "FAIL" in out)
    assert [e["K"] for e in result["results"]] == [3]
    by_name = {(t["name"], t["r"]): t for t in result["targets"]}
    assert by_name[("overhead crab_loop / ilora", 128)]["passed"] is None
    assert by_name[("overhead ilora K=8 / K=1", 8)]["passed"] is None
    assert "SKIP  overhead ilora K=8 / K=1" in out


def test_k_growth_work_share_hand_computed():
    # base step 100 ms for 4 N d_in d_out = 4 * 500 * 1000 * 2000 = 4 GFLOP -> 40 GFLOP/s; K = 1 -> 8 adds
    # 6 * N * r * d_out * 7 = 6 * 500 * 8 * 2000 * 7 = 0.336 GFLOP -> 8.4 ms = 84 % of the 10 ms K = 1 overhead
    def entry(k, overhead):
        return {"d_in": 1000, "d_out": 2000, "r": 8, "K": k, "times_ms": {"base": 100.0},
                "overhead_ms": {"ilora": overhead}}

    targets = check_targets([entry(1, 10.0), entry(8, 30.0)], tokens=500)
    growth = next(t for t in targets if "K=8" in t["name"])
    assert growth["measured"] == pytest.approx(3.0) and growth["passed"] is False
    shape = growth["k_work"]["per_shape"]["1000x2000"]
    assert shape["gemm_gflops"] == pytest.approx(40.0)
    assert shape["delta_gflop"] == pytest.approx(0.336)
    assert shape["delta_ms"] == pytest.approx(8.4)
    assert growth["k_work"]["share"] == pytest.approx(0.84)
    assert all("k_work" not in t for t in targets if "K=8" not in t["name"])
    text = format_targets(targets)
    assert "FAIL  overhead ilora K=8 / K=1" in text
    assert "take 8.4 ms" in text and "1000x2000 40" in text and "= 84 % of" in text and "allows 25 %" in text
    # without the token count there is no work estimate
    assert "k_work" not in next(t for t in check_targets([entry(1, 10.0), entry(8, 30.0)]) if "K=8" in t["name"])


def test_bfloat16_run_builds_every_variant_in_bfloat16(capsys):
    argv = ["adapters", "--quick", "--repeats", "1", "--ranks", "8", "--heads", "1", "--shapes", "64x32",
            "--dtype", "bfloat16"]
    result = main(argv)
    assert result["dtype"] == "bfloat16" and "bfloat16 CPU" in capsys.readouterr().out
    (e,) = result["results"]
    assert set(e["max_rel_err"]) == {"crab_loop", "crab_plus_loop", "lora"}
    assert all(err < 3e-2 for err in e["max_rel_err"].values()), e["max_rel_err"]
    base = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    for name, module in build_variants(base, r=4, num_heads=2).items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["adapters", "--shapes", "1024by1024"])
    with pytest.raises(ValueError, match="repeats"):
        main(["adapters", "--quick", "--repeats", "0"])
    with pytest.raises(SystemExit):
        main(["adapters", "--quick", "--dtype", "float16"])


def test_loop_forms_match_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    x = torch.randn(2, 5, 12)
    for cls in (CrabLoopLinear, CrabPlusLoopLinear):
        layer = cls(base, r=4, alpha=8.0, num_heads=3)
        w = torch.softmax(layer.lora_route(x), dim=-1)
        z = x @ layer.lora_A.weight.t()
        ref = base(x) + 2.0 * sum(w[..., k : k + 1] * (z @ layer.lora_B[k].weight.t()) for k in range(3))
        torch.testing.assert_close(layer(x), ref)


def test_build_variants_share_the_frozen_base():
    base = nn.Linear(16, 8, bias=False)
    variants = build_variants(base, r=4, num_heads=2)
    assert set(variants) == set(VARIANTS)
    assert not base.weight.requires_grad
    for name, module in variants.items():
        if name != "base":
            assert any(m is base for m in module.modules())
            assert any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------ bench llm (tiny random LLM; SmolLM2 is not run here)
@pytest.fixture(scope="module")
def llm_bench(tmp_path_factory):
    """``bench llm --model tiny``: every variant in its own child process, and the JSON it wrote."""
    from avmt.bench import LLM_VARIANTS

    path = tmp_path_factory.mktemp("bench") / "llm.json"
    cli_main(["bench", "llm", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--threads", "1",
              "--train_modules", "norm", "--json", str(path)])
    result = json.loads(path.read_text())
    assert [row["variant"] for row in result["variants"]] == list(LLM_VARIANTS)
    return result


def test_llm_bench_times_every_variant_in_its_own_process(llm_bench, capsys):
    assert llm_bench["benchmark"] == "llm" and llm_bench["adapter"] == "ilora" and llm_bench["heads"] == 3
    assert (llm_bench["batch"], llm_bench["seq"], llm_bench["steps"]) == (2, 16, 2)
    assert "own child process" in llm_bench["memory_method"]
    pids = set()
    for row in llm_bench["variants"]:
        assert "error" not in row, row
        assert len(row["step_seconds"]) == 2 and row["seconds_per_step"] == pytest.approx(statistics.median(row["step_seconds"]))
        assert row["tokens_per_second"] == pytest.approx(2 * 16 / row["seconds_per_step"])
        assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])  # 1 warm-up + 2 timed
        peak = row["peak_rss_train_mb"] if row["peak_rss_train_mb"] is not None else row["peak_rss_mb"]
        assert peak >= row["rss_loaded_mb"] * 0.9 > 0 and row["rss_loaded_mb"] > row["rss_start_mb"] * 0.5
        assert row["threads"] == 1 and row["trainable_parameters"] > 0
        assert row["trainable_dtypes"] == ["float32"]  # adapter, new rows and the trained norm stay fp32 in every variant
        assert row["max_batch_estimate"] is None or row["max_batch_estimate"] >= 0
        pids.add(row["pid"])
    assert len(pids) == 3  # one child process per variant
    frozen = {row["variant"]: row["frozen_dtypes"] for row in llm_bench["variants"]}
    assert frozen == {"fp32": ["float32"], "fp32_checkpointing": ["float32"], "bf16_base": ["bfloat16"]}
    recommended = llm_bench["recommended"]
    assert recommended["variant"] in frozen and recommended["batch"] >= 1


def test_llm_bench_fails_when_every_variant_failed(monkeypatch, tmp_path, capsys):
    import sys

    import avmt.bench

    # a child that dies as one loading a missing model would, without loading anything
    monkeypatch.setattr(avmt.bench, "_child_command",
                        lambda args, variant, out: [sys.executable, "-c", "raise SystemExit('no such model: x')"])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "llm", "--model", "tiny", "--json", str(tmp_path / "llm.json")])
    message = str(exit_info.value.code)
    assert "every variant failed" in message and "no such model" in message
    assert not (tmp_path / "llm.json").exists()


def test_llm_bench_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "llm", "--model", "tiny", "--batch", "0"])
    assert exit_info.value.code == 2 and "--batch" in capsys.readouterr().err
