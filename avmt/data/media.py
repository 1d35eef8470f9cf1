"""Decode real media files (video and audio) into the clip layout the model consumes.

:func:`decode_clip` reads a file with PyAV (ffmpeg) and returns a :class:`DecodedClip`:

* ``frames``: ``uint8 [T·F, 3, S, S]``: for every segment ``t`` of ``segment_seconds`` and
  every one of its F sampling times, the decoded frame whose presentation time (pts) is nearest,
  so variable-frame-rate files are sampled by time, not by frame index; each frame is resized to
  a square of side S by centre-cropping (``resize="crop"``) or black padding (``"pad"``).
* ``audio``: ``float32 [T · segment_seconds · sample_rate]`` mono in ``[-1, 1]``: every channel
  mixed to mono and resampled by PyAV's resampler (libswresample), cut to the clip. The mix is
  ffmpeg's standard downmix, the same as ``ffmpeg -ac 1``: stereo L and R each at -3 dB (so two
  identical channels come out sqrt(2) louder than either), 5.1 with the centre/surround levels of
  libswresample; the result is clipped to ``[-1, 1]``.
* ``flags``: :class:`MediaFlags`: what had to be filled in (missing audio, segments past the end
  of the media) and what the source was (duration, fps, sample rate, channels).

Times are seconds from the beginning of the file (the container's start time). A clip always
covers T segments from ``start``; the part past the end of the media, or past ``end`` when it is
given, is filled by repeating the last frame and by silence, and counted in
``flags.padded_segments``.

Audio-only files (wav, flac, mp3, ...) decode with ``frames=None`` and ``flags.no_video=True``.
A video without an audio stream follows :attr:`MediaConfig.missing_audio`.

A file that cannot be used raises :class:`MediaError` (a ``ValueError``) naming the file and the
reason; ffmpeg errors never escape raw. :func:`audio_windows` cuts the waveform into T windows
centred on the segments, the way Crab (1 s) or MUSIC-AVQA (2 s) feed their audio encoders.
"""

from __future__ import annotations

from avmt.errors import UserError
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MediaError",
    "MediaConfig",
    "MediaFlags",
    "DecodedClip",
    "decode_clip",
    "audio_windows",
    "square_geometry",
    "sampling_times",
    "read_image",
]

_FRAME_SAMPLING = ("center", "uniform")
_RESIZE = ("crop", "pad")
_MISSING_AUDIO = ("skip", "silence")


