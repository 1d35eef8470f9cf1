"""Adapter injection on a tiny random Llama: matching, errors, freezing, state dicts, LoRA via peft."""

import pytest
import torch
from torch import nn

from avmt.adapters import ILoRA, ILoRALinear, LoRA, MoELoRA, count_parameters


def _randomize(adapter, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_ilora_injects_exactly_the_matching_modules(make_llama, llama_linears):
    model = make_llama()
    adapter = ILoRA(target_modules=["q_proj", "v_proj"], r=4, alpha=8, num_heads=3)
    adapter.apply({"llm": model})
    expected = {f"llm.{n}" for n in llama_linears if n.endswith(("q_proj", "v_proj"))}
    assert set(adapter.injected()) == expected
    adapted = {n for n, m in model.named_modules() if isinstance(m, ILoRALinear)}
    assert {f"llm.{n}" for n in adapted} == expected
    for name, layer in adapter.injected().items():
        assert model.get_submodule(name[len("llm.") :]) is layer
    # the other linears are untouched nn.Linear
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert isinstance(model.lm_head, nn.Linear)


def test_default_targets_regex_and_suffix(make_llama, llama_linears):
    model = make_llama()
    ILoRA(r=2, alpha=4).apply({"llm": model})  # default: the seven projections
    assert {n for n, m in model.named_modules() if isinstance(m, ILoRALinear)} == set(llama_linears)

    model = make_llama()
    a = ILoRA(target_modules=[r"re:model\.layers\.0\.mlp\..*", "layers.1.self_attn.o_proj"], r=2, alpha=4)
    a.apply({"llm": model})
    assert set(a.injected()) == {
        "llm.model.layers.0.mlp.gate_proj",
        "llm.model.layers.0.mlp.up_proj",
        "llm.model.layers.0.mlp.down_proj",
        "llm.model.layers.1.self_attn.o_proj",
    }
    # suffix matching is bounded by dots: "proj" alone matches nothing
    with pytest.raises(ValueError, match="q_proj"):
        ILoRA(target_modules=["proj"], r=2, alpha=4).apply({"llm": make_llama()})


def test_zero_init_model_output_unchanged(make_llama, tokens):
    model = make_llama()
    ref = model(tokens).logits
    ILoRA(r=4, alpha=8, num_heads=3).apply({"llm": model})
    torch.testing.assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_no_match_error_lists_linear_modules(make_llama):
    adapter = ILoRA(target_modules=["query_key_value"])
    with pytest.raises(ValueError) as e:
        adapter.apply({"llm": make_llama()})
    msg = str(e.value)
    assert "query_key_value" in msg and "model.layers.0.self_attn.q_proj" in msg and "lm_head" in msg
    assert not adapter.applied


def test_unknown_scope_error_lists_given_scopes(make_llama):
    adapter = LoRA(scopes=["llm", "vision"])
    with pytest.raises(ValueError) as e:
        adapter.apply({"llm": make_llama(), "audio": nn.Linear(2, 2)})
    assert "vision" in str(e.value) and "audio" in str(e.value) and "llm" in str(e.value)


def test_apply_twice_and_bad_configs(make_llama):
    model = make_llama()
    adapter = ILoRA(r=2, alpha=4)
    adapter.apply({"llm": model})
    with pytest.raises(RuntimeError, match="already applied"):
        adapter.apply({"llm": model})
    # linears inside adapted layers are not candidates for a second adapter
    with pytest.raises(ValueError, match="no linear module"):
        MoELoRA(target_modules=["q_proj"], r=2, alpha=4).apply({"llm": model})
    with pytest.raises(ValueError, match="re:"):
        ILoRA(target_modules="q_proj")
    with pytest.raises(ValueError, match="regular expression"):
        ILoRA(target_modules=["re:("])
    with pytest.raises(ValueError, match="top_k"):
        ILoRA(num_heads=2, top_k=3)
    with pytest.raises(ValueError, match="auto|triton|torch"):
        ILoRA(kernel="fast")


def test_freezing_touches_only_adapter_parameters(make_llama):
    for cls in (ILoRA, LoRA, MoELoRA):
        model = make_llama()
        model.requires_grad_(False)
        model.model.embed_tokens.weight.requires_grad_(True)  # a flag the adapter must keep
        before = {id(p): (p, p.requires_grad) for p in model.parameters()}
        adapter = cls(r=4, alpha=8)
        adapter.apply({"llm": model})
        for p, flag in before.values():
            assert p.requires_grad == flag, cls.__name__
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        expected = {id(p) for p in adapter.trainable_parameters()} | {id(model.model.embed_tokens.weight)}
        assert trainable == expected, cls.__name__
        assert all(id(p) not in before for p in adapter.trainable_parameters())


def test_lora_peft_injection(make_llama, llama_linears, tokens):
    from peft.tuners.lora import Linear as PeftLoraLinear

    model = make_llama()
    model.requires_grad_(False)
    ref = model(tokens).logits
    adapter = LoRA(r=4, alpha=8, dropout=0.0)
    adapter.apply({"llm": model})
    assert set(adapter.injected()) == {f"llm.{n}" for n in llama_linears}
    assert all(isinstance(m, PeftLoraLinear) for m in adapter.injected().values())
    assert isinstance(model.lm_head, nn.Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(llama_linears) == len(adapter.trainable_parameters())
    torch.testing.assert_close(model(tokens).logits, ref)  # B = 0 at init
    # keys of peft's own state dict agree with the parameters the adapter reports
    assert set(adapter.adapter_state_dict()) == set(adapter.named_adapter_parameters())
    assert "llm.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter.adapter_state_dict()
    # a backward reaches every LoRA parameter
    _randomize(adapter)
    model(tokens).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())


@pytest.mark.parametrize("cls", [ILoRA, LoRA, MoELoRA])
def test_adapter_state_dict_round_trip_strict(cls, make_llama, tokens):
    model_a, model_b = make_llama(0), make_llama(0)
    a, b = cls(r=4, alpha=8, dropout=0.0), cls(r=4, alpha=8, dropout=0.0)
    a.apply({"llm": model_a})
    b.apply({"llm": model_b})
    _randomize(a)
    state = {k: v.clone() for k, v in a.adapter_state_dict().items()}
    assert not torch.allclose(model_a(tokens).logits, model_b(tokens).logits)
    b.load_adapter_state_dict(state)
    torch.testing.assert_close(model_b(tokens).logits, model_a(tokens).logits)
    for k, v in b.adapter_state_dict().items():
        assert torch.equal(v, state[k])
    # strict: a missing key, an unexpected key or a wrong shape raises and loads nothing
    key = sorted(state)[0]
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="missing keys"):
        b.load_adapter_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected keys"):
        b.load_adapter_state_dict({**state, "llm.lm_head.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected"):
        b.load_adapter_state_dict({**state, key: torch.zeros(3, 3)})


def test_ilora_with_one_head_equals_lora_on_the_model(make_llama, tokens):
    m_lora, m_ilora = make_llama(0), make_llama(0)
    lora = LoRA(r=4, alpha=8, dropout=0.0)
    ilora = ILoRA(r=4, alpha=8, dropout=0.0, num_heads=1)
    lora.apply({"llm": m_lora})
    ilora.apply({"llm": m_ilora})
    _randomize(lora)
    src = lora.adapter_state_dict()
    state = {}
    for name, layer in ilora.injected().items():
        state[f"{name}.lora_A"] = src[f"{name}.lora_A.weight"]
        state[f"{name}.lora_B"] = src[f"{name}.lora_B.weight"].unsqueeze(0)
        state[f"{name}.lora_router"] = layer.lora_router.detach().clone()
    ilora.load_adapter_state_dict(state)
    torch.testing.assert_close(m_ilora(tokens).logits, m_lora(tokens).logits, rtol=1e-5, atol=1e-5)


def test_aux_loss_and_router_stats_through_the_model(make_llama, tokens):
    model = make_llama()
    adapter = ILoRA(target_modules=["q_proj", "down_proj"], r=4, alpha=8, num_heads=3, balance_coef=0.01)
    adapter.apply({"llm": model})
    assert adapter.router_stats() == {}
    model(tokens)
    aux = adapter.aux_loss()
    assert aux is not None and aux.ndim == 0 and aux.requires_grad
    stats = adapter.router_stats()
    assert set(stats) == set(adapter.injected())
    for v in stats.values():
        assert v.shape == (3,)
        torch.testing.assert_close(v.sum(), torch.tensor(1.0))
    with_ent = adapter.router_stats(include_entropy=True)
    assert len(with_ent) == 2 * len(stats) and set(adapter.router_entropy()) == set(stats)
    adapter.reset_router_stats()
    assert adapter.router_stats() == {}
    assert ILoRA(r=2, alpha=4).aux_loss() is None  # nothing applied, no coefficients
    plain = LoRA(r=2, alpha=4)
    plain.apply({"llm": make_llama()})
    assert plain.aux_loss() is None and plain.router_stats() == {}
    plain.set_task_ids(torch.tensor([0, 1]))  # accepted (no-op) by every adapter


def test_multiple_scopes_and_count_parameters(make_llama):
    model = make_llama()
    vision = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4))
    r, k = 4, 3
    adapter = ILoRA(
        target_modules={"llm": ["q_proj"], "vision": ["re:[02]"]}, scopes=["llm", "vision"], r=r, alpha=8, num_heads=k
    )
    adapter.apply({"llm": model, "vision": vision, "audio": nn.Linear(2, 2)})
    assert set(adapter.injected()) == {
        "llm.model.layers.0.self_attn.q_proj",
        "llm.model.layers.1.self_attn.q_proj",
        "vision.0",
        "vision.2",
    }

    def n_params(d_in, d_out):
        return r * d_in + k * d_out * r + k * d_in

    counts = count_parameters(adapter)
    assert counts == {"llm": 2 * n_params(32, 32), "vision": n_params(8, 6) + n_params(6, 4)}
    assert sum(counts.values()) == sum(p.numel() for p in adapter.trainable_parameters())
    assert vision(torch.randn(2, 8)).shape == (2, 4)


def test_module_apply_with_a_function_still_works():
    adapter = ILoRA()
    seen = []
    adapter.apply(lambda m: seen.append(type(m).__name__))
    assert seen == ["ILoRA"] and not adapter.applied


def test_lora_follows_the_eval_mode_of_the_model(make_llama, tokens):
    model = make_llama()  # eval mode
    adapter = LoRA(r=4, alpha=8, dropout=0.5)
    adapter.apply({"llm": model})
    _randomize(adapter)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(tokens).logits, model(tokens).logits)
