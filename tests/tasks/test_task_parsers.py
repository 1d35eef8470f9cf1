"""Parsers: read only the tags, tolerate whitespace and case, return None on failure, never raise."""

import pytest

from avmt.tasks import get_task, list_tasks
from avmt.tasks.text import extract_tag, tokenize

GARBAGE = [None, "", "   ", 42, b"<answer> yes </answer>", ["<answer> yes </answer>"], "<<<>>>",
           "</answer> yes <answer>", "\x00\xff<answer", "<answer> yes", "yes </answer>"]


def test_extract_tag_basics():
    assert extract_tag("so <answer> Yes </answer>.", "answer") == "yes"
    assert extract_tag("<ANSWER>\n  moving   LEFT \t</Answer>", "answer") == "moving left"
    assert extract_tag("< answer > no < / answer >", "answer") == "no"
    assert extract_tag("<answer> a </answer> then <answer> b </answer>", "answer") == "b"  # the last one
    assert extract_tag("<answer> </answer>", "answer") is None
    assert extract_tag("<event> dog </event>", "answer") is None


def test_tokenize_rule():
    assert tokenize("<audio_event> dog,(0 3) </audio_event> So 12.") == [
        "<audio_event>", "dog", ",", "(", "0", "3", ")", "</audio_event>", "So", "1", "2", "."]


@pytest.mark.parametrize("name", ["avqa", "action", "emotion"])
def test_answer_tag_parsers(name):
    task = get_task(name)
    assert task.parse("It moves. So the answer is <answer> moving left </answer>.") == "moving left"
    assert task.parse("<answer>yes</answer>") == "yes"
    # labels come back as written (case kept, whitespace collapsed); the metrics ignore case
    assert task.parse("  <answer>   Flute \n </answer>  ") == "Flute"
    assert task.parse("<ANSWER> HAPPY </ANSWER>") == "HAPPY"
    assert task.parse("So the answer is flute.") is None  # missing tag
    assert task.parse("<answer> flute") is None  # missing closing tag
    for g in GARBAGE:
        assert task.parse(g) is None


def test_ave_parser():
    task = get_task("ave")
    want = {"class": "violin", "range": [2, 7]}
    text = "So the event is <event> violin </event>, and the range is <range> 2,7 </range>."
    assert task.parse(text) == want
    assert task.parse("<event>violin</event><range>2,7</range>") == want
    assert task.parse("<EVENT>  Violin </EVENT>\n<RANGE> 2 , 7 </RANGE>") == {**want, "class": "Violin"}  # case kept
    assert task.parse("<event> violin </event> <range> 2 7 </range>") == want
    assert task.parse("<event> violin </event>") is None  # missing range
    assert task.parse("<range> 2,7 </range>") is None  # missing event
    assert task.parse("<event> violin </event> <range> 7,2 </range>") is None  # end before start
    assert task.parse("<event> violin </event> <range> two,seven </range>") is None
    assert task.parse("<event> violin </event> <range> 2,7,9 </range>") is None
    for g in GARBAGE:
        assert task.parse(g) is None


def test_avvp_parser():
    task = get_task("avvp")
    text = ("A dog is heard. So the audio events are <audio_event> dog,(0 3) (8 10) violin,(2 7) "
            "</audio_event> and the visual events are <visual_event> violin,(2 7) cat,(4 9) </visual_event>.")
    want = {"audio": {"dog": [[0, 3], [8, 10]], "violin": [[2, 7]]},
            "visual": {"violin": [[2, 7]], "cat": [[4, 9]]}}
    assert task.parse(text) == want
    loose = ("<AUDIO_EVENT>Dog , (0 3),(8  10)  VIOLIN,( 2 7 )</AUDIO_EVENT>"
             "<visual_event>\nviolin,(2,7)  cat,(4 9)\n</visual_event>")
    assert task.parse(loose) == {"audio": {"Dog": [[0, 3], [8, 10]], "VIOLIN": [[2, 7]]},  # case kept
                                 "visual": want["visual"]}
    # repeated class entries are merged; overlapping ranges too
    assert task.parse("<audio_event> dog,(0 2) dog,(1 3) </audio_event> <visual_event> </visual_event>") == {
        "audio": {"dog": [[0, 3]]}, "visual": {}}
    # empty tag pairs are a valid "no events"
    empty = task.parse("<audio_event> </audio_event> <visual_event></visual_event>")
    assert empty == {"audio": {}, "visual": {}}
    assert task.parse("<audio_event> dog,(0 3) </audio_event>") is None  # missing visual tag
    assert task.parse("<visual_event> dog,(0 3) </visual_event>") is None  # missing audio tag
    assert task.parse("<audio_event> a dog barks </audio_event> <visual_event> </visual_event>") is None
    assert task.parse("<audio_event> dog,(0 3) and more </audio_event> <visual_event></visual_event>") is None
    for g in GARBAGE:
        assert task.parse(g) is None


def test_avcap_parser():
    task = get_task("avcap")
    assert task.parse("  A red violin   is\nheard. ") == "A red violin is heard."
    assert task.parse("") is None
    assert task.parse(" \n ") is None
    assert task.parse(None) is None
    assert task.parse(7) is None


@pytest.mark.parametrize("name", list_tasks())
def test_parse_never_raises(name):
    task = get_task(name)
    weird = ["<" * 1000, "<answer>" * 50, "(" * 500 + ")", "<audio_event>,,,((((</audio_event>",
             "<range> 99999999999999999999,1 </range>", {"a": 1}, object(), float("nan"),
             "<box> 99999999999999999999,1,2,3 </box>", "<class>" * 50 + "</class>", "<desc><seg></desc>"]
    for w in weird:
        task.parse(w)  # must not raise
        task.predict(w, {})  # nor the prediction from text alone (no model outputs)
