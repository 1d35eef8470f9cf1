"""Snapshots: the exact prompt and target for the fixed fixture scenes (conftest.basic_scene, and
conftest.multi_scene for the multi-source scenes) and rng seed, for every task, reasoning on and
off. A change here changes the training data: update the strings only on purpose."""

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
    ('avvp_weak', 0, True): (
        '<video> <audio> Tag this clip with its events: every class that is audible or visible at some time.',
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the events in this clip are '
            '<event> cat </event> <event> dog </event> <event> violin </event>.'
        ),
    ),
    ('avvp_weak', 0, False): (
        '<video> <audio> Tag this clip with its events: every class that is audible or visible at some time.',
        '<event> cat </event> <event> dog </event> <event> violin </event>',
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
    # instruct on AVSynth: a sample of one of its source tasks (here avvp) as the instruction
    ('instruct', 0, True): (
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
    ('instruct', 0, False): (
        (
            '<video> <audio> What can be heard and what can be seen in this clip? Give the class and '
            'the time ranges of each audio event and each visual event.'
        ),
        '<audio_event> dog,(0 3) (8 10) violin,(2 7) </audio_event> <visual_event> violin,(2 7) cat,(4 9) </visual_event>',
    ),
    ('arig', 0, True): (
        '<image> <audio> Draw a box around the object that is heard in this frame.',
        'The sounding object is a red violin on the left. So its box is <box> 50,50,300,450 </box>.',
    ),
    ('arig', 0, False): (
        '<image> <audio> Draw a box around the object that is heard in this frame.',
        '<box> 50,50,300,450 </box>',
    ),
    ('avss', 0, True): (
        '<video> <audio> Segment the sounding objects by class.',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. So the sounding '
            'classes are <class> violin </class> <seg>'
        ),
    ),
    ('avss', 0, False): (
        '<video> <audio> Segment the sounding objects by class.',
        '<class> violin </class> <seg>',
    ),
    ('ref_avs', 0, True): (
        '<video> <audio> Segment the loudest object.',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. So the loudest '
            'object is the red violin on the left, and its mask is <seg>'
        ),
    ),
    ('ref_avs', 0, False): (
        '<video> <audio> Segment the loudest object.',
        '<seg>',
    ),
    ('ref_avs', 1, True): (
        '<video> <audio> Find the sounding flute in the center in every frame and segment it.',
        (
            'Nothing that makes a sound in this clip is the sounding flute in the center. So the mask'
            ' is empty: <seg>'
        ),
    ),
    ('ref_avs', 1, False): (
        '<video> <audio> Find the sounding flute in the center in every frame and segment it.',
        '<seg>',
    ),
    ('s4', 0, True): (
        '<video> <audio> Show where the sound comes from in each frame.',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. So the object that'
            ' makes the sound is the red violin on the left, and its mask is <seg>'
        ),
    ),
    ('s4', 0, False): (
        '<video> <audio> Show where the sound comes from in each frame.',
        '<seg>',
    ),
    ('ssu', 0, True): (
        '<video> <audio> Describe where the sound comes from and segment that region.',
        (
            'A red violin on the left is seen and heard from second 2 to second 7. So the sound comes'
            ' from <seg> <desc> a red violin at the top left, moving right </desc>'
        ),
    ),
    ('ssu', 0, False): (
        '<video> <audio> Describe where the sound comes from and segment that region.',
        '<seg> <desc> a red violin at the top left, moving right </desc>',
    ),
    ('unav', 0, True): (
        (
            '<video> <audio> Localize all the events that are audible and visible. Answer with the '
            'class and the time range of each.'
        ),
        (
            'A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen. A '
            'red violin on the left is seen and heard from second 2 to second 7. A blue cat on the '
            'right is seen from second 4 to second 9 but not heard. So the audible and visible events'
            ' are <event> violin </event> <range> 2,7 </range>.'
        ),
    ),
    ('unav', 0, False): (
        (
            '<video> <audio> Localize all the events that are audible and visible. Answer with the '
            'class and the time range of each.'
        ),
        '<event> violin </event> <range> 2,7 </range>',
    ),
}