class MediaError(UserError):
    """A media file cannot be used: it cannot be opened, lacks a needed stream, or is corrupt.

    Attributes:
        path: the file.
        reason: why, e.g. ``"cannot open"``, ``"no video stream"``, ``"no audio stream"``,
            ``"truncated/corrupt"``, followed by details.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) through pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class MediaConfig:
    """How a media file is turned into a clip.

    Attributes:
        num_segments: T, the number of segments the clip is cut into.
        segment_seconds: length of one segment in seconds; the clip covers
            ``num_segments * segment_seconds`` seconds from ``start``.
        frames_per_segment: F, frames sampled in each segment (``T·F`` frames in all).
        frame_sampling: where the F frames of a segment are taken: ``"center"``: the F
            consecutive source frames around the segment's centre (times spaced by the stream's
            average frame interval; F=1 is the centre frame); ``"uniform"``: spread evenly, at
            the centres of F equal parts of the segment. With F=1 both give the segment centre.
        image_size: S, the side of the square output frames.
        resize: ``"crop"``: scale the short side to S, then centre-crop the long side;
            ``"pad"``: scale the long side to S, then pad the short side with black, centred.
        sample_rate: output audio rate in Hz (16000 for wav2vec2-family encoders).
        audio_window_seconds: length of the audio window :func:`audio_windows` cuts around each
            segment centre; ``None`` = the segment length (windows tile the clip). Crab uses 1 s,
            MUSIC-AVQA 2 s.
        missing_audio: what to do with a video without an audio stream: ``"skip"`` raises
            :class:`MediaError` (the caller skips the clip), ``"silence"`` returns zeros and
            sets ``flags.no_audio``.
    """

    num_segments: int = 10
    segment_seconds: float = 1.0
    frames_per_segment: int = 1
    frame_sampling: str = "center"
    image_size: int = 224
    resize: str = "crop"
    sample_rate: int = 16000
    audio_window_seconds: float | None = None
    missing_audio: str = "skip"

    def __post_init__(self) -> None:
        if int(self.num_segments) != self.num_segments or self.num_segments < 1:
            raise UserError(f"num_segments must be a positive integer, got {self.num_segments!r}")
        if not self.segment_seconds > 0:
            raise UserError(f"segment_seconds must be > 0, got {self.segment_seconds!r}")
        if int(self.frames_per_segment) != self.frames_per_segment or self.frames_per_segment < 1:
            raise UserError(
                f"frames_per_segment must be a positive integer, got {self.frames_per_segment!r}"
            )
        if self.frame_sampling not in _FRAME_SAMPLING:
            raise UserError(f"frame_sampling must be one of {_FRAME_SAMPLING}, got {self.frame_sampling!r}")
        if int(self.image_size) != self.image_size or self.image_size < 1:
            raise UserError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.resize not in _RESIZE:
            raise UserError(f"resize must be one of {_RESIZE}, got {self.resize!r}")
        if int(self.sample_rate) != self.sample_rate or self.sample_rate < 1:
            raise UserError(f"sample_rate must be a positive integer, got {self.sample_rate!r}")
        if self.audio_window_seconds is not None and not self.audio_window_seconds > 0:
            raise UserError(f"audio_window_seconds must be > 0 or None, got {self.audio_window_seconds!r}")
        if self.missing_audio not in _MISSING_AUDIO:
            raise UserError(f"missing_audio must be one of {_MISSING_AUDIO}, got {self.missing_audio!r}")
        if self.num_samples < self.num_segments:
            raise UserError(
                f"{self.num_segments} segments of {self.segment_seconds} s at {self.sample_rate} Hz "
                f"give fewer than one audio sample per segment"
            )

    @property
    def clip_seconds(self) -> float:
        """Length of the clip: ``num_segments * segment_seconds``."""
        return self.num_segments * self.segment_seconds

    @property
    def num_frames(self) -> int:
        """T·F, the number of output frames."""
        return self.num_segments * self.frames_per_segment

    @property
    def num_samples(self) -> int:
        """Output audio samples: ``round(num_segments * segment_seconds * sample_rate)``."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def window_samples(self) -> int:
        """W, samples of one :func:`audio_windows` window."""
        seconds = self.segment_seconds if self.audio_window_seconds is None else self.audio_window_seconds
        return max(1, int(round(seconds * self.sample_rate)))


@dataclass
class MediaFlags:
    """What decoding found and what it had to fill in.

    Attributes:
        no_audio: the file has no audio stream; ``audio`` is silence (``missing_audio="silence"``).
        no_video: the file has no video stream (an audio file); ``frames`` is ``None``.
        padded_segments: segments whose centre lies at or past the end of the media (or past
            ``end``): their frames repeat the last decoded frame and their audio is (mostly)
            silence. 0 when the media covers the whole clip.
        audio_samples: output samples that come from the file; the rest are zero padding.
        duration: length of the media in seconds (from the container, else measured).
        fps: average frame rate of the video stream (``None`` without video).
        source_sample_rate: sample rate of the audio stream (``None`` without audio).
        channels: channel count of the audio stream before the mono mix (0 without audio).
        width: source frame width (``None`` without video).
        height: source frame height (``None`` without video).
        start: where the clip starts, in seconds from the beginning of the file.
        end: where the usable media ends for this clip, in seconds (``min(end, media end)``).
    """

    no_audio: bool = False
    no_video: bool = False
    padded_segments: int = 0
    audio_samples: int = 0
    duration: float | None = None
    fps: float | None = None
    source_sample_rate: int | None = None
    channels: int = 0
    width: int | None = None
    height: int | None = None
    start: float = 0.0
    end: float | None = None


