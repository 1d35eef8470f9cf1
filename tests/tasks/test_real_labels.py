"""Every task parser round-trips the real datasets' class names, and the metrics score them.

For every class of every real label set (AVE, LLP/AVVP, AVSBench-semantic, MUSIC-AVQA) the
target text is built with the task's own formatting helper; ``parse(target)`` must give back the
structured answer with the exact class string, the task's metrics must score that prediction as
perfect, and a prediction that differs only in case / whitespace must score as correct too.
"""

from __future__ import annotations

import pytest
import torch

from avmt.data.labels import (
    AVE_CLASSES,
    AVSBENCH_SEMANTIC_BACKGROUND,
    AVSBENCH_SEMANTIC_CLASSES,
    AVSBENCH_SEMANTIC_LABELS,
    LLP_CLASSES,
    MUSIC_AVQA_ANSWERS,
    MUSIC_AVQA_INSTRUMENTS,
)
from avmt.data.vocab import CLASSES
from avmt.tasks import get_task
from avmt.tasks.ave import event_tags
from avmt.tasks.avss import CLASS_IDS, class_tags
from avmt.tasks.avvp import events_text, parse_events
from avmt.tasks.label import LabelTask
from avmt.tasks.localization_metrics import TemporalDetectionMAP
from avmt.tasks.metrics import LabelAccuracy
from avmt.tasks.text import clean_text, label_key, wrap_tag
from avmt.tasks.unav import events_tags

LABEL_SETS = {
    "ave": AVE_CLASSES,
    "llp": LLP_CLASSES,
    "avsbench_semantic": AVSBENCH_SEMANTIC_LABELS,
    "music_avqa_instruments": MUSIC_AVQA_INSTRUMENTS,
    "music_avqa_answers": MUSIC_AVQA_ANSWERS,
}
ALL_CLASSES = sorted({c for labels in LABEL_SETS.values() for c in labels})
T = 10  # segments per clip


def variant(cls: str) -> str:
    """``cls`` with its case swapped and extra whitespace around and inside (same label_key)."""
    out = "  " + cls.swapcase().replace(" ", " \n  ") + " \t"
    for ch in "(,":  # spaces after punctuation too: "Frying_( FOOD)", "RACE CAR,  AUTO RACING"
        out = out.replace(ch, ch + "  ")
    assert label_key(out) == label_key(cls) and out != cls
    return out


def clip_range(i: int) -> list[int]:
    return [i % 5, i % 5 + 1 + i % 4]


def metric_values(collection, preds, targets) -> dict[str, float]:
    collection.update(preds, targets)
    out = {}
    for key, value in collection.compute().items():
        if isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()})
        else:
            out[key] = float(value)
    return out


def assert_perfect(values: dict[str, float]) -> None:
    for key, value in values.items():
        want = 0.0 if key == "parse_failure_rate" else 1.0
        assert value == pytest.approx(want), (key, value)


# ---- the label lists ------------------------------------------------------------------------------


def test_label_lists():
    assert len(AVE_CLASSES) == 28
    assert len(LLP_CLASSES) == 25
    assert len(AVSBENCH_SEMANTIC_CLASSES) == 70 and len(AVSBENCH_SEMANTIC_LABELS) == 71
    assert AVSBENCH_SEMANTIC_LABELS[0] == AVSBENCH_SEMANTIC_BACKGROUND == "background"
    assert len(MUSIC_AVQA_INSTRUMENTS) == 22 and len(MUSIC_AVQA_ANSWERS) == 42
    assert set(MUSIC_AVQA_INSTRUMENTS) < set(MUSIC_AVQA_ANSWERS)
    # the hard cases this file is about are really there
    assert {"Church bell", "Male speech, man speaking", "Frying (food)"} <= set(AVE_CLASSES)
    assert {"Frying_(food)", "Vacuum_cleaner", "Baby_cry_infant_cry"} <= set(LLP_CLASSES)
    for labels in LABEL_SETS.values():
        assert len(set(labels)) == len(labels)
        # no two labels of a set share a comparison key (the metrics would merge them)
        assert len({label_key(c) for c in labels}) == len(labels)
        assert all(c == clean_text(c) for c in labels)


def test_label_key():
    assert label_key("Church bell") == label_key("  church \n BELL ") == label_key("CHURCH  BELL")
    assert label_key("Frying_(food)") == label_key("frying_( FOOD )")
    assert label_key("Frying_(food)") != label_key("Frying (food)")  # punctuation matters
    assert clean_text("  Male speech,\n man   speaking ") == "Male speech, man speaking"


# ---- AVE: <event> {class} </event> <range> s,e </range> ------------------------------------------


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_ave_round_trip(labels):
    task = get_task("ave")
    answers = [{"class": c, "range": clip_range(i), "num_segments": T} for i, c in enumerate(labels)]
    preds, loose = [], []
    for a in answers:
        text = f"So the audible and visible event is {event_tags(a['class'], a['range'])}."
        pred = task.parse(text)
        assert pred == task.answer_to_pred(a), (text, pred)
        preds.append(pred)
        messy = task.parse(event_tags(variant(a["class"]), a["range"]).upper())
        assert messy == {"class": clean_text(variant(a["class"])).upper(), "range": a["range"]}
        loose.append(messy)
    assert_perfect(metric_values(task.metrics(), preds, answers))
    assert_perfect(metric_values(task.metrics(), loose, answers))