# (task, seed, reasoning) -> (prompt, target) on the multi-source scene (conftest.multi_scene)
MULTI_SNAPSHOTS = {
    ('avss', 0, True): (
        '<video> <audio> Segment the sounding objects by class.',
        (
            'A red violin on the left is seen and heard from second 1 to second 6. A green flute on '
            'the right is seen and heard from second 3 to second 9. So the sounding classes are '
            '<class> violin </class> <seg> <class> flute </class> <seg>'
        ),
    ),
    ('avss', 0, False): (
        '<video> <audio> Segment the sounding objects by class.',
        '<class> violin </class> <seg> <class> flute </class> <seg>',
    ),
    ('emotion', 0, True): (
        '<video> <audio> What feeling do the sights and sounds of this clip express?',
        (
            'A blue cat in the center is seen from second 0 to second 10 but not heard. A red violin '
            'on the left is seen and heard from second 1 to second 6. A green flute on the right is '
            'seen and heard from second 3 to second 9. So the mood of the clip is <answer> calm '
            '</answer>.'
        ),
    ),
    ('emotion', 0, False): (
        '<video> <audio> What feeling do the sights and sounds of this clip express?',
        '<answer> calm </answer>',
    ),
    ('ms3', 0, True): (
        '<video> <audio> Show where the sounds come from in each frame.',
        (
            'A red violin on the left is seen and heard from second 1 to second 6. A green flute on '
            'the right is seen and heard from second 3 to second 9. So the objects that make the '
            'sounds are masked by <seg>'
        ),
    ),
    ('ms3', 0, False): (
        '<video> <audio> Show where the sounds come from in each frame.',
        '<seg>',
    ),
    ('ref_avs', 2, True): (
        '<video> <audio> Segment the red violin on the left.',
        (
            'A red violin on the left is seen and heard from second 1 to second 6. So the red violin '
            'on the left is the red violin on the left, and its mask is <seg>'
        ),
    ),
    ('ref_avs', 2, False): (
        '<video> <audio> Segment the red violin on the left.',
        '<seg>',
    ),
    ('unav', 0, True): (
        (
            '<video> <audio> Localize all the events that are audible and visible. Answer with the '
            'class and the time range of each.'
        ),
        (
            'A blue cat in the center is seen from second 0 to second 10 but not heard. A red violin '
            'on the left is seen and heard from second 1 to second 6. A green flute on the right is '
            'seen and heard from second 3 to second 9. So the audible and visible events are <event> '
            'violin </event> <range> 1,6 </range> <event> flute </event> <range> 3,9 </range>.'
        ),
    ),
    ('unav', 0, False): (
        (
            '<video> <audio> Localize all the events that are audible and visible. Answer with the '
            'class and the time range of each.'
        ),
        '<event> violin </event> <range> 1,6 </range> <event> flute </event> <range> 3,9 </range>',
    ),
}

# Multi-clip tasks: the anchor is conftest.basic_scene, the other clips are one-object scenes of the
# classes MATCHING_OTHERS (none in the anchor scene), in this order.
# (task, seed, reasoning) -> (prompt, target, the clip of each media reference)
MATCHING_OTHERS = ("drum", "bell", "cow")
MATCHING_SNAPSHOTS = {
    ('a2v', 0, True): (
        (
            '<audio> Video 1: <video> Video 2: <video> Video 3: <video> Video 4: <video> Which of '
            'these videos matches the sound?'
        ),
        'A violin is heard. Video 2 shows a violin. So the answer is <answer> 2 </answer>.',
        (0, 2, 0, 1, 3),
    ),
    ('a2v', 0, False): (
        (
            '<audio> Video 1: <video> Video 2: <video> Video 3: <video> Video 4: <video> Which of '
            'these videos matches the sound?'
        ),
        '<answer> 2 </answer>',
        (0, 2, 0, 1, 3),
    ),
    ('v2a', 0, True): (
        (
            '<video> Audio 1: <audio> Audio 2: <audio> Audio 3: <audio> Audio 4: <audio> Which of '
            'these audio tracks is the sound of the video?'
        ),
        'A violin is seen. Audio 2 sounds like a violin. So the answer is <answer> 2 </answer>.',
        (0, 2, 0, 1, 3),
    ),
    ('v2a', 0, False): (
        (
            '<video> Audio 1: <audio> Audio 2: <audio> Audio 3: <audio> Audio 4: <audio> Which of '
            'these audio tracks is the sound of the video?'
        ),
        '<answer> 2 </answer>',
        (0, 2, 0, 1, 3),
    ),
}


@pytest.fixture
def matching_others(scene_factory):
    f = scene_factory
    return [f.clip(f.scene([f.object(0, c, visible=[[1, 5]], sounding=[[1, 5]], color="green")],
                           clip_id=f"other-{c}")) for c in MATCHING_OTHERS]


def test_every_task_is_pinned(clip, multi_clip):
    pinned = {name for name, _, _ in SNAPSHOTS} | {name for name, _, _ in MULTI_SNAPSHOTS}
    pinned |= {name for name, _, _ in MATCHING_SNAPSHOTS}
    assert pinned == set(list_tasks())
    # each snapshot is of a clip its task applies to
    assert all(get_task(name).applies(clip) for name, _, _ in SNAPSHOTS)
    assert all(get_task(name).applies(multi_clip) for name, _, _ in MULTI_SNAPSHOTS)
    assert all(get_task(name).applies(clip) for name, _, _ in MATCHING_SNAPSHOTS)


def _id(key):
    return f"{key[0]}-seed{key[1]}-{'reasoning' if key[2] else 'bare'}"


@pytest.mark.parametrize("key", sorted(SNAPSHOTS, key=repr), ids=_id)
def test_snapshot(key, clip):
    name, seed, reasoning = key
    sample = get_task(name, reasoning=reasoning).build(clip, random.Random(seed))
    assert (sample.prompt, sample.target) == SNAPSHOTS[key]


@pytest.mark.parametrize("key", sorted(MULTI_SNAPSHOTS, key=repr), ids=_id)
def test_multi_source_snapshot(key, multi_clip):
    name, seed, reasoning = key
    sample = get_task(name, reasoning=reasoning).build(multi_clip, random.Random(seed))
    assert (sample.prompt, sample.target) == MULTI_SNAPSHOTS[key]


@pytest.mark.parametrize("key", sorted(MATCHING_SNAPSHOTS, key=repr), ids=_id)
def test_matching_snapshot(key, clip, matching_others):
    name, seed, reasoning = key
    sample = get_task(name, reasoning=reasoning).build(clip, random.Random(seed), matching_others)
    assert (sample.prompt, sample.target, tuple(ref.clip for ref in sample.media)) == MATCHING_SNAPSHOTS[key]
