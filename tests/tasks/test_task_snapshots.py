"""Snapshots: the exact prompt and target for the fixed fixture scene (conftest.basic_scene) and
rng seed, for every task, reasoning on and off. A change here changes the training data: update
the strings only on purpose."""

import random

import pytest

from avmt.tasks import get_task, list_tasks

# (task, seed, reasoning) -> (prompt, target)
SNAPSHOTS = {
    ('action', 0, True): (
        '<video> <audio> Describe the motion of the object that makes the sound it is seen with.',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. It moves toward '
            'the right. So the action is <answer> moving right </answer>.'
        ),
    ),
    ('action', 0, False): (
        '<video> <audio> Describe the motion of the object that makes the sound it is seen with.',
        '<answer> moving right </answer>',
    ),
    ('avcap', 0, True): (
        (
            '<video> <audio> Give a short description of the objects in this clip, when they are seen'
            ' and heard, and the mood.'
        ),
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. The violin that is seen and heard'
            ' is moving right. The mood is happy.'
        ),
    ),
    ('avcap', 0, False): (
        (
            '<video> <audio> Give a short description of the objects in this clip, when they are seen'
            ' and heard, and the mood.'
        ),
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. The violin that is seen and heard'
            ' is moving right. The mood is happy.'
        ),
    ),
    ('ave', 0, True): (
        (
            '<video> <audio> Localize the event that can be both seen and heard. Answer with its '
            'class and its time range.'
        ),
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the audible and visible event '
            'is <event> violin </event>, and the time range is <range> 2,7 </range>.'
        ),
    ),
    ('ave', 0, False): (
        (
            '<video> <audio> Localize the event that can be both seen and heard. Answer with its '
            'class and its time range.'
        ),
        '<event> violin </event> <range> 2,7 </range>',
    ),
    ('avqa', 0, True): (
        '<video> <audio> How many times does the cat appear?',
        (
            'A blue cat on the right is seen from second 4 to second 9 but not heard. So the answer '
            'is <answer> one </answer>.'
        ),
    ),
    ('avqa', 0, False): (
        '<video> <audio> How many times does the cat appear?',
        '<answer> one </answer>',
    ),
    ('avqa', 1, True): (
        '<video> <audio> Does the object that is seen and heard sound louder than the dog?',
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. The violin is louder'
            ' than the dog. So the answer is <answer> yes </answer>.'
        ),
    ),
    ('avqa', 1, False): (
        '<video> <audio> Does the object that is seen and heard sound louder than the dog?',
        '<answer> yes </answer>',
    ),
    ('avqa', 2, True): (
        '<video> <audio> Which object is seen first?',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the answer is <answer> violin '
            '</answer>.'
        ),
    ),
    ('avqa', 2, False): (
        '<video> <audio> Which object is seen first?',
        '<answer> violin </answer>',
    ),
    ('avqa', 5, True): (
        '<video> <audio> How many objects are seen but never heard?',
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the answer is <answer> one '
            '</answer>.'
        ),
    ),
    ('avqa', 5, False): (
        '<video> <audio> How many objects are seen but never heard?',
        '<answer> one </answer>',
    ),
    ('avqa', 7, True): (
        '<video> <audio> On which side of the frame is the cat?',
        (
            'A blue cat on the right is seen from second 4 to second 9 but not heard. So the answer '
            'is <answer> right </answer>.'
        ),
    ),
    ('avqa', 7, False): (
        '<video> <audio> On which side of the frame is the cat?',
        '<answer> right </answer>',
    ),
    ('avqa', 9, True): (
        '<video> <audio> Does a dog appear in the video?',
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the answer is <answer> no '
            '</answer>.'
        ),
    ),
    ('avqa', 9, False): (
        '<video> <audio> Does a dog appear in the video?',
        '<answer> no </answer>',
    ),
    ('avqa', 10, True): (
        '<video> <audio> Where is the sounding object that is also visible?',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. So the answer is '
            '<answer> left </answer>.'
        ),
    ),
    ('avqa', 10, False): (
        '<video> <audio> Where is the sounding object that is also visible?',
        '<answer> left </answer>',
    ),
    ('avvp', 0, True): (
        (
            '<video> <audio> What can be heard and what can be seen in this clip? Give the class and '
            'the time ranges of each audio event and each visual event.'
        ),
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the audio events are '
            '<audio_event> dog,(0 3) (8 10) violin,(2 7) </audio_event> and the visual events are '
            '<visual_event> violin,(2 7) cat,(4 9) </visual_event>.'
        ),
    ),
    ('avvp', 0, False): (
        (
            '<video> <audio> What can be heard and what can be seen in this clip? Give the class and '
            'the time ranges of each audio event and each visual event.'
        ),
        (
            '<audio_event> dog,(0 3) (8 10) violin,(2 7) </audio_event> <visual_event> violin,(2 7) '
            'cat,(4 9) </visual_event>'
        ),
    ),
    ('emotion', 0, True): (
        '<video> <audio> What feeling do the sights and sounds of this clip express?',
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the mood of the clip is '
            '<answer> happy </answer>.'
        ),
    ),
    ('emotion', 0, False): (
        '<video> <audio> What feeling do the sights and sounds of this clip express?',
        '<answer> happy </answer>',
    ),
}


def test_every_task_is_pinned():
    assert {name for name, _, _ in SNAPSHOTS} == set(list_tasks())


def _id(key):
    return f"{key[0]}-seed{key[1]}-{'reasoning' if key[2] else 'bare'}"


@pytest.mark.parametrize("key", sorted(SNAPSHOTS, key=repr), ids=_id)
def test_snapshot(key, clip):
    name, seed, reasoning = key
    sample = get_task(name, reasoning=reasoning).build(clip, random.Random(seed))
    assert (sample.prompt, sample.target) == SNAPSHOTS[key]
