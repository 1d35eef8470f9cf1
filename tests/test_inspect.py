"""``python -m avmt inspect``: meta-device builds of the full-size seeds, their parameter counts checked
against hand counts from the papers' shapes, and the written ``config`` checked against a real checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from avmt.errors import UserError
from avmt.inspect import build_without_weights, count_model, without_weights

ROOT = Path(__file__).resolve().parents[1]
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ilora_parameters(d_in: int, d_out: int, r: int, heads: int) -> int:
    """One I-LoRA linear (avmt/adapters/ilora.py): shared A [r, d_in], K heads B [K, d_out, r], router
    [K, d_in] without bias."""
    return r * d_in + heads * d_out * r + heads * d_in


def llm_ilora(layers: int, hidden: int, intermediate: int, kv_dim: int, r: int, heads: int) -> int:
    """I-LoRA on q, k, v, o, gate, up, down of every layer of a Llama/Qwen2-shaped decoder."""
    shapes = [(hidden, hidden), (hidden, kv_dim), (hidden, kv_dim), (hidden, hidden),
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return layers * sum(ilora_parameters(d_in, d_out, r, heads) for d_in, d_out in shapes)


def test_crab_plus_ilora_matches_the_paper():
    """Crab+: 682.35 M in the LLM (Qwen2.5-7B shapes), 870.48 M with the audio tower's q/k/v and the
    vision tower's MLPs (Crab+'s training log)."""
    counts = count_model(build_without_weights(["-c", str(ROOT / "experiments/seeds/crab_plus.yaml")]))
    r, heads = 128, 3
    llm = llm_ilora(layers=28, hidden=3584, intermediate=18944, kv_dim=512, r=r, heads=heads)
    audio = 32 * 3 * ilora_parameters(1280, 1280, r, heads)  # 32 layers x q, k, v at width 1280
    vision = 32 * (2 * ilora_parameters(1280, 3420, r, heads) + ilora_parameters(3420, 1280, r, heads))
    assert (llm, audio, vision) == (682_350_592, 63_283_200, 124_846_720)
    assert counts["adapter"]["scopes"] == {"llm": llm, "vision": vision, "audio": audio}
    assert counts["adapter"]["trainable"] == counts["adapter"]["total"] == llm + audio + vision == 870_480_512
    assert round(llm / 1e6, 2) == 682.35 and round((llm + audio + vision) / 1e6, 2) == 870.48
    parts = {row["part"]: row for row in counts["parts"]}
    assert parts["llm base"]["trainable"] == 0  # frozen: only I-LoRA and the new token rows train
    assert parts["llm new token rows"]["trainable"] == 4 * 3584 * 2  # 4 tokens, input and output rows
    assert sum(row["total"] for row in counts["parts"]) + counts["adapter"]["total"] == counts["total"]


def test_crab_llm_ilora_count():
    """experiments/seeds/crab.yaml: LLaMA-2-7B-chat, I-LoRA r = 8, alpha = 16, K = 3 on the seven projections,
    counted by hand from LLaMA-2-7B's shapes."""
    counts = count_model(build_without_weights(["-c", str(ROOT / "experiments/seeds/crab.yaml")]))
    expected = llm_ilora(layers=32, hidden=4096, intermediate=11008, kv_dim=4096, r=8, heads=3)
    assert expected == 45_162_496
    assert counts["adapter"]["scopes"] == {"llm": expected}
    parts = {row["part"]: row for row in counts["parts"]}
    assert parts["llm base"]["total"] == 6_738_415_616  # LLaMA-2-7B
    assert parts["llm new token rows"]["total"] == 10 * 4096 * 2  # 4 placeholders, <seg> and six mask tokens, in and out
    assert parts["vision encoder"]["total"] == 303_179_776  # CLIP ViT-L/14's vision tower (with its unused post-norm)


