"""Answer formats (avmt/tasks/formats.py): the default TaggedText writes today's answers; AV-Unified's
DiscreteTokens writes times, boxes and masks as tokens and reads them back; a mask code is scored
by the same J / F code as the head's masks; the module takes the data module's format, checks its
tokens and keeps it in checkpoints. Also the two AV-Unified connectors' own behaviour."""

from __future__ import annotations

import random
import re

import pytest
import torch

from avmt.data.shards import clip_from_index
from avmt.data.synth import SynthConfig
from avmt.errors import UserError
from avmt.llm import DEFAULT_SPECIAL_TOKENS
from avmt.tasks import get_task
from avmt.tasks.avvp import events_text, parse_events
from avmt.tasks.formats import DiscreteTokens, TaggedText, cells_mask, mask_cells
from avmt.tasks.spatial_metrics import MaskF, MaskJ

CHANGED = ("ave", "unav", "avvp", "arig", "s4", "ms3", "avqa")


@pytest.fixture(scope="module")
def clips():
    """Real AVSynth clips (64 px, 10 segments): single-source ones, then multi-source ones."""
    return ([clip_from_index(i, "val", 0) for i in range(8)]
            + [clip_from_index(i, "val", 0, SynthConfig(multi_source=1.0)) for i in range(4)])


def built(name, clips, **kwargs):
    task = get_task(name, reasoning=False, **kwargs)
    return task, [task.build(c, random.Random(i)) for i, c in enumerate(clips) if task.applies(c)]


# ---- TaggedText: today's answers, byte for byte ---------------------------------------------


def test_tagged_text_writes_todays_pieces():
    fmt = TaggedText()
    assert fmt.range(2, 7) == "2,7" and fmt.time(7) == "7"
    assert fmt.box([310, 520, 590, 880]) == "310,520,590,880"
    assert fmt.mask(torch.zeros(10, 8, 8, dtype=torch.bool)) == "<seg>"
    assert events_text({"violin": [[2, 7], [8, 10]], "dog": [[0, 3]]}) == "violin,(2 7) (8 10) dog,(0 3)"
    assert fmt.tokens() == [] and fmt.dense_masks


@pytest.mark.parametrize("name", CHANGED)
def test_the_default_format_gives_the_same_targets_as_no_format(name, clips):
    # (tests/tasks/test_task_snapshots.py pins the default targets of every task to literal strings)
    _, default = built(name, clips)
    _, tagged = built(name, clips, answer_format=TaggedText())
    assert default and [(s.prompt, s.target) for s in default] == [(s.prompt, s.target) for s in tagged]
    task = get_task(name)
    if name in ("s4", "ms3"):
        assert all(s.target == "<seg>" for s in default) and task.outputs == ("mask_logits",)
    elif name == "arig":
        assert all(s.target.startswith("<box> ") and "," in s.target for s in default)


# ---- DiscreteTokens: round trips ------------------------------------------------------------


def test_discrete_ranges_and_times_round_trip():
    fmt = DiscreteTokens(num_segments=10)
    for s in range(11):
        for e in range(s, 11):
            assert fmt.range(s, e) == f"<t_{s}><t_{e}>"
            assert fmt.parse_range(fmt.range(s, e)) == [s, e]
    assert fmt.parse_range(" <t_2> <t_7> ") == [2, 7]
    for bad in ("<t_7><t_2>", "<t_2><t_11>", "2,7", "<t_2>", "<t_2><t_3><t_4>", None):
        assert fmt.parse_range(bad) is None
    with pytest.raises(UserError, match="num_segments"):
        fmt.time(11)
    events = {"violin": [[2, 7], [8, 10]], "Male speech, man speaking": [[0, 3]]}
    assert events_text(events, fmt) == "violin,(<t_2> <t_7>) (<t_8> <t_10>) Male speech, man speaking,(<t_0> <t_3>)"
    assert parse_events(events_text(events, fmt), fmt) == events
    assert parse_events("violin,(2 7)", fmt) is None  # digits are not this format's times


def test_discrete_boxes_round_trip_to_the_bin_grid():
    fmt = DiscreteTokens(box_bins=32)
    assert fmt.box([0, 500, 1000, 333]) == "<bin_0><bin_16><bin_31><bin_10>"
    assert fmt.parse_box("<bin_0><bin_16><bin_31><bin_10>") == [0, 516, 1000, 323]
    rng = random.Random(0)
    for _ in range(200):
        box = [rng.randint(0, 1000) for _ in range(4)]
        back = fmt.parse_box(fmt.box(box))
        assert all(abs(a - b) <= 500 / 31 + 1 for a, b in zip(box, back))
        assert fmt.parse_box(fmt.box(back)) == back  # the bin values are fixed points
    for bad in ("<bin_0><bin_1><bin_2>", "<bin_0><bin_1><bin_2><bin_32>", "1,2,3,4", None):
        assert fmt.parse_box(bad) is None