@dataclass
class DecodedClip:
    """The result of :func:`decode_clip`.

    Attributes:
        frames: ``uint8 [T·F, 3, S, S]`` RGB frames, or ``None`` for an audio-only file.
        audio: ``float32 [T · segment_seconds · sample_rate]`` mono waveform in ``[-1, 1]``.
        flags: :class:`MediaFlags`.
        config: the :class:`MediaConfig` used.
    """

    frames: Tensor | None
    audio: Tensor
    flags: MediaFlags
    config: MediaConfig


def audio_windows(audio: Tensor, config: MediaConfig) -> Tensor:
    """Cut a clip's waveform into T windows, each centred on its segment's centre.

    Window ``t`` covers ``W`` samples (``config.window_samples``) centred on
    ``(t + 0.5) * segment_seconds``; what falls before the clip start or after its end is zero.
    With ``audio_window_seconds=None`` the windows tile the clip exactly.

    Args:
        audio: ``float [..., S]`` waveform at ``config.sample_rate`` (leading dims are kept).
        config: the clip's :class:`MediaConfig`.

    Returns:
        ``[..., T, W]``.
    """
    if not isinstance(audio, Tensor):
        audio = torch.as_tensor(np.asarray(audio))
    if audio.dim() < 1:
        raise ValueError("audio must have at least one dimension (samples last)")
    t = config.num_segments
    w = config.window_samples
    sr = config.sample_rate
    centres = torch.tensor([int(round((i + 0.5) * config.segment_seconds * sr)) for i in range(t)])
    starts = centres - w // 2
    pad = w + max(0, int(starts.max()) + w - audio.shape[-1])
    padded = torch.nn.functional.pad(audio, (w, pad))
    index = starts[:, None] + w + torch.arange(w)[None, :]  # [T, W] into ``padded``
    return padded[..., index]


def decode_clip(
    path: str | os.PathLike,
    config: MediaConfig | None = None,
    start: float | None = None,
    end: float | None = None,
) -> DecodedClip:
    """Decode ``config.num_segments`` segments of a media file from ``start``.

    Args:
        path: a video (mp4, webm, mkv, ...) or audio (wav, flac, mp3, ...) file.
        config: :class:`MediaConfig` (defaults when ``None``).
        start: clip start in seconds from the beginning of the file (0 when ``None``); the file
            is seeked there, then decoded.
        end: where the usable media ends, in seconds; content after it is not used and the
            segments past it are padded. ``None``: the end of the file. The clip length is always
            ``num_segments * segment_seconds`` whatever ``end`` is.

    Raises:
        MediaError: the file cannot be opened, has no usable stream, is truncated or corrupt, or
            ``start`` is past its end.
    """
    config = config or MediaConfig()
    start = 0.0 if start is None else float(start)
    if not start >= 0:
        raise UserError(f"start must be >= 0 seconds, got {start!r}")
    if end is not None and not float(end) > start:
        raise UserError(f"end ({end!r}) must be after start ({start!r})")
    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except FileNotFoundError as exc:
        raise MediaError(path, "cannot open: no such file") from exc
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(path, f"cannot open: not a media file, or truncated/corrupt ({_why(exc)})") from exc
    try:
        with container:
            return _decode(container, path, config, start, None if end is None else float(end))
    except MediaError:
        raise
    except (av.FFmpegError, OSError, EOFError) as exc:
        raise MediaError(path, f"truncated/corrupt: decoding failed ({_why(exc)})") from exc


# ----------------------------------------------------------------------------------------------
# internals


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _frame_time(frame, origin: float, running: float | None) -> float:
    """A decoded frame's time in seconds from ``origin``; a frame without pts takes ``running``
    (where the previous frame ended; 0 for the first)."""
    t = _seconds(frame.pts, frame.time_base)
    return (running if running is not None else 0.0) if t is None else t - origin


