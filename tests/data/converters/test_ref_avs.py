"""``data convert ref-avs``: Ref-AVS's metadata, frames, audio and masks -> one clip per expression,
the splits kept apart (train, val, test_s, test_u, test_n), shards the ``ref_avs`` task trains on."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from avmt.data.converters import ConvertError, get_converter
from avmt.data.media import MediaConfig
from avmt.tasks import all_words, get_task
from avmt.tasks.text import text_words
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_audio

FRAME_W, FRAME_H = 64, 48
METADATA = (
    "vid,uid,split,fid,exp\n"
    "vidA_0_10000,vidA_0_10000_cello_1,train,0,The object making the loudest sound.\n"
    "vidA_0_10000,vidA_0_10000_violin_2,train,1,The violin on the right.\n"
    "vidA_0_10000,null_c-vidA_0_10000_null_1,train,0,The first object to make a sound\n"  # a null expression in train
    "vidB_0_10000,vidB_0_10000_piano_1,val,0,The sounding piano.\n"
    "encodedC,vidC_0_10000_guitar_4,test_s,0,The guitar played by the man.\n"  # media found by the uid's prefix
    "vidD_0_10000,vidD_0_10000_hair-dryer_4,test_u,0,The entity continuously emitting sound.\n"
    "vidB_0_10000,vidB_0_10000_piano_5,test_n,0,The object playing the drums.\n"  # null split: empty target
    "vidE_0_10000,vidE_0_10000_dog_1,train,0,The dog barking.\n"  # its frames are missing
    "vidA_0_10000,vidA_0_10000_cello_1,train,0,A repeated uid.\n"
    "vidA_0_10000,vidA_0_10000_cello_3,train,x,A bad mask folder number.\n"
    "too,few\n"
)


def _frame(index: int) -> Image.Image:
    pixels = np.zeros((FRAME_H, FRAME_W, 3), dtype=np.uint8)
    pixels[..., 0] = 20 * index  # frame i is told apart by its red level
    pixels[..., 1] = 120
    return Image.fromarray(pixels)


def _mask(side: str, mode: str) -> Image.Image:
    """The referred object: the left or right half of the frame (255 / a colour), the rest 0."""
    fg = np.zeros((FRAME_H, FRAME_W), dtype=bool)
    fg[:, : FRAME_W // 2] = side == "left"
    fg[:, FRAME_W // 2:] = side == "right"
    if mode == "L":
        return Image.fromarray(fg.astype(np.uint8) * 255)
    colour = np.zeros((FRAME_H, FRAME_W, 3), dtype=np.uint8)
    colour[fg] = (0, 128, 0)  # a colour mask: foreground where any channel > 0
    return Image.fromarray(colour)


@pytest.fixture(scope="module")
def ref_avs_tree(tmp_path_factory):
    """Ref-AVS's layout: metadata.csv, media/{vid}/{audio.wav, frames/i.jpg}, gt_mask/{vid}/fid_{fid}/0000{i}.png."""
    src = tmp_path_factory.mktemp("REFAVS")
    (src / "metadata.csv").write_text(METADATA)
    for vid in ("vidA_0_10000", "vidB_0_10000", "vidC_0_10000", "vidD_0_10000", "vidE_0_10000"):
        media = src / "media" / vid
        (media / "frames").mkdir(parents=True)
        write_audio(media / "audio.wav", "pcm_s16le", seconds=2.0, rate=16000, channels=1)
        if vid != "vidE_0_10000":
            for i in range(10):
                _frame(i).save(media / "frames" / f"{i}.jpg")
    masks = {("vidA_0_10000", 0): ("left", "L"), ("vidA_0_10000", 1): ("right", "RGB"),
             ("vidB_0_10000", 0): ("left", "RGB"), ("vidC_0_10000", 0): ("right", "L"),
             ("vidD_0_10000", 0): ("left", "L"), ("vidE_0_10000", 0): ("left", "L")}
    for (vid, fid), (side, mode) in masks.items():
        folder = src / "gt_mask" / vid / f"fid_{fid}"
        folder.mkdir(parents=True)
        for i in range(10):
            _mask(side, mode).save(folder / f"0000{i}.png")
    return src


