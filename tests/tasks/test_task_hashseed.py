"""Builds do not depend on Python's string-hash seed (no iteration over sets of strings)."""

import os
import subprocess
import sys
from pathlib import Path

DIGEST = r"""
import hashlib, random
import torch
from avmt.tasks import get_task, list_tasks

def canon(value):
    # tensors by value (their repr elides); dicts keep their insertion order, which must not vary
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.flatten().tolist())
    if isinstance(value, dict):
        return [(k, canon(v)) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    return value

def digest(make_clip, random_scene, random_multi_scene):
    rng = random.Random(7)
    clips = [make_clip(random_scene(rng, num_classes=8)) for _ in range(60)]
    clips += [make_clip(random_multi_scene(rng, num_classes=8)) for _ in range(20)]
    h = hashlib.sha256()
    for name in list_tasks():
        task = get_task(name)
        for i, clip in enumerate(clips):
            if not task.applies(clip):
                continue
            rng = random.Random(i)
            others = task.select_others(clip, clips[max(0, i - 16):i][::-1], rng)  # multi-clip tasks
            if others is None:
                continue
            s = task.build(clip, rng, others)
            h.update(repr((s.prompt, s.target, canon(s.answer), s.media, canon(s.dense))).encode())
    return h.hexdigest()
"""

CHILD = DIGEST + r"""
import sys
sys.path.insert(0, sys.argv[1])
from conftest import make_clip, random_multi_scene, random_scene
print(digest(make_clip, random_scene, random_multi_scene))
"""


def test_build_independent_of_hash_seed(scene_factory):
    # this process runs under a random (or the user's) hash seed; the child under a fixed one
    env = dict(os.environ, PYTHONHASHSEED="4242")
    child = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent)], env=env, check=True,
                           capture_output=True, text=True, timeout=120).stdout.split()[-1]
    namespace: dict = {}
    exec(DIGEST, namespace)
    assert namespace["digest"](scene_factory.clip, scene_factory.random_scene, scene_factory.random_multi_scene) == child