def _video_stream(container):
    for stream in container.streams.video:
        if not (stream.disposition & av.stream.Disposition.attached_pic):  # skip cover art
            return stream
    return None


def sampling_times(config: MediaConfig, start: float, fps: float) -> np.ndarray:
    """``float64 [T·F]``: the time (seconds from the file start) each output frame of a clip is
    taken at, in output order (segment by segment), as ``config.frame_sampling`` places them.

    Args:
        config: the cut (``num_segments`` T, ``segment_seconds``, ``frames_per_segment`` F,
            ``frame_sampling``).
        start: where the clip starts in the file, in seconds.
        fps: the source's frame rate; ``"center"`` spaces a segment's F frames ``1 / fps`` apart
            around its centre (``"uniform"`` does not use it).
    """
    seg, f = config.segment_seconds, config.frames_per_segment
    times = []
    for t in range(config.num_segments):
        for i in range(f):
            if config.frame_sampling == "uniform":
                times.append(start + (t + (i + 0.5) / f) * seg)
            else:
                times.append(start + (t + 0.5) * seg + (i - (f - 1) / 2) / fps)
    return np.asarray(times, dtype=np.float64)


def square_geometry(width: int, height: int, config: MediaConfig) -> tuple[int, int]:
    """The scaled size ``(w', h')`` of a ``width x height`` picture before it is cropped or padded
    to the ``S x S`` square of ``config`` (short side to S for ``"crop"``, long side for ``"pad"``)."""
    s = config.image_size
    scale = s / (min(width, height) if config.resize == "crop" else max(width, height))
    nw, nh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    if config.resize == "crop":
        return max(nw, s), max(nh, s)
    return min(nw, s), min(nh, s)


def _fit_square(scaled: np.ndarray, config: MediaConfig) -> np.ndarray:
    """Centre-crop or zero-pad a scaled ``[h', w'(, C)]`` picture to ``[S, S(, C)]``."""
    s = config.image_size
    nh, nw = scaled.shape[:2]
    if config.resize == "crop":
        y0, x0 = (nh - s) // 2, (nw - s) // 2
        return np.ascontiguousarray(scaled[y0 : y0 + s, x0 : x0 + s])
    out = np.zeros((s, s, *scaled.shape[2:]), dtype=scaled.dtype)
    y0, x0 = (s - nh) // 2, (s - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = scaled
    return out


def _square(frame: av.VideoFrame, config: MediaConfig) -> np.ndarray:
    """``uint8 [3, S, S]`` RGB: scaled (short side for crop, long side for pad), cropped or padded."""
    nw, nh = square_geometry(frame.width, frame.height, config)
    interp = "AREA" if nw < frame.width or nh < frame.height else "BILINEAR"
    rgb = frame.to_ndarray(width=nw, height=nh, format="rgb24", interpolation=interp)
    return np.ascontiguousarray(_fit_square(rgb, config).transpose(2, 0, 1))


