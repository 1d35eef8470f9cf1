"""peft export of plain LoRA, and conversion of Crab-named I-LoRA weights."""

import json
import os

import pytest
import torch

from avmt.adapters import ILoRA, LoRA, convert_crab_state_dict


def test_lora_export_loads_with_peft_from_pretrained(make_llama, tokens, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_llama(0).save_pretrained(base_dir)
    model = make_llama(0)
    adapter = LoRA(target_modules=["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.05)
    adapter.apply({"llm": model})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    expected = model(tokens).logits
    adapter.export_peft(adapter_dir, base_model_name_or_path=str(base_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter_dir))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == str(base_dir)

    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown scope"):
        adapter.export_peft(tmp_path / "x", scope="vision")


def _crab_state(adapter: ILoRA, heads: int, prefix="base_model.model.", seed=0):
    """Crab-named tensors for every adapted layer: lora_A [r,in], lora_B{i} [out,r], lora_route [K,in]."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in adapter.injected().items():
        crab = prefix + name[len("llm.") :]
        state[f"{crab}.lora_A.weight"] = torch.randn(layer.r, layer.in_features, generator=g)
        for i in range(heads):
            state[f"{crab}.lora_B{i}.weight"] = torch.randn(layer.out_features, layer.r, generator=g)
        state[f"{crab}.lora_route.weight"] = torch.randn(heads, layer.in_features, generator=g)
    return state


def test_convert_crab_state_dict_round_trip(make_llama, tokens):
    model = make_llama()
    adapter = ILoRA(target_modules=["q_proj", "up_proj"], r=4, alpha=8, num_heads=3)
    adapter.apply({"llm": model})
    state = _crab_state(adapter, heads=3)
    converted = convert_crab_state_dict(state, adapter)
    assert set(converted) == set(adapter.adapter_state_dict())
    adapter.load_adapter_state_dict(converted)
    layer = adapter.injected()["llm.model.layers.1.mlp.up_proj"]
    crab = "base_model.model.model.layers.1.mlp.up_proj"
    torch.testing.assert_close(layer.lora_A, state[f"{crab}.lora_A.weight"])
    torch.testing.assert_close(layer.lora_router, state[f"{crab}.lora_route.weight"])
    for i in range(3):
        torch.testing.assert_close(layer.lora_B[i], state[f"{crab}.lora_B{i}.weight"])
    # behaviour: the layer now computes Crab's y0 + s Σ_i w_i B_i A x
    x = torch.randn(5, layer.in_features)
    w = torch.softmax(x @ state[f"{crab}.lora_route.weight"].T, -1)
    ref = layer.base_layer(x) + layer.scaling * sum(
        w[:, i : i + 1] * (x @ state[f"{crab}.lora_A.weight"].T @ state[f"{crab}.lora_B{i}.weight"].T)
        for i in range(3)
    )
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # a peft adapter name before ".weight" is accepted too
    named = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    assert set(convert_crab_state_dict(named, adapter)) == set(converted)


def test_convert_crab_state_dict_errors(make_llama):
    adapter = ILoRA(target_modules=["q_proj"], r=4, alpha=8, num_heads=3)
    adapter.apply({"llm": make_llama()})
    layer0 = "llm.model.layers.0.self_attn.q_proj"

    with pytest.raises(ValueError) as e:  # head count mismatch names the layer and both shapes
        convert_crab_state_dict(_crab_state(adapter, heads=5), adapter)
    msg = str(e.value)
    assert "layers." in msg and "q_proj" in msg and "(3, 32, 4)" in msg and "(5, 32, 4)" in msg

    state = _crab_state(adapter, heads=3)
    bad = dict(state)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"expected shape \(4, 32\), found \(8, 32\)"):
        convert_crab_state_dict(bad, adapter)

    no_route = {k: v for k, v in state.items() if not k.endswith("layers.1.self_attn.q_proj.lora_route.weight")}
    with pytest.raises(ValueError, match="lora_route"):
        convert_crab_state_dict(no_route, adapter)

    missing_layer = {k: v for k, v in state.items() if "layers.0." not in k}
    with pytest.raises(ValueError, match=layer0):
        convert_crab_state_dict(missing_layer, adapter)

    gap = {k.replace("lora_B2.", "lora_B3."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="lora_B0 .. lora_B2"):
        convert_crab_state_dict(gap, adapter)

    stranger = {**state, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match="matches no I-LoRA layer"):
        convert_crab_state_dict(stranger, adapter)

    extra = {**state, "mm_projector.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="ignore_other_keys"):
        convert_crab_state_dict(extra, adapter)
    assert set(convert_crab_state_dict(extra, adapter, ignore_other_keys=True)) == set(adapter.adapter_state_dict())

    with pytest.raises(ValueError, match="unrecognized LoRA key"):
        convert_crab_state_dict({**state, "x.q_proj.lora_B.weight": torch.zeros(1)}, adapter)