def test_inspect_command_prints_the_totals(tmp_path):
    out = tmp_path / "counts.json"
    done = subprocess.run(
        [sys.executable, "-m", "avmt", "inspect", "-c", "experiments/seeds/crab_plus.yaml", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "TOTAL" in done.stdout and "870,480,512" in done.stdout
    assert "adapter trainable in scope llm: 682,350,592 (682.35 M)" in done.stdout
    assert "offline word tokenizer" in done.stdout
    written = json.loads(out.read_text())
    assert written["adapter"]["total"] == 870_480_512 and written["total"] > written["trainable"]


def test_inspect_needs_the_architecture_of_a_named_checkpoint():
    from avmt.llm import CausalLM

    with without_weights(), pytest.raises(UserError, match=r"model\.llm\.init_args\.config: .*model_type"):
        CausalLM(model="meta-llama/Llama-2-7b-chat-hf")


def test_written_config_is_checked_against_the_loaded_checkpoint(tmp_path):
    """A YAML whose config contradicts the checkpoint it loads is a UserError naming the key and both values."""
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    from avmt.encoders.base import load_pretrained
    from avmt.llm import CausalLM, build_word_tokenizer

    tokenizer = build_word_tokenizer(["a", "b"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    written = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}
    loaded = CausalLM(model=str(tmp_path / "llm"), config=written)  # agrees: loads
    assert loaded.hidden_size == 32 and not loaded.stand_in_tokenizer
    with pytest.raises(UserError, match=r"model\.llm\.init_args\.config\.hidden_size: the YAML says 64 .* has 32"):
        CausalLM(model=str(tmp_path / "llm"), config={**written, "hidden_size": 64})
    with pytest.raises(UserError, match=r"config\.model_type: the YAML says 'qwen2'"):
        CausalLM(model=str(tmp_path / "llm"), config={**written, "model_type": "qwen2"})

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    with pytest.raises(UserError, match=r"model\.vision_encoder\.init_args\.config\.num_hidden_layers: .* 2 .* 1"):
        load_pretrained(str(tmp_path / "vit"), "float32", "vision", config={"model_type": "vit", "num_hidden_layers": 2})


TINY_THINKER = {
    "model_type": "qwen2_5_omni_thinker",
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                      "fullatt_block_indexes": [0]},
    "audio_config": {"encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 32, "d_model": 16,
                     "output_dim": 32},
}


def test_omni_plugins_from_an_architecture(tmp_path):
    """model: null + config builds a random thinker of that architecture with the offline tokenizer (the
    crab_plus_tiny seed); a saved thinker that contradicts the written config is a UserError."""
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from avmt.inspect import config_from_dict
    from avmt.omni import QwenOmniAudioEncoder, QwenOmniLM, QwenOmniVisionEncoder

    llm = QwenOmniLM(model=None, config=TINY_THINKER, train_modules=[])
    assert not llm.pretrained and not llm.stand_in_tokenizer
    assert llm.model.config.get_text_config().vocab_size == llm.vocab_size  # the offline tokenizer's rows
    vision = QwenOmniVisionEncoder(model=None, config=TINY_THINKER, image_size=56)
    audio = QwenOmniAudioEncoder(model=None, config=TINY_THINKER, tokens_per_segment=2)
    assert vision(torch.zeros(1, 2, 3, 64, 64)).shape == (1, 2, 4, 32)
    assert audio(torch.zeros(1, 32000), num_segments=2).shape == (1, 2, 2, 32)

    Qwen2_5OmniThinkerForConditionalGeneration(config_from_dict(TINY_THINKER, "test")).save_pretrained(tmp_path)
    wrong = {**TINY_THINKER, "vision_config": {**TINY_THINKER["vision_config"], "depth": 2}}
    with pytest.raises(UserError, match=r"model\.vision_encoder\.init_args\.config\.vision_config\.depth: .* 2 .* 1"):
        QwenOmniVisionEncoder(model=str(tmp_path), config=wrong)


SEEDS = ROOT / "experiments" / "seeds"
#: a seed's total parameters as its paper reports them (where it does), matched within 5 %
PAPER_TOTALS = {"avuformer": 319.6e6}


@pytest.mark.parametrize("name", ["av_unified", "avuformer", *sorted(p.stem for p in SEEDS.glob("*.yaml")
                                                                        if p.stem not in ("crab", "crab_plus",
                                                                                          "av_unified", "avuformer"))])
def test_every_seed_builds_without_weights(name):
    """Each seed of experiments/seeds/ (full size and tiny, the ablations too) builds offline with parts that train."""
    counts = count_model(build_without_weights(["-c", str(SEEDS / f"{name}.yaml")]))
    assert 0 < counts["trainable"] <= counts["total"]
    if name in PAPER_TOTALS:
        assert abs(counts["total"] - PAPER_TOTALS[name]) / PAPER_TOTALS[name] < 0.05, counts["total"]