def test_ave_wrong_class_is_wrong():
    task = get_task("ave")
    target = {"class": "Male speech, man speaking", "range": [0, 10], "num_segments": T}
    values = metric_values(task.metrics(), [{"class": "Female speech, woman speaking", "range": [0, 10]}], [target])
    assert values["segment_accuracy"] == 0.0 and values["class_accuracy"] == 0.0
    # "background" in any case labels nothing
    values = metric_values(task.metrics(), [{"class": "BackGround", "range": [0, 10]}],
                           [{"class": "Bark", "range": [0, 0], "num_segments": T}])
    assert values["segment_accuracy"] == 1.0


# ---- AVVP: class,(s e) (s e) items -----------------------------------------------------------------


def _avvp_text(audio: dict, visual: dict) -> str:
    return f"<audio_event> {events_text(audio)} </audio_event> <visual_event> {events_text(visual)} </visual_event>"


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_avvp_round_trip_every_class(labels):
    task = get_task("avvp")
    answers, preds, loose = [], [], []
    for i, c in enumerate(labels):
        other = labels[(i + 1) % len(labels)]
        audio = {c: [[0, 2], [5, 7]], other: [[3, 4]]}
        visual = {c: [clip_range(i)]}
        answer = {"audio": audio, "visual": visual, "num_segments": T}
        pred = task.parse(f"So the audio events are {_avvp_text(audio, visual)}.")
        assert pred == task.answer_to_pred(answer), (c, pred)
        # the class name is given back exactly, not just an equal key
        assert list(pred["audio"]) == list(audio) and list(pred["visual"]) == [c]
        answers.append(answer)
        preds.append(pred)
        messy_audio = {variant(k): v for k, v in audio.items()}
        messy = task.parse(_avvp_text(messy_audio, {variant(c): visual[c]}))
        assert messy is not None and list(messy["audio"]) == [clean_text(k) for k in messy_audio], messy
        loose.append(messy)
    assert_perfect(metric_values(task.metrics(), preds, answers))
    assert_perfect(metric_values(task.metrics(), loose, answers))


@pytest.mark.parametrize("labels", [AVE_CLASSES, LLP_CLASSES], ids=["ave", "llp"])
def test_avvp_whole_label_set_in_one_answer(labels):
    task = get_task("avvp")
    audio = {c: [[i % T, i % T + 1]] for i, c in enumerate(labels)}
    visual = {c: [[0, 1], [3, T]] for c in reversed(labels)}
    answer = {"audio": audio, "visual": visual, "num_segments": T}
    pred = task.parse(_avvp_text(audio, visual))
    assert pred == task.answer_to_pred(answer)
    assert list(pred["audio"]) == list(labels)
    assert_perfect(metric_values(task.metrics(), [pred], [answer]))


def test_avvp_grammar():
    # the example
    assert parse_events("Frying_(food),(0 3)") == {"Frying_(food)": [[0, 3]]}
    # a class runs up to the last "," before its first "(digits": commas and parentheses inside it are kept
    assert parse_events("Male speech, man speaking,(0 3) Race car, auto racing,(2 4),(6 8), Frying (food), (1 2)") == {
        "Male speech, man speaking": [[0, 3]], "Race car, auto racing": [[2, 4], [6, 8]], "Frying (food)": [[1, 2]]}
    # tolerant separators between items, whitespace collapsed, case kept
    assert parse_events(" Church \n bell ,( 0 - 2 ) ; Vacuum_cleaner,(3,5)\n") == {
        "Church bell": [[0, 2]], "Vacuum_cleaner": [[3, 5]]}
    # same class twice: merged
    assert parse_events("Dog,(0 2) Dog,(1 3)") == {"Dog": [[0, 3]]}
    assert parse_events("") == {} and parse_events("  ,; ") == {}
    # not items
    assert parse_events("Dog (0 2)") is None  # no comma before the range
    assert parse_events("Dog,(0 2) barking") is None  # text after the last ranges
    assert parse_events(",(0 2)") is None  # empty class
    assert parse_events("Dog (1 2) Cat,(0 2)") is None  # a class holding a range
    assert parse_events("<seg> Dog,(0 2)") is None
    assert parse_events("Frying_(food)") is None and parse_events(None) is None


def test_avvp_classes_differing_in_case_are_one_class_for_the_metric():
    task = get_task("avvp")
    target = {"audio": {"Frying_(food)": [[0, 4]]}, "visual": {}, "num_segments": T}
    pred = task.parse("<audio_event> frying_(food),(0 2) FRYING_(FOOD),(2 4) </audio_event> <visual_event> </visual_event>")
    assert pred == {"audio": {"frying_(food)": [[0, 2]], "FRYING_(FOOD)": [[2, 4]]}, "visual": {}}
    assert_perfect(metric_values(task.metrics(), [pred], [target]))


