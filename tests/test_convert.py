"""``python -m avmt convert crab-lora``: Crab-named I-LoRA weights → an avmt checkpoint (in-process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avmt.cli import main

ILORA = str(Path(__file__).resolve().parents[1] / "experiments" / "ilora.yaml")
PROJECTIONS = {  # tiny default Llama: hidden 128, MLP 256
    "self_attn.q_proj": (128, 128),
    "self_attn.k_proj": (128, 128),
    "self_attn.v_proj": (128, 128),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_proj": (128, 256),
    "mlp.up_proj": (128, 256),
    "mlp.down_proj": (256, 128),
}


def crab_state(heads: int = 3, r: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(4):
        for name, (d_in, d_out) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=generator)
            state[f"{prefix}.lora_route.weight"] = torch.randn(heads, d_in, generator=generator)
            for head in range(heads):
                state[f"{prefix}.lora_B{head}.weight"] = torch.randn(d_out, r, generator=generator)
    state["model.mm_projector.weight"] = torch.zeros(4, 4)  # a non-LoRA key of a full Crab checkpoint
    return state


def test_convert_crab_lora_writes_a_loadable_checkpoint(tmp_path):
    state = crab_state()
    torch.save(state, tmp_path / "crab.bin")
    out = tmp_path / "converted.ckpt"
    main(["convert", "crab-lora", "--weights", str(tmp_path / "crab.bin"), "-c", ILORA, "--out", str(out)])
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    prefix = "model.llm.model.model.layers.2.mlp.down_proj"
    torch.testing.assert_close(checkpoint["state_dict"][f"{prefix}.lora_A"], state["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"])
    torch.testing.assert_close(
        checkpoint["state_dict"][f"{prefix}.lora_B"][1], state["base_model.model.model.layers.2.mlp.down_proj.lora_B1.weight"]
    )
    torch.testing.assert_close(
        checkpoint["state_dict"][f"{prefix}.lora_router"], state["base_model.model.model.layers.2.mlp.down_proj.lora_route.weight"]
    )
    assert "avmt" in checkpoint and checkpoint["avmt"]["tokenizer"]


def test_convert_crab_lora_with_another_head_count_names_layer_and_shapes(tmp_path, capsys):
    torch.save(crab_state(heads=5), tmp_path / "crab.bin")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "crab-lora", "--weights", str(tmp_path / "crab.bin"), "-c", ILORA, "--out", str(tmp_path / "x.ckpt")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "layers." in message and "3" in message and "5" in message


def test_convert_missing_weights_file_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "crab-lora", "--weights", str(tmp_path / "none.bin"), "-c", ILORA, "--out", str(tmp_path / "x.ckpt")])
    assert str(tmp_path / "none.bin") in capsys.readouterr().err