def read_image(path: str | os.PathLike, config: MediaConfig, mode: str = "RGB") -> np.ndarray:
    """An image file (a dataset's frame or mask) fitted to the ``S x S`` square of ``config``, with
    the geometry :func:`decode_clip` gives video frames, so frames and masks stay aligned.

    Args:
        path: PNG / JPEG / ... file.
        config: the clip's :class:`MediaConfig` (``image_size``, ``resize``).
        mode: ``"RGB"``: a frame, resampled with area / bilinear filtering -> ``uint8 [3, S, S]``;
            ``"mask"``: labels kept as they are (nearest-neighbour resampling), a colour or palette
            image -> ``uint8 [S, S, 3]`` RGB, a grayscale one -> ``uint8 [S, S]``.
    Raises:
        MediaError: the file is missing or not a readable image.
    """
    from PIL import Image

    if mode not in ("RGB", "mask"):
        raise ValueError(f"mode must be 'RGB' or 'mask', got {mode!r}")
    try:
        with Image.open(os.fspath(path)) as img:
            img.load()
            if mode == "RGB" or img.mode in ("P", "RGBA", "LA", "CMYK", "YCbCr"):
                img = img.convert("RGB")
            elif img.mode not in ("RGB", "L"):
                img = img.convert("L")  # 1-bit / 16-bit masks: labels > 0 stay > 0
            nw, nh = square_geometry(img.width, img.height, config)
            shrink = nw < img.width or nh < img.height
            resample = Image.NEAREST if mode == "mask" else (Image.BOX if shrink else Image.BILINEAR)
            scaled = np.asarray(img.resize((nw, nh), resample=resample), dtype=np.uint8)
    except FileNotFoundError:
        raise MediaError(path, "cannot open: no such file") from None
    except OSError as exc:
        raise MediaError(path, f"not a readable image ({_why(exc)})") from None
    out = _fit_square(scaled, config)
    return np.ascontiguousarray(out.transpose(2, 0, 1)) if mode == "RGB" else out


class _FramePicker:
    """Streams decoded frames and keeps, for every sampling time, the frame of nearest pts."""

    def __init__(self, times: np.ndarray, config: MediaConfig) -> None:
        self.times = times
        self.order = np.argsort(times, kind="stable")
        self.pending = 0
        self.config = config
        self.out: list[np.ndarray | None] = [None] * len(times)
        self.prev: tuple[float, av.VideoFrame] | None = None
        self._cache: tuple[av.VideoFrame, np.ndarray] | None = None
        self.count = 0

    @property
    def done(self) -> bool:
        return self.pending >= len(self.times)

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        if self._cache is None or self._cache[0] is not frame:  # keep the frame: ids get reused
            self._cache = (frame, _square(frame, self.config))
        return self._cache[1]

    def push(self, t: float, frame: av.VideoFrame) -> None:
        self.count += 1
        if self.prev is not None and t <= self.prev[0]:  # out-of-order / duplicate pts: keep the first
            return
        while not self.done:
            tau = self.times[self.order[self.pending]]
            if tau > t:
                break
            choose = frame
            if self.prev is not None and (tau - self.prev[0]) <= (t - tau):
                choose = self.prev[1]
            self.out[self.order[self.pending]] = self._convert(choose)
            self.pending += 1
        self.prev = (t, frame)

    def finish(self) -> np.ndarray | None:
        """Fill the sampling times past the last frame with it; ``None`` if no frame came."""
        if self.prev is None:
            return None
        while not self.done:
            self.out[self.order[self.pending]] = self._convert(self.prev[1])
            self.pending += 1
        return np.stack(self.out)