# ---- UNAV: <event> {class} </event> <range> s,e </range> per event -------------------------------


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_unav_round_trip(labels):
    task = get_task("unav")
    answers, preds, loose = [], [], []
    for i, c in enumerate(labels):
        other = labels[(i + 3) % len(labels)]
        events = [{"class": c, "range": [0, 3]}, {"class": other, "range": [2, 6]}, {"class": c, "range": [7, 10]}]
        answer = {"events": events, "num_segments": T}
        pred = task.parse(f"So the audible and visible events are {events_tags(events)}.")
        assert pred == task.answer_to_pred(answer)
        answers.append(answer)
        preds.append(pred)
        messy = task.parse(events_tags([{**ev, "class": variant(ev["class"])} for ev in events]))
        assert [ev["class"] for ev in messy] == [clean_text(variant(ev["class"])) for ev in events]
        loose.append(messy)
    for p in (preds, loose):
        # the task's metric type (temporal detection mAP), over the real label set
        metric = TemporalDetectionMAP(classes=labels)
        metric.update(p, answers)
        assert float(metric.compute()) == pytest.approx(1.0)


# ---- recognition answers: <answer> {label} </answer> -------------------------------------------------


def _label_task(labels):
    class RealLabelTask(LabelTask):
        name = "real_labels"

    RealLabelTask.labels = tuple(labels)
    return RealLabelTask()


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_answer_round_trip(labels):
    task = _label_task(labels)
    preds = []
    for c in labels:
        assert task.parse(f"So the answer is {wrap_tag('answer', c)}.") == c
        preds.append(task.parse(wrap_tag("answer", c)))
    assert_perfect(metric_values(task.metrics(), preds, list(labels)))
    loose = [task.parse(wrap_tag("answer", variant(c))) for c in labels]
    assert loose == [clean_text(variant(c)) for c in labels]
    assert_perfect(metric_values(task.metrics(), loose, list(labels)))
    # a wrong label is still wrong
    wrong = [labels[(i + 1) % len(labels)] for i in range(len(labels))]
    assert metric_values(task.metrics(), wrong, list(labels))["accuracy"] == 0.0


def test_avqa_answers_round_trip():
    task = get_task("avqa")
    answers = [{"answer": a, "type": "audio_counting"} for a in MUSIC_AVQA_ANSWERS]
    preds = [task.parse(f"So the answer is {wrap_tag('answer', a['answer'])}.") for a in answers]
    assert preds == [task.answer_to_pred(a) for a in answers]
    loose = [task.parse(wrap_tag("answer", variant(a["answer"]))) for a in answers]
    for p in (preds, loose):
        metric = LabelAccuracy(MUSIC_AVQA_ANSWERS, target_key="answer")
        metric.update(p, answers)
        assert float(metric.compute()) == 1.0
        # the task's own metrics take every MUSIC-AVQA answer (its label set holds all 42)
        values = metric_values(task.metrics(), p, answers)
        assert values["accuracy"] == 1.0 and values["accuracy/audio"] == 1.0
    # the task's own metrics: unchanged behaviour for AVSynth answers whatever the case
    values = metric_values(task.metrics(), ["VIOLIN", " Yes "], [{"answer": "violin", "type": "audio_counting"},
                                                                 {"answer": "yes", "type": "audio_existential"}])
    assert values["accuracy"] == 1.0


# ---- AVSS: <class> {name} </class> <seg> ------------------------------------------------------------


@pytest.mark.parametrize("labels", LABEL_SETS.values(), ids=LABEL_SETS.keys())
def test_avss_class_names_round_trip(labels):
    task = get_task("avss")
    for i, c in enumerate(labels):
        classes = [c, labels[(i + 1) % len(labels)]]
        assert task.parse(f"So the sounding classes are {class_tags(classes)}") == classes
        assert task.parse(class_tags([variant(n) for n in classes])) == [clean_text(variant(n)) for n in classes]
    assert task.parse(class_tags(list(labels))) == list(labels)


def test_avss_predict_maps_names_case_insensitively():
    task = get_task("avss")
    logits = torch.full((len(CLASSES), 1, 1, len(CLASSES)), -1.0)
    for k in range(len(CLASSES)):
        logits[k, 0, 0, k] = 1.0  # mask k is on at pixel k only
    for names in (list(CLASSES), [variant(c) for c in CLASSES]):
        pred = task.predict(class_tags(names), {"mask_logits": logits})
        assert pred["class_map"].tolist() == [[[CLASS_IDS[c] for c in CLASSES]]]
        target = pred["class_map"].clone()
        values = metric_values(task.metrics(), [pred], [{"class_map": target, "classes": list(CLASSES)}])
        assert values["miou"] == pytest.approx(1.0) and values["parse_failure_rate"] == 0.0
