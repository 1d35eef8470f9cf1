"""The task registry: names, ids, errors, kwargs, the word list."""

import pytest

import avmt.tasks as tasks
from avmt.data import vocab
from avmt.tasks import TASKS, Task, all_words, get_task, list_tasks, num_task_ids, register_task

V1 = ["action", "avcap", "ave", "avqa", "avvp", "emotion"]
SPATIAL = ["arig", "avss", "ms3", "ref_avs", "s4", "ssu"]
LOCALIZATION = ["unav"]
MATCHING = ["a2v", "v2a"]
WEAK = ["avvp_weak"]  # trained on weak, video-level labels (LLP)
INSTRUCT = ["instruct"]  # free-form instructions (Crab's AV-UIE)


def test_list_tasks():
    assert list_tasks() == sorted(V1 + SPATIAL + LOCALIZATION + MATCHING + WEAK + INSTRUCT)
    assert set(TASKS) == set(V1 + SPATIAL + LOCALIZATION + MATCHING + WEAK + INSTRUCT)
    assert all(issubclass(cls, Task) and cls.name == name for name, cls in TASKS.items())


def test_get_task_kwargs():
    task = get_task("avqa", reasoning=False, num_classes=4)
    assert task.name == "avqa" and task.reasoning is False and task.num_classes == 4
    assert get_task("ave").reasoning is True
    assert get_task("emotion").inputs == ("<video>", "<audio>")
    assert get_task("arig").inputs == ("<image>", "<audio>")


def test_unknown_task_lists_available():
    with pytest.raises(ValueError) as err:
        get_task("avqa2")
    msg = str(err.value)
    assert "'avqa2'" in msg and all(name in msg for name in V1 + SPATIAL + LOCALIZATION + MATCHING + WEAK)


def test_bad_kwargs():
    with pytest.raises(TypeError):
        get_task("ave", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        get_task("avqa", num_classes=0)


def test_register_task_errors():
    with pytest.raises(ValueError, match="no task name"):
        register_task(type("Nameless", (Task,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Impostor", (Task,), {"name": "ave"}))
    assert TASKS["ave"].__name__ == "AVETask"


def test_register_new_task_then_remove():
    cls = type("Probe", (Task,), {"name": "probe_task", "task_id": num_task_ids()})
    try:
        assert register_task(cls) is cls
        assert "probe_task" in list_tasks() and isinstance(get_task("probe_task"), cls)
        assert register_task(cls) is cls  # re-registering the same class is fine
    finally:
        TASKS.pop("probe_task", None)


def test_all_words():
    words = all_words()
    assert words == sorted(set(words))
    expected = set().union(*(get_task(n).words() for n in list_tasks()))
    assert set(words) == expected
    groups = (vocab.CLASSES, vocab.COLORS, vocab.POSITIONS, vocab.MOTIONS, vocab.MOODS, vocab.NUMBER_WORDS)
    for group in groups:
        for entry in group:
            assert set(entry.split()) <= set(words), entry
    assert {"<video>", "<audio>", "<answer>", "</answer>", "<event>", "</event>", "<range>", "</range>",
            "<audio_event>", "</audio_event>", "<visual_event>", "</visual_event>"} <= set(words)
    assert {"<image>", "<seg>", "<box>", "</box>", "<class>", "</class>", "<desc>", "</desc>"} <= set(words)
    assert not any(ch.isdigit() for w in words for ch in w)
    assert tasks.__all__
