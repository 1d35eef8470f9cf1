"""``data convert avsbench``: AVSBench S4, MS3 and AVSS (AVSBench-semantic) in their own layout ->
shards the ``s4``, ``ms3`` and ``avss`` tasks train on, masks at the right pixels."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from avmt.data.converters import ConvertError, convert, get_converter
from avmt.data.converters.avsbench import avss_palette, palette_indices, source_frame_of_outputs
from avmt.data.labels import AVSBENCH_SEMANTIC_CLASSES, AVSBENCH_SEMANTIC_LABELS
from avmt.data.media import MediaConfig
from avmt.data.sample import Dense
from avmt.tasks import get_task
from avmt.data.vocab import CLASSES
from avmt.tasks.avss import CLASS_IDS, NUM_CLASSES
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_audio

#: 5 segments of 1 s (the dataset's own clips), 32 px frames, 16 kHz.
MEDIA = ["--num_segments", "5", "--segment_seconds", "1.0", "--frames_format", "png"]
S = 32
PALETTE = avss_palette(len(AVSBENCH_SEMANTIC_LABELS))


def colour(label: str) -> tuple[int, int, int]:
    """The palette colour of an AVSBench-semantic label (``label2idx`` value ``p + 1`` -> palette ``p``)."""
    return tuple(int(v) for v in PALETTE[AVSBENCH_SEMANTIC_LABELS.index(label)])


def frame_grey(i: int) -> int:
    """The grey level of source frame ``i`` (tells which source frame an output frame shows)."""
    return 20 + 20 * i


def write_frame(path, i: int, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (frame_grey(i),) * 3).save(path)


def write_mask(path, array: np.ndarray) -> None:
    """A grayscale (``[H, W]``) or RGB (``[H, W, 3]``) mask PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def write_wav(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, "pcm_s16le", seconds=5.0, rate=16000, channels=1)