def _decode(container, path, config: MediaConfig, start: float, end: float | None) -> DecodedClip:
    vstream = _video_stream(container)
    astream = container.streams.audio[0] if container.streams.audio else None
    if vstream is None and astream is None:
        raise MediaError(path, "no video stream and no audio stream")
    if vstream is not None and astream is None and config.missing_audio == "skip":
        raise MediaError(path, "no audio stream (missing_audio='skip')")

    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    declared = container.duration / av.time_base if container.duration is not None else None
    clip_end = start + config.clip_seconds
    limit = clip_end if end is None else min(end, clip_end)
    if declared is not None and start >= declared:
        raise MediaError(path, f"start {start:.3f} s is past the end of the media ({declared:.3f} s)")

    flags = MediaFlags(no_audio=astream is None, no_video=vstream is None, duration=declared, start=start)

    fps = 25.0
    picker = None
    if vstream is not None:
        rate = vstream.average_rate or vstream.guessed_rate or vstream.base_rate
        if rate:
            fps = float(rate)
        flags.fps = float(rate) if rate else None
        flags.width, flags.height = vstream.codec_context.width, vstream.codec_context.height
        vstream.thread_type = "AUTO"
        picker = _FramePicker(sampling_times(config, start, fps), config)
    resampler = None
    if astream is not None:
        flags.source_sample_rate = astream.codec_context.sample_rate or astream.rate
        flags.channels = astream.codec_context.channels if hasattr(astream.codec_context, "channels") else 0
        flags.channels = flags.channels or len(astream.codec_context.layout.channels)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=config.sample_rate)

    if start > 0:
        margin = 1.0  # decode a little before start so the nearest frame/first samples are there
        try:
            container.seek(int(max(0.0, origin + start - margin) * av.time_base), backward=True)
        except av.FFmpegError:
            pass  # unseekable: decode from the beginning

    sr = config.sample_rate
    chunks: list[np.ndarray] = []
    audio_t0: float | None = None  # time of the first resampled sample
    audio_n = 0
    audio_next: float | None = None  # running time for frames without pts
    video_end = 0.0  # end of the last decoded frame
    video_next: float | None = None
    video_done = picker is None
    audio_done = resampler is None
    eof = True
    streams = [s for s in (vstream, astream) if s is not None]

    for packet in container.demux(*streams):
        if packet.stream is vstream:
            if video_done:
                continue
            for frame in packet.decode():
                t = _frame_time(frame, origin, video_next)
                video_next = t + 1.0 / fps
                video_end = max(video_end, video_next)
                if t >= limit:
                    video_done = True
                    break
                if t < start - 0.5 / fps:
                    picker.prev = None
                    continue
                picker.push(t, frame)
                if picker.done:
                    video_done = True
                    break
        elif packet.stream is astream:
            if audio_done:
                continue
            for frame in packet.decode():
                t = _frame_time(frame, origin, audio_next)
                audio_next = t + frame.samples / frame.sample_rate
                if audio_t0 is None:
                    audio_t0 = t
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    audio_n += out.samples
                if audio_t0 + audio_n / sr >= limit + 0.1:
                    audio_done = True
                    break
        if video_done and audio_done:
            eof = False
            break

    if resampler is not None and eof:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
            audio_n += out.samples

    # where the media's content ends (only known when decoding ran to the end of the file)
    content_end = math.inf
    if eof:
        ends = []
        if vstream is not None:
            ends.append(video_end)
        if astream is not None and audio_t0 is not None:
            ends.append(audio_t0 + audio_n / sr)
        content_end = max(ends) if ends else start
        if declared is not None:
            tol = max(0.5, 0.1 * declared)
            if content_end < min(declared, limit) - tol:
                raise MediaError(
                    path,
                    f"truncated/corrupt: decoding stops at {content_end:.2f} s but the file "
                    f"declares {declared:.2f} s",
                )
        if flags.duration is None:
            flags.duration = content_end
    usable_end = min(limit, content_end)
    flags.end = usable_end
    if usable_end <= start:
        raise MediaError(path, f"start {start:.3f} s is past the end of the media ({usable_end:.3f} s)")

    frames = None
    if picker is not None:
        stacked = picker.finish()
        if stacked is None:
            raise MediaError(path, "truncated/corrupt: no decodable video frame in the clip window")
        frames = torch.from_numpy(stacked)

    audio = np.zeros(config.num_samples, dtype=np.float32)
    if astream is not None:
        if not chunks or audio_t0 is None:
            raise MediaError(path, "truncated/corrupt: no decodable audio in the clip window")
        wave = np.concatenate(chunks)
        offset = int(round((start - audio_t0) * sr))
        wave = wave[offset:] if offset >= 0 else np.concatenate([np.zeros(-offset, np.float32), wave])
        valid = min(len(wave), int(round((usable_end - start) * sr)), config.num_samples)
        audio[:valid] = np.clip(wave[:valid], -1.0, 1.0)
        flags.audio_samples = int(valid)

    seg = config.segment_seconds
    centres = [start + (t + 0.5) * seg for t in range(config.num_segments)]
    flags.padded_segments = sum(1 for c in centres if c >= usable_end)
    return DecodedClip(frames=frames, audio=torch.from_numpy(audio), flags=flags, config=config)
