"""AVModule pieces that need no Trainer: task ids for task-gated adapters, router heatmap, parameter report."""

from __future__ import annotations

import torch

from avmt.adapters import MoELoRA
from avmt.connectors import QFormerConnector
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.llm import CausalLM
from avmt.module import AVModule, router_heatmap
from avmt.tasks import num_task_ids

T = 4


def tiny_module(adapter, **options) -> AVModule:
    """A seeded AVModule of one-layer models (T segments); ``options`` go to AVModule."""
    torch.manual_seed(0)
    return AVModule(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=1),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        adapter,
        **{"num_segments": T, **options},
    )


def test_task_gated_moe_lora_routes_by_the_task_the_module_sets(make_batch):
    module = tiny_module(MoELoRA(r=4, alpha=8, dropout=0.0, num_experts=3, gate="task", num_tasks=num_task_ids()))
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name or "task_gate" in name:
                parameter.normal_(std=0.5)
    model = module.model
    frames = torch.randint(0, 256, (1, T, 3, 32, 32), dtype=torch.uint8)
    audio = torch.randn(1, T * 4000) * 0.1
    batch = make_batch(["<video> <audio> Which mood?"] * 2, frames, audio, [0, 0],
                       targets=["<answer> calm </answer>"] * 2, model=model)
    with torch.no_grad():
        module._set_task_ids(["ave", "ave"], frames.device)
        same = model(batch).loss_sum
        module._set_task_ids(["ave", "avqa"], frames.device)
        mixed = model(batch).loss_sum
    torch.testing.assert_close(same[0], same[1])  # same sample, same task: same loss
    torch.testing.assert_close(mixed[0], same[0])
    assert not torch.allclose(mixed[1], same[1])  # another task id, another gate


def test_parameter_report_counts_every_trainable_parameter_once():
    module = tiny_module(MoELoRA(r=4, alpha=8, dropout=0.0, num_experts=2))
    report = module.parameter_report()
    parts = sum(count for name, count in report.items() if name != "total trainable")
    assert parts == report["total trainable"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert report["adapter MoELoRA [llm]"] > 0


def test_router_heatmap_renders_tasks_by_heads():
    figure = router_heatmap(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), ["ave", "avqa"])
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_yticklabels()] == ["ave", "avqa"]
    assert len(axis.get_xticklabels()) == 3


def test_the_avqa_prior_is_fitted_on_recorded_training_answers_and_kept_in_checkpoints():
    import types
    import warnings

    import pytest

    module = tiny_module(None)
    batch = types.SimpleNamespace(
        tasks=["avqa", "avqa", "avqa", "emotion"],
        answers=[{"answer": "yes", "type": "audio_existential"}, {"answer": "yes", "type": "audio_existential"},
                 {"answer": "no", "type": "audio_existential"}, {"mood": "calm"}],
    )
    evaluated = [{"answer": "no", "type": "audio_existential"}] * 3 + [{"answer": "yes", "type": "audio_existential"}]
    task = module._task("avqa")
    with pytest.warns(UserWarning, match="no training answers recorded"):
        scores, name = module._baseline(task, evaluated)
    assert scores["accuracy"] == pytest.approx(3 / 4) and name.endswith("(fitted on the evaluated answers)")
    module._record_train_answers(batch)
    assert set(module._train_answers) == {"avqa"}  # only tasks whose baseline fits training answers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, name = module._baseline(task, evaluated)
    assert scores["accuracy"] == pytest.approx(1 / 4) and name == "question-type prior"  # training says "yes"
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    restored = tiny_module(None)
    restored.on_load_checkpoint(checkpoint)
    assert restored._train_answers == module._train_answers