def test_the_mask_code_decodes_to_the_coded_cells():
    fmt = DiscreteTokens(num_segments=6, frame_size=12, mask_grid=4, cell_threshold=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = torch.rand(6, 12, 12, generator=gen) > 0.6
        mask[2] = mask[1]  # a run of equal frames: one group
        mask[4] = False  # an empty frame: no group
        decoded = fmt.parse_mask(fmt.mask(mask))
        expected = cells_mask(mask_cells(mask, 4, 0.5), 12, 12, 4)
        assert decoded.dtype == torch.float32 and torch.equal(decoded.bool(), expected)
        assert fmt.parse_mask(fmt.mask(decoded.bool())).equal(decoded)  # the code is a fixed point


def test_a_mask_code_by_hand_and_its_j_and_f():
    fmt = DiscreteTokens(num_segments=2, frame_size=4, mask_grid=2, cell_threshold=0.5)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # cell 0 full
    mask[0, 0, 3] = True  # a quarter of cell 1: below the threshold
    code = fmt.mask(mask)
    assert code == "<mask> <t_0><t_1><cell_0> </mask>"
    prediction = {"mask": fmt.parse_mask(f"So the mask is {code}")}
    assert prediction["mask"][0].sum() == 4 and prediction["mask"][1].sum() == 0
    answer = {"mask": mask, "annotated_frames": torch.ones(2, dtype=torch.bool)}
    j, f = MaskJ(), MaskF()
    j.update([prediction], [answer])
    f.update([prediction], [answer])
    # frame 0: IoU 4/5; frame 1: empty target and prediction, 16/16 pixels right -> J = (0.8 + 1) / 2
    assert float(j.compute()) == pytest.approx(0.9)
    # F over frame 0 only: at every threshold above 0, precision 1 and recall 4/5 -> 1.3*0.8/(0.3+0.8)
    assert float(f.compute()) == pytest.approx(1.3 * 0.8 / 1.1)
    # an unannotated frame costs no tokens: it joins the run of the frame before it
    unknown = fmt.mask(mask, torch.tensor([True, False]))
    assert unknown == "<mask> <t_0><t_2><cell_0> </mask>"
    assert fmt.mask(torch.zeros(2, 4, 4, dtype=torch.bool)) == "<mask> </mask>"
    assert fmt.parse_mask("<mask> </mask>").sum() == 0


@pytest.mark.parametrize("text", [
    "no code", "<mask> <cell_0> </mask>", "<mask> <t_1><t_1><cell_0> </mask>", "<mask> <t_0><t_3><cell_0> </mask>",
    "<mask> <t_0><t_1><cell_4> </mask>", "<mask> <t_0><t_1> cell </mask>", "<mask> <t_0> </mask>", None,
])
def test_malformed_mask_codes_are_parse_failures(text):
    assert DiscreteTokens(num_segments=2, frame_size=4, mask_grid=2).parse_mask(text) is None


def test_a_format_that_does_not_fit_the_data_is_a_user_error():
    fmt = DiscreteTokens(num_segments=10, frame_size=64)
    with pytest.raises(UserError, match="num_segments"):
        fmt.mask(torch.zeros(8, 64, 64, dtype=torch.bool))
    with pytest.raises(UserError, match="frame_size"):
        fmt.check_data(10, 32)
    fmt.check_data(10, None)
    with pytest.raises(UserError, match="mask_grid"):
        DiscreteTokens(frame_size=4, mask_grid=8)


@pytest.mark.parametrize("name", CHANGED)
def test_discrete_targets_parse_back_to_the_answers(name, clips):
    fmt = DiscreteTokens(num_segments=10, frame_size=64, mask_grid=8, cell_threshold=0.25)
    task, samples = built(name, clips, answer_format=fmt)
    assert samples
    for sample in samples:
        assert "<seg>" not in sample.target and not re.search(r"\d", re.sub(r"<(t|bin|cell)_\d+>", "", sample.target))
        pred = task.predict(sample.target, {})
        if name in ("s4", "ms3"):
            assert task.outputs == ()  # no head output: the code is the prediction
            coded = cells_mask(mask_cells(sample.answer["mask"], 8, 0.25), 64, 64, 8)
            assert torch.equal(pred["mask"].bool(), coded)
        elif name == "arig":
            assert all(abs(a - b) <= 17 for a, b in zip(pred["box"], sample.answer["box"]))
        else:
            assert pred == task.answer_to_pred(sample.answer) or name == "avqa" and pred == sample.answer["answer"]
    metrics = task.metrics()
    metrics.update([task.predict(s.target, {}) for s in samples], [s.answer for s in samples])
    assert float(metrics.compute()["parse_failure_rate"]) == 0.0


# ---- the data module builds its tasks with its format; the module takes it ------------------


def test_the_data_module_builds_its_tasks_with_its_format():
    from avmt.data.datamodule import AVDataModule, ClipTaskStream

    fmt = DiscreteTokens()
    stream = ClipTaskStream([], ["ave", "s4"], reasoning=False, seed=0, shuffle=False, answer_format=fmt)
    assert [task.format for task in stream.tasks] == [fmt, fmt] and stream.tasks[1].outputs == ()
    assert AVDataModule(tasks=["ave"], answer_format=fmt).answer_format is fmt
    assert AVDataModule(tasks=["ave"]).answer_format == TaggedText()
    with pytest.raises(UserError, match="data.answer_format"):
        AVDataModule(tasks=["ave"], answer_format="discrete")


def tiny_module(special_tokens, **options):
    from avmt.connectors import QFormerConnector
    from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
    from avmt.llm import CausalLM
    from avmt.module import AVModule

    torch.manual_seed(0)
    return AVModule(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, special_tokens=special_tokens),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=1),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        None, num_segments=4, generation_tasks=["ave", "s4"], **options,
    )