def binary_mask(rows: int) -> np.ndarray:
    """64x64 0/255 mask whose first ``rows`` rows are foreground."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:rows] = 255
    return mask


def s4_clip(root, name: str, category: str, split: str, masks: dict[int, np.ndarray]) -> None:
    data = root / "Single-source" / "s4_data"
    for i in range(1, 6):
        write_frame(data / "visual_frames" / split / category / name / f"{name}_{i}.png", i - 1)
    for i, mask in masks.items():
        write_mask(data / "gt_masks" / split / category / name / f"{name}_{i}.png", mask)
    write_wav(data / "audio_wav" / split / category / f"{name}.wav")


def ms3_clip(root, name: str, split: str) -> None:
    data = root / "Multi-sources" / "ms3_data"
    for i in range(1, 6):
        write_frame(data / "visual_frames" / name / f"{name}.mp4_{i}.png", i - 1)
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:8, :8] = 255  # two sounding objects: one binary mask
        mask[56:, 56:] = 255
        write_mask(data / "gt_masks" / split / name / f"{name}_{i}.png", mask)
    write_wav(data / "audio_wav" / split / f"{name}.wav")


def avss_clip(root, label: str, uid: str, masks: dict[int, np.ndarray], size=(64, 64)) -> None:
    clip = root / "AVSBench_semantic" / label / uid
    for i in range({"v2": 10}.get(label, 5)):
        frame = clip / "frames" / f"{i}.jpg"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (frame_grey(i),) * 3).save(frame, quality=95)
    for i, mask in masks.items():
        write_mask(clip / "labels_rgb" / f"{i}.png", mask)
    write_wav(clip / "audio.wav")


def v2_mask(i: int) -> np.ndarray:
    """96x64 (w x h) colour mask of frame ``i``: a dog (x 16..48, y 0..32) on every frame, a guitar
    (x 48..80, y 32..64) from frame 2, and a colour outside the palette in the corner."""
    mask = np.zeros((64, 96, 3), dtype=np.uint8)
    mask[:32, 16:48] = colour("dog")
    if i >= 2:
        mask[32:, 48:80] = colour("guitar")
    mask[62:, :2] = (1, 2, 3)
    return mask


def solid_mask(label: str) -> np.ndarray:
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[:32, :32] = colour(label)
    return mask


@pytest.fixture(scope="module")
def avsbench_tree(tmp_path_factory):
    """The avsbench_data root with all three subsets; a corrupt frame, a bad row, an unknown label."""
    root = tmp_path_factory.mktemp("avsbench_data")
    (root / "Single-source").mkdir()
    (root / "Single-source" / "s4_meta_data.csv").write_text(
        "name,start_time,category,split\n"
        "s4A,0,dog_barking,train\n"
        "s4B,0,playing_violin,test\n"
        "s4bad,0,dog_barking,train\n"
        ",0,,train\n"
    )
    s4_clip(root, "s4A", "dog_barking", "train", {1: binary_mask(32)})  # train: the first frame's mask only
    s4_clip(root, "s4B", "playing_violin", "test", {i: binary_mask(8 * i) for i in range(1, 6)})
    s4_clip(root, "s4bad", "dog_barking", "train", {1: binary_mask(32)})
    bad = root / "Single-source/s4_data/visual_frames/train/dog_barking/s4bad/s4bad_3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "Multi-sources").mkdir()
    (root / "Multi-sources" / "ms3_meta_data.csv").write_text("video_id,split\nms3A,train\nms3B,val\n")
    ms3_clip(root, "ms3A", "train")
    ms3_clip(root, "ms3B", "val")
    semantic = root / "AVSBench_semantic"
    semantic.mkdir()
    (semantic / "label2idx.json").write_text(json.dumps({n: i + 1 for i, n in enumerate(AVSBENCH_SEMANTIC_LABELS)}))
    (semantic / "metadata.csv").write_text(
        "vid,uid,s_min,s_sec,a_obj,split,label\n"
        "vidX,vidX_1,0,0,dog,train,v2\n"
        "vidY,vidY_1,0,0,cat,train,v1s\n"
        "vidZ,vidZ_1,0,0,piano,val,v1m\n"
        "vidW,vidW_1,0,0,dog,train,v3\n"
    )
    avss_clip(root, "v2", "vidX_1", {i: v2_mask(i) for i in range(10)}, size=(96, 64))
    avss_clip(root, "v1s", "vidY_1", {0: solid_mask("cat")})  # v1s train: the first frame's mask only
    avss_clip(root, "v1m", "vidZ_1", {i: solid_mask("piano") for i in range(5)})
    return root


@pytest.fixture(scope="module")
def converted(avsbench_tree, tmp_path_factory):
    """The tree converted once: (out folder, manifest)."""
    out = tmp_path_factory.mktemp("converted") / "out"
    return out, run_convert("avsbench", avsbench_tree, out, *MEDIA)


@pytest.fixture(scope="module")
def clips(converted):
    out, _ = converted
    return {clip.key: clip for split in ("train", "val", "test") for clip in read_split(out, split)}


def test_manifest_counts_and_names_every_skipped_entry(converted):
    _, manifest = converted
    assert manifest["source_format"] == "avsbench"
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 1}
    assert manifest["splits"]["train"]["skipped"] == 3 and manifest["tasks"] == {"avss": 3, "ms3": 2, "s4": 2}
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"s4-s4bad", "s4_meta_data.csv:5", "vidW_1"}
    assert skipped["s4-s4bad"]["file"] == "Single-source/s4_data/visual_frames/train/dog_barking/s4bad/s4bad_3.png"
    assert "not a readable image" in skipped["s4-s4bad"]["reason"]
    assert skipped["s4_meta_data.csv:5"]["file"] == "Single-source/s4_meta_data.csv"
    assert "names no clip" in skipped["s4_meta_data.csv:5"]["reason"]
    assert skipped["vidW_1"]["file"] == "AVSBench_semantic/metadata.csv" and "'v3'" in skipped["vidW_1"]["reason"]
    assert {"dog", "barking", "playing", "violin", "guitar", "cat", "piano"} <= set(manifest["words"])


def test_s4_masks_are_binary_objects_on_the_annotated_frames(clips):
    train, test = clips["s4-s4A"], clips["s4-s4B"]
    assert tuple(train.frames.shape) == (5, 3, S, S) and tuple(train.audio.shape) == (80000,)
    assert [int(f[0, 0, 0]) for f in train.frames] == [frame_grey(i) for i in range(5)]  # 1 frame per second
    assert train.scene["objects"] == [{"id": 0, "class": "dog_barking"}]
    assert train.scene["mask_frames"] == [0]
    assert train.scene["answers"]["s4"] == {"class": "dog_barking", "objects": [0]}
    expected = torch.zeros(S, S, dtype=torch.uint8)
    expected[:16] = 1  # the top half of the 64 px mask, scaled to 32 px
    assert torch.equal(train.masks[0], expected) and not train.masks[1:].any()
    assert test.scene["mask_frames"] == [0, 1, 2, 3, 4]
    assert [int(m.sum()) for m in test.masks] == [4 * i * S for i in range(1, 6)]  # 8·i rows of 64 -> 4·i of 32
    assert train.scene["media"]["source_frames"] == 5 and train.scene["media"]["padded_frames"] == 0


def test_avss_colour_masks_decode_to_classes_at_the_right_pixels(clips):
    assert [tuple(c) for c in PALETTE[:5]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    clip = clips["avss-vidX_1"]  # a 10 s v2 clip: its first 5 s at the default 5 segments
    assert clip.scene["objects"] == [{"id": 0, "class": "dog"}, {"id": 1, "class": "guitar"}]
    assert clip.scene["answers"]["avss"] == {"classes": ["dog", "guitar"]}
    assert clip.scene["mask_frames"] == [0, 1, 2, 3, 4]
    assert clip.scene["media"]["source_frames"] == 10
    # 96x64 -> 48x32, centre-cropped to 32x32 (8 px off each side): dog x 16..48 -> 0..16, guitar x 48..80 -> 16..32
    for t in range(5):
        expected = torch.zeros(S, S, dtype=torch.uint8)
        expected[:16, :16] = 1
        if t >= 2:
            expected[16:, 16:] = 2
        assert torch.equal(clip.masks[t], expected), t  # the colour outside the palette is background
    v1s = clips["avss-vidY_1"]
    assert v1s.scene["mask_frames"] == [0] and v1s.scene["answers"]["avss"] == {"classes": ["cat"]}
    assert int(v1s.masks[0].sum()) == 16 * 16 and not v1s.masks[1:].any()


def test_source_frames_follow_the_clip_time():
    half = MediaConfig(num_segments=4, segment_seconds=0.5)
    assert source_frame_of_outputs(5, half) == ([0, 0, 1, 1], [False] * 4)
    long = MediaConfig(num_segments=8, segment_seconds=1.0)
    assert source_frame_of_outputs(5, long) == ([0, 1, 2, 3, 4, 4, 4, 4], [False] * 5 + [True] * 3)
    colours = np.array([[[0, 0, 0], [128, 0, 0]], [[9, 9, 9], [0, 128, 0]]], dtype=np.uint8)
    assert palette_indices(colours, PALETTE).tolist() == [[0, 1], [0, 2]]


def test_samples_ignore_the_frames_without_a_mask(clips):
    s4 = get_task("s4", reasoning=False)
    clip = clips["s4-s4A"]
    assert s4.applies(clip) and not get_task("ms3").applies(clip) and not get_task("avss").applies(clip)
    sample = s4.build(clip, random.Random(0))
    assert sample.target == "<seg>"
    assert sample.dense["annotated_frames"].tolist() == [True, False, False, False, False]
    assert torch.equal(sample.dense["mask"], clip.masks.bool())
    reasoned = get_task("s4").build(clip, random.Random(0))
    assert reasoned.target == "So the sound is dog_barking, and the object that makes it is masked by <seg>"
    # a prediction that is right on the annotated frame scores 1, whatever it says elsewhere
    guess = sample.answer["mask"].float()
    guess[1:] = 1.0
    metrics = s4.metrics()
    metrics.update([{"mask": guess}], [sample.answer])
    assert float(metrics.compute()["j"]) == pytest.approx(1.0)
    # ... and takes no loss there
    logits = torch.where(sample.dense["mask"], 50.0, -50.0)
    logits[1:] = 50.0
    table = {name: Dense(torch.tensor([0]), value[None]) for name, value in sample.dense.items()}
    losses = s4.dense_losses({"mask_logits": Dense(torch.tensor([0]), logits[None])}, table)
    assert float(losses["bce"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["dice"]) == pytest.approx(0.0, abs=1e-6)
    ms3 = get_task("ms3", reasoning=False).build(clips["ms3-ms3A"], random.Random(0))
    assert ms3.target == "<seg>" and ms3.dense["annotated_frames"].all() and int(ms3.dense["mask"][0].sum()) == 2 * 16


def test_avss_samples_use_the_real_class_names(clips):
    # one fixed class vocabulary: AVSynth's ids unchanged, then every AVSBench-semantic class
    assert [CLASS_IDS[c] for c in CLASSES] == list(range(1, len(CLASSES) + 1))
    assert set(AVSBENCH_SEMANTIC_CLASSES) <= set(CLASS_IDS) and NUM_CLASSES == len(CLASS_IDS) + 1
    avss = get_task("avss", reasoning=False)
    sample = avss.build(clips["avss-vidX_1"], random.Random(0))
    assert sample.target == "<class> dog </class> <seg> <class> guitar </class> <seg>"
    assert avss.parse(sample.target) == ["dog", "guitar"]
    dog, guitar = CLASS_IDS["dog"], CLASS_IDS["guitar"]
    assert sample.dense["seg_classes"].tolist() == [dog, guitar]
    assert int(sample.answer["class_map"][0, 0, 0]) == dog and int(sample.answer["class_map"][2, 31, 31]) == guitar
    metrics = avss.metrics()
    metrics.update([avss.answer_to_pred(sample.answer)], [sample.answer])
    assert float(metrics.compute()["miou"]) == pytest.approx(1.0)
    v1s = avss.build(clips["avss-vidY_1"], random.Random(0))
    assert v1s.target == "<class> cat </class> <seg>"
    assert v1s.dense["annotated_frames"].tolist() == [True, False, False, False, False]


def test_missing_annotation_files_are_user_errors(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_convert("avsbench", tmp_path, tmp_path / "out")
    assert exit_info.value.code == 2
    semantic = tmp_path / "AVSBench_semantic"
    (semantic / "v2").mkdir(parents=True)
    (semantic / "metadata.csv").write_text("vid,uid,s_min,s_sec,a_obj,split,label\n")
    with pytest.raises(ConvertError, match="label2idx.json"):
        convert(get_converter("avsbench"), tmp_path, tmp_path / "out2", MediaConfig(), progress=False)


def test_a_fit_trains_the_mask_tasks_on_the_converted_shards(converted, tmp_path):
    out, _ = converted
    checkpoint = fit_steps(out, ["s4", "ms3", "avss"], tmp_path / "work", steps=3, num_segments=5,
                           configs=["spatial.yaml"])
    assert checkpoint["global_step"] == 3
