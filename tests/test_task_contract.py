"""The task contract: every registered task runs through one generic path (sample -> collate ->
forward -> losses -> generation -> prediction -> metric), and the module, the model and the data
module never name a task."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from avmt.adapters import ILoRA
from avmt.connectors import MLPConnector, QFormerConnector
from avmt.data.datamodule import ClipTaskStream, collate_rules
from avmt.data.sample import ClipGroup, MediaRef, collate
from avmt.data.shards import CorruptSampleWarning, clip_from_index
from avmt.data.synth import SynthConfig
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.heads import MaskDecoderHead
from avmt.llm import CausalLM
from avmt.module import AVModule
from avmt.tasks import get_task, list_tasks
from avmt.tasks.base import Task, TaskParts

REPO = Path(__file__).resolve().parents[1]
T = 10
CONFIG = SynthConfig(frame_size=32, multi_source=0.5)


def tiny_module(heads=True, **kwargs) -> AVModule:
    torch.manual_seed(0)
    return AVModule(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=1),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        ILoRA(r=4, alpha=8, num_heads=2, dropout=0.0),
        image_connector=MLPConnector(tokens_per_segment=4, hidden_size=32),
        heads=[MaskDecoderHead(hidden_size=8, pixel_channels=4)] if heads else [],
        num_segments=T,
        **kwargs,
    )


@pytest.fixture(scope="module")
def module() -> AVModule:
    return tiny_module(generation_tasks=list_tasks(), max_new_tokens=6)


@pytest.fixture(scope="module")
def clips():
    return [clip_from_index(i, "val", 5, CONFIG) for i in range(12)]


def groups_for(task: Task, clips, count: int = 2) -> list[ClipGroup]:
    """Groups of ``count`` samples of ``task``; a multi-clip task's other clips are chosen
    (``select_others``) among the clips before the anchor, most recent first, as the data stream does."""
    groups = []
    for i, clip in enumerate(clips):
        if task.applies(clip) and len(groups) < count:
            rng = random.Random(i)
            others = task.select_others(clip, clips[:i][::-1], rng)
            if others is not None:
                groups.append(ClipGroup([clip, *others], [task.build(clip, rng, others)]))
    assert groups, f"no clip of the fixture applies to {task.name}"
    return groups


def test_the_module_the_model_and_the_datamodule_never_name_a_task():
    sources = {name: (REPO / "avmt" / name).read_text() for name in ("module.py", "model.py", "data/datamodule.py")}
    for file, text in sources.items():
        for task in list_tasks():
            assert not re.search(rf"['\"]{re.escape(task)}['\"]", text), f"{file} names the task {task!r}"


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_through_the_generic_path(name, module, clips):
    task = get_task(name, reasoning=False)
    batch = collate(groups_for(task, clips), collate_rules([task]))
    batch = module.on_before_batch_transfer(batch, 0)
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module._losses(batch, "train")
    assert torch.isfinite(loss)
    loss.backward()
    head_grads = [p.grad for p in module.model.heads.parameters()]
    if task.outputs:  # the dense losses reach the head
        assert all(g is not None and torch.isfinite(g).all() for g in head_grads) and any(g.abs().sum() > 0 for g in head_grads)
    else:
        assert all(g is None or not g.abs().sum() for g in head_grads)
    generated = module.model.generate(batch, max_new_tokens=6, return_dense=True)
    predictions = []
    for row, text in enumerate(generated.texts):
        outputs = {o: generated.dense[o].for_row(row) for o in task.outputs if o in generated.dense}
        predictions.append(task.predict(text, outputs))
    collection = task.metrics()
    collection.update(predictions, batch.answers)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in collection.compute().values())
    exact = task.metrics()
    exact.update([task.answer_to_pred(a) for a in batch.answers], batch.answers)
    assert float(exact.compute()["parse_failure_rate"]) == 0.0
    baseline = task.majority_baseline(batch.answers)
    assert baseline and all(v == v for v in baseline.values())


def _force(module, token_ids: list[int]):
    """Make greedy generation emit ``token_ids`` (then eos) by adding a huge logit, step by step."""
    head = module.model.llm.model.get_output_embeddings()
    step = {"n": 0}

    def hook(_, __, logits):
        index = token_ids[step["n"]] if step["n"] < len(token_ids) else module.model.tokenizer.eos_token_id
        step["n"] += 1
        logits = logits.clone()
        logits[..., index] += 1e4
        return logits

    return head.register_forward_hook(hook)


def test_an_emitted_seg_yields_a_mask_from_the_state_training_reads(module, clips):
    task = get_task("s4", reasoning=False)
    batch = module.on_before_batch_transfer(collate(groups_for(task, clips, 1), collate_rules([task])), 0)
    assert batch.targets == ["<seg>"]
    with torch.no_grad():
        trained = module.model(batch)
    seg = module.model.llm.placeholder_id("<seg>")
    handle = _force(module, [seg])
    try:
        generated = module.model.generate(batch, max_new_tokens=4, return_dense=True)
    finally:
        handle.remove()
    assert "<seg>" in generated.texts[0]
    states = generated.states["<seg>"]
    assert states.rows.tolist() == [0] == trained.states["<seg>"].rows.tolist()
    # generation reads the same hidden state as the teacher-forced pass (the one that predicts <seg>)
    torch.testing.assert_close(states.values, trained.states["<seg>"].values, atol=1e-4, rtol=1e-4)
    masks = generated.dense["mask_logits"].for_row(0)
    assert masks.shape == (1, T, 32, 32)
    prediction = task.predict(generated.texts[0], {"mask_logits": masks})
    assert prediction is not None and prediction["mask"].shape == (T, 32, 32)


def test_a_generation_without_seg_is_a_counted_failure_not_an_exception(module, clips):
    task = get_task("ms3", reasoning=False)
    batch = module.on_before_batch_transfer(collate(groups_for(task, clips, 2), collate_rules([task])), 0)
    handle = _force(module, [])  # eos at once
    try:
        generated = module.model.generate(batch, max_new_tokens=4, return_dense=True)
    finally:
        handle.remove()
    assert generated.dense["mask_logits"].rows.numel() == 0
    predictions = [task.predict(t, {"mask_logits": generated.dense["mask_logits"].for_row(i)})
                   for i, t in enumerate(generated.texts)]
    assert predictions == [None, None]
    collection = task.metrics()
    collection.update(predictions, batch.answers)
    scores = collection.compute()
    assert float(scores["parse_failure_rate"]) == 1.0 and float(scores["j"]) < 1.0


def test_a_task_that_reads_a_missing_head_output_is_a_config_error():
    module = tiny_module(heads=False)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(task_names=["ave", "s4"]))
    with pytest.raises(ValueError, match="'s4'.*mask_logits.*model.heads"):
        module.setup("fit")


def test_generation_tasks_default_to_the_data_tasks_and_an_empty_list_scores_none():
    data = SimpleNamespace(datamodule=SimpleNamespace(task_names=["ave", "s4"]))
    default, none = tiny_module(), tiny_module(generation_tasks=[])
    for module in (default, none):
        module._trainer = data
        module.setup("fit")
    assert sorted(default.tasks) == sorted(default.task_metrics) == ["ave", "s4"]
    assert not none.tasks and not len(none.task_metrics)


def test_a_dense_loss_without_a_weight_is_a_config_error(clips):
    module = tiny_module(dense_loss_weights={"bce": 1.0})
    task = get_task("s4", reasoning=False)
    batch = module.on_before_batch_transfer(collate(groups_for(task, clips), collate_rules([task])), 0)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="'dice'.*dense_loss_weights"):
        warnings.simplefilter("ignore")
        module._losses(batch, "train")


def test_checkpoints_keep_task_ids_and_say_why_a_tokenizer_differs(module):
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["avmt"]["task_ids"]["ave"] == 2
    moved = {**checkpoint, "avmt": {**checkpoint["avmt"], "task_ids": {**checkpoint["avmt"]["task_ids"], "ave": 9}}}
    with pytest.raises(ValueError, match="ave: 9 -> 2"):
        module.on_load_checkpoint(moved)
    other = CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, words=["violin", "drum"])
    changed = {**checkpoint, "avmt": {**checkpoint["avmt"], "tokenizer": other.tokenizer_state()}}
    with pytest.raises(ValueError, match=r"offline vocabulary changed: \d+ word\(s\) added"):
        module.on_load_checkpoint(changed)


def test_a_bad_sample_is_skipped_counted_and_named(clips):
    clip = next(c for c in clips if get_task("s4").applies(c))
    broken = type(clip)(clip.key, clip.frames, clip.audio, clip.scene, clip.masks[:, :16])  # masks of another size
    stream = ClipTaskStream([], ["s4", "ave"], reasoning=False, seed=0, shuffle=False)
    with pytest.warns(CorruptSampleWarning, match=rf"s4 sample of clip '{clip.key}'.*do not match frames"):
        group = stream._build(broken, [])
    assert [s.task for s in group.samples] == ["ave"]
    assert stream.counter.count == 1 and stream.counter.reasons == {"bad s4 sample": 1}


class PairTask(Task):
    """A two-clip task made up for this test: is the second clip's audio the anchor's?"""

    name = "pair_test"
    task_id = 999
    num_clips = 2
    needs_av_event = False
    prompts = ("Does this sound belong to the video?",)

    def _compose_clip(self, clip, rng):
        raise AssertionError("build is overridden")

    def build(self, clip, rng, others=()):
        parts = TaskParts(self.prompts[0], [], "", "<answer> no </answer>", "no",
                          media=(MediaRef("<video>", 0), MediaRef("<audio>", 1)))
        from avmt.data.sample import TaskSample

        return TaskSample(self.name, "<video> <audio> " + parts.question, parts.bare, parts.answer, parts.media)


def test_multi_clip_samples_refer_to_other_clips_and_collate_dedupes_them(clips):
    stream = ClipTaskStream([], ["ave"], reasoning=False, seed=0, shuffle=False)
    stream.tasks = [PairTask()]
    first = stream._build(clips[0], [])
    assert first.samples == []  # no other clip seen yet
    second = stream._build(clips[1], [clips[0]])
    assert [c.key for c in second.clips] == [clips[1].key, clips[0].key]
    assert second.samples[0].media == (MediaRef("<video>", 0), MediaRef("<audio>", 1))
    batch = collate([ClipGroup([clips[0]], []), second])
    assert batch.clip_keys == [clips[0].key, clips[1].key]  # clips[0] encoded once
    assert batch.media[0] == (MediaRef("<video>", 1), MediaRef("<audio>", 0))
    module = tiny_module()
    batch.targets = ["<answer> no </answer>"]
    batch = module.on_before_batch_transfer(batch, 0)
    assert torch.isfinite(module.model(batch).loss_sum).all()