@pytest.fixture(scope="module")
def converted(ref_avs_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("refavs_out")
    return out, run_convert("ref-avs", ref_avs_tree, out, "--frames_format", "png")


def test_manifest_counts_and_names_every_skipped_entry(converted):
    _, manifest = converted
    assert manifest["source_format"] == "ref-avs" and manifest["tasks"] == {"ref_avs": 7}
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {
        "train": 3, "val": 1, "test_s": 1, "test_u": 1, "test_n": 1}
    assert manifest["splits"]["train"]["skipped"] == 3
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert skipped["vidE_0_10000_dog_1"]["file"] == "media/vidE_0_10000/frames/0.jpg"
    assert skipped["vidE_0_10000_dog_1"]["reason"] == "cannot open: no such file"
    assert "already listed on metadata.csv:2" in skipped["vidA_0_10000_cello_1"]["reason"]
    assert "fid 'x'" in skipped["vidA_0_10000_cello_3"]["reason"]
    assert skipped["metadata.csv:12"]["file"] == "metadata.csv" and "2 fields" in skipped["metadata.csv:12"]["reason"]
    assert {"loudest", "violin", "guitar", "hair", "dryer", "drums"} <= set(manifest["words"])


def test_clips_carry_the_expression_and_the_referred_objects_mask(converted):
    out, _ = converted
    clips = {clip.key: clip for clip in read_split(out, "train")}
    assert set(clips) == {"vidA_0_10000_cello_1", "vidA_0_10000_violin_2", "null_c-vidA_0_10000_null_1"}
    cello, violin, null = (clips[k] for k in sorted(clips)[1:] + sorted(clips)[:1])
    assert cello.key.endswith("cello_1") and violin.key.endswith("violin_2") and null.key.startswith("null")
    assert tuple(cello.frames.shape) == (4, 3, 32, 32) and tuple(cello.masks.shape) == (4, 32, 32)
    assert cello.audio.abs().max() > 0.01
    # 4 segments of 0.5 s: dataset frames 0, 0, 1, 1 (one frame a second), told apart by their red level
    red = cello.frames[:, 0].float().mean(dim=(1, 2))
    assert red[0] == red[1] < red[2] == red[3]
    assert cello.scene["answers"]["ref_avs"] == {"expression": "The object making the loudest sound.", "null": False,
                                                  "object": "cello"}
    assert cello.scene["objects"] == [{"id": 0, "class": "cello"}] and cello.scene["mask_frames"] == [0, 1, 2, 3]
    # the masks keep the frames' crop: the left half (grey mask) / the right half (colour mask) is object 0
    assert (cello.masks[:, :, :12] == 1).all() and (cello.masks[:, :, 20:] == 0).all()
    assert (violin.masks[:, :, 20:] == 1).all() and (violin.masks[:, :, :12] == 0).all()
    assert null.scene["answers"]["ref_avs"] == {"expression": "The first object to make a sound", "null": True,
                                                "object": None}
    assert null.scene["objects"] == [] and not null.masks.any()
    # the unseen split found its media by the uid's prefix (the vid column is an encoded id)
    (guitar,) = read_split(out, "test_s")
    assert guitar.scene["source_id"] == "vidC_0_10000_guitar_4" and (guitar.masks[:, :, 20:] == 1).all()


def test_ref_avs_samples_from_converted_clips(converted):
    out, _ = converted
    task, bare = get_task("ref_avs"), get_task("ref_avs", reasoning=False)
    (dryer,) = read_split(out, "test_u")
    sample = task.build(dryer, random.Random(0))
    assert "the entity continuously emitting sound" in sample.prompt and sample.prompt.startswith("<video> <audio> ")
    assert sample.target == "So the entity continuously emitting sound is the hair-dryer, and its mask is <seg>"
    assert bare.build(dryer, random.Random(0)).target == "<seg>"
    assert torch.equal(sample.dense["mask"], dryer.masks.bool()) and sample.answer["null"] is False
    # a null expression (split test_n): the empty mask, scored by S only
    (null,) = read_split(out, "test_n")
    assert null.scene["answers"]["ref_avs"]["null"] is True and not null.masks.any()
    empty = task.build(null, random.Random(0))
    assert empty.target == "So the mask is empty: <seg>" and not empty.dense["mask"].any() and empty.answer["null"]
    metrics = task.metrics()
    metrics.update([task.answer_to_pred(sample.answer), {"mask": torch.ones(4, 32, 32)}], [sample.answer, empty.answer])
    scores = {k: float(v) for k, v in metrics.compute().items()}
    assert scores["j"] == pytest.approx(1.0) and scores["s_null"] == pytest.approx(1.0)  # all foreground on null
    assert not get_task("ave").applies(null)


def test_the_vocabulary_spells_every_sample(converted):
    """The tiny LLM's words (the tasks' and the manifest's) hold every word of every prompt and target."""
    out, manifest = converted
    vocabulary = set(all_words()) | set(manifest["words"])
    for split in manifest["splits"]:
        for i, clip in enumerate(read_split(out, split)):
            for seed in range(4):
                sample = get_task("ref_avs").build(clip, random.Random(seed))
                assert text_words(sample.prompt) | text_words(sample.target) <= vocabulary, (clip.key, sample.prompt)


def test_a_missing_metadata_file_is_a_user_error(tmp_path):
    with pytest.raises(ConvertError, match="metadata.csv"):
        list(get_converter("ref-avs").items(tmp_path, MediaConfig()))
    (tmp_path / "metadata.csv").write_text("vid,uid,fid\nx,y,0\n")
    with pytest.raises(ConvertError, match=r"lacks the columns \['split', 'exp'\]"):
        list(get_converter("ref-avs").items(tmp_path, MediaConfig()))


def test_a_fit_trains_on_the_converted_shards(converted, tmp_path):
    out, _ = converted
    checkpoint = fit_steps(out, ["ref_avs"], tmp_path / "work", splits={"test": "test_u"}, steps=3,
                           configs=["spatial.yaml"])
    assert checkpoint["global_step"] == 3