def test_the_module_scores_with_the_data_format_and_keeps_it_in_checkpoints():
    fmt = DiscreteTokens(num_segments=4, frame_size=32, box_bins=4, mask_grid=2)
    with pytest.raises(UserError, match="model.llm.init_args.special_tokens"):
        tiny_module(DEFAULT_SPECIAL_TOKENS)._take_answer_format(fmt)
    module = tiny_module([*DEFAULT_SPECIAL_TOKENS, *fmt.tokens()])
    module._take_answer_format(fmt)
    assert module.tasks["ave"].format == fmt and module._task("s4").outputs == ()
    assert module.tasks["ave"].parse("<event> dog </event> <range> <t_1><t_3> </range>") == {"class": "dog", "range": [1, 3]}
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["avmt"]["answer_format"] == fmt.config()
    restored = tiny_module([*DEFAULT_SPECIAL_TOKENS, *fmt.tokens()])
    restored.on_load_checkpoint(checkpoint)
    with pytest.raises(UserError, match="answer format"):
        restored._take_answer_format(TaggedText())
    restored._take_answer_format(DiscreteTokens(num_segments=4, frame_size=32, box_bins=4, mask_grid=2))


def test_time_words_are_the_times_the_data_format_writes():
    fmt = DiscreteTokens(num_segments=4, frame_size=32, box_bins=4, mask_grid=2)
    module = tiny_module([*DEFAULT_SPECIAL_TOKENS, *fmt.tokens()], time_word_rms=1.0)
    tokenizer = module.model.tokenizer
    assert module.model.time_word_ids == [tokenizer(str(s), add_special_tokens=False)["input_ids"] for s in range(4)]
    module._take_answer_format(fmt)
    assert module.model.time_word_ids == [[tokenizer.convert_tokens_to_ids(f"<t_{s}>")] for s in range(4)]


# ---- the AV-Unified connectors --------------------------------------------------------------


def test_multiscale_windows_average_the_segments_around_each_one():
    from avmt.connectors.multiscale_temporal import MultiScaleTemporalConnector, window_means

    x = torch.arange(5.0).view(1, 5, 1, 1)
    assert window_means(x, 1).flatten().tolist() == [0, 1, 2, 3, 4]
    assert window_means(x, 2).flatten().tolist() == [0.5, 1.5, 2.5, 3.5, 3.5]  # [t, t+1], the last shifted in
    assert window_means(x, 4).flatten().tolist() == [1.5, 1.5, 2.5, 2.5, 2.5]  # [t-1, t+3) inside [0, 5)
    assert window_means(x, 8).flatten().tolist() == [2.0] * 5
    torch.manual_seed(0)
    connector = MultiScaleTemporalConnector(windows=[1, 4], num_queries=2, hidden_size=16, num_layers=1,
                                            num_heads=2, intermediate_size=32)
    connector.build(8, 12)
    features = torch.randn(2, 5, 3, 8)
    out = connector(features)
    assert out.shape == (2, 5 * 2 * 2, 12) == (2, connector.num_tokens(5), 12)
    changed = features.clone()
    changed[:, 4] += 1.0  # the last segment changes: its scale-1 tokens and the windows that reach it
    diff = (connector(changed) - out).abs().sum(-1).view(2, 5, 2, 2).amax((0, 3))  # [segment, scale]
    assert diff[:4, 0].max() < 1e-6 and diff[4, 0] > 0  # scale 1 sees its own segment only
    assert diff[:2, 1].max() < 1e-6 and diff[2:, 1].min() > 0  # 4-segment windows: segments 2, 3, 4 reach it


def test_audio_guided_spatial_queries_depend_on_their_segments_sound():
    from avmt.connectors import AudioGuidedSpatialConnector

    torch.manual_seed(0)
    connector = AudioGuidedSpatialConnector(num_queries=2, hidden_size=16, num_layers=1, num_heads=2,
                                            intermediate_size=32)
    connector.build(8, 12, context_dim=6)
    assert connector.context_dim == 6
    features, audio = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 6)
    out = connector(features, audio)
    assert out.shape == (1, 6, 12) and connector(features).shape == (1, 6, 12)
    louder = audio.clone()
    louder[:, 1] += 1.0  # segment 1's sound changes: only segment 1's tokens change
    diff = (connector(features, louder) - out).abs().sum(-1).view(3, 2).amax(1)
    assert diff[1] > 0 and diff[0] < 1e-6 and diff[2] < 1e-6
