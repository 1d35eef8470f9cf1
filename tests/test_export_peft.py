"""``python -m avmt export peft``: a plain-LoRA run's LLM loads with peft and gives the avmt LLM's logits."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import pytest
import torch
import yaml

from avmt.cli import main
from avmt.export import SIDE_FILE, build_module, load_exported, load_trained_module

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
LORA = str(EXPERIMENTS / "lora.yaml")
ILORA = str(EXPERIMENTS / "ilora.yaml")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A 2-step fit of experiments/lora.yaml (tiny LLM trained with embed_tokens, lm_head and norm), in-process."""
    root = tmp_path_factory.mktemp("lora_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVMT_CACHE", str(root / "cache"))
        main(["data", "synth", "--out", str(root / "shards"), "--clips", "4", "--val_clips", "1", "--test_clips", "1",
              "--seed", "3"])
        main(["fit", "-c", LORA, f"--data.root={root / 'shards'}", f"--trainer.logger.init_args.save_dir={root / 'runs'}",
              "--trainer.max_epochs=1", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.clips_per_batch=1"])
    return root / "runs" / "lora" / "version_0" / "checkpoints" / "last.ckpt"


def probe(tokenizer) -> torch.Tensor:
    """``[1, L]`` ids: text with every placeholder and some ordinary ids."""
    text = "<video> <audio> Which instrument sounds first? So the answer is <answer> violin </answer> <seg> <image>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids + list(range(5, 40, 3))])


def test_lora_run_loads_with_peft_and_gives_the_same_logits(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "peft"
    main(["export", "peft", "--ckpt", str(lora_run), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"written to {out / SIDE_FILE}" in printed and "vision_connector" in printed  # said, not silently dropped
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16
    assert sorted(adapter_config["modules_to_save"]) == ["lm_head", "model.embed_tokens", "model.norm"]
    info = json.loads((out / "avmt_export.json").read_text())
    assert info["base_model"]["written_here"] and info["resize_token_embeddings"] == info["base_model"]["vocab_rows"] + 4
    assert info["check"]["max_abs_logit_difference"] < 1e-5
    from safetensors.torch import load_file

    extras = load_file(str(out / SIDE_FILE))
    assert any(key.startswith("model.vision_connector.") for key in extras)
    assert not any(key.startswith("model.llm.") for key in extras)

    run_config = lora_run.parent.parent / "config.yaml"
    # the base LLM rebuilt from the run's config (seeded init) is the base written with the export
    fresh = build_module([run_config]).model.llm.model
    base = AutoModelForCausalLM.from_pretrained(info["base_model"]["name_or_path"])
    torch.testing.assert_close(base.model.layers[1].mlp.up_proj.weight,
                               fresh.model.layers[1].mlp.up_proj.base_layer.weight, rtol=0, atol=0)
    # plain transformers + peft, as the export's README says
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()

    module, _ = load_trained_module(lora_run, [run_config])
    llm = module.model.llm
    ids = probe(tokenizer)
    assert ids.tolist() == probe(llm.tokenizer).tolist()  # same tokens, same ids
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = llm(llm.embed(ids), mask).logits
        found = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            untrained = peft_model(input_ids=ids, attention_mask=mask).logits
    assert found.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    assert (found - expected).abs().max() < 1e-5
    assert (untrained - expected).abs().max() > 1e-3  # the adapter and trained modules do matter


def test_pretrained_tied_llm_exports_only_the_new_token_rows(tmp_path, capsys):
    from test_llm_backbones import save_checkpoint

    folder = tmp_path / "qwen2"
    save_checkpoint("qwen2", folder)  # tied embeddings, ChatML template
    override = tmp_path / "pretrained.yaml"
    override.write_text(yaml.safe_dump({"model": {"llm": {"init_args": {"model": str(folder), "train_modules": []}}}}))
    module = build_module([LORA, override])
    torch.manual_seed(1)
    with torch.no_grad():  # stands for training: non-zero LoRA B and distinct new rows
        for name, parameter in module.named_parameters():
            if "lora_B" in name or "new_rows" in name:
                parameter.normal_(std=0.05)
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "run.ckpt")

    out = tmp_path / "peft"
    main(["export", "peft", "--ckpt", str(tmp_path / "run.ckpt"), "--out", str(out), "-c", LORA, "-c", str(override)])
    capsys.readouterr()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    llm = module.model.llm
    assert adapter_config["modules_to_save"] is None
    assert adapter_config["trainable_token_indices"] == {"model.embed_tokens": llm.new_token_ids}
    assert adapter_config["base_model_name_or_path"] == str(folder)
    info = json.loads((out / "avmt_export.json").read_text())
    assert not info["base_model"]["written_here"] and not (out / "base_model").exists()
    assert info["end_of_turn_id"] == llm.tokenizer.convert_tokens_to_ids("<|im_end|>")

    peft_model, tokenizer = load_exported(out)
    assert tokenizer.chat_template == llm.tokenizer.chat_template
    ids = probe(tokenizer)
    mask = torch.ones_like(ids)
    module.eval()
    with torch.no_grad():
        expected = llm(llm.embed(ids), mask).logits
        found = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (found - expected).abs().max() < 1e-5


def test_an_ilora_checkpoint_is_refused_naming_the_adapter(tmp_path, capsys):
    module = build_module([ILORA])
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ilora.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "peft", "--ckpt", str(tmp_path / "ilora.ckpt"), "--out", str(tmp_path / "out"), "-c", ILORA])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "avmt.adapters.ILoRA" in message and "peft" in message
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_or_config_names_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "peft", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and str(tmp_path / "none.ckpt") in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "peft", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")])
    assert str(tmp_path / "run" / "config.yaml") in capsys.readouterr().err
