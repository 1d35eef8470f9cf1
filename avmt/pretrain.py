"""Stage 1: pretrain the encoders and connectors on AVSynth's scene graphs before instruction tuning.

The reference systems start instruction tuning from encoders that already tell sounds and objects
apart (CLIP, BEATs, Whisper) and from projectors pre-trained to map them into the LLM. AVSynth has
no downloadable encoder, and an encoder trained from scratch through a random LLM learns very
little of what it sees: at initialization a connector's query tokens are nearly the same for every
clip, the LLM's loss is lowest for the answers' priors, and the model settles there (the AVE range
becomes one constant). This stage gives the tiny encoders what pretrained ones bring: for every
segment, linear probes read the mean of that segment's connector tokens and predict from the
**vision** tokens which classes are visible and where (column, row), and from the **audio** tokens
which classes sound, which one is loudest and the scene's mood (:func:`segment_targets`). The probes
are then dropped; the encoders (frozen by default) and connectors carry on into instruction tuning.

The result is cached by a fingerprint of everything it depends on (the modules' structure and
initial weights, the training shards, these settings) under ``$AVMT_CACHE/media-pretraining/``, so
every run of a grid that shares its encoders pays for it once. Its learning curve (loss and
per-segment exact-match accuracy of the visible and sounding class sets on validation clips) is
written next to the weights and logged to the run as ``pretrain/*``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from avmt.data import vocab
from avmt.data.sample import Clip, segment_frames
from avmt.errors import UserError

FORMAT_VERSION = 1
_PARTS = ("vision_encoder", "audio_encoder", "vision_connector", "audio_connector")

#: the probe outputs per segment, in order: (name, size)
VISION_TARGETS = (
    ("visible", len(vocab.CLASSES)),
    ("visible_column", len(vocab.CLASSES) * len(vocab.POSITIONS)),
    ("visible_row", len(vocab.CLASSES) * len(vocab.ROWS)),
)
AUDIO_TARGETS = (
    ("sounding", len(vocab.CLASSES)),
    ("loudest", len(vocab.CLASSES)),
    ("mood", len(vocab.MOODS)),
)


class PretrainingDataError(UserError):
    """The training clips cannot be used for media pretraining (e.g. they carry no scene graph)."""


def segment_targets(scene: dict, key: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment multi-hot targets of an AVSynth scene graph.

    Args:
        scene: the clip's scene graph (``objects`` with ``class``, ``position``, ``row``,
            ``visible`` and ``sounding`` segment intervals and ``loudness``; ``mood``).
        key: the clip's key, named in errors.
    Returns:
        ``vision [T, 6K]``: visible classes, class x column, class x row; ``audio [T, 2K + M]``:
        sounding classes, the loudest sounding class, the scene mood (K classes of
        :data:`avmt.data.vocab.CLASSES`, M moods).
    Raises:
        PretrainingDataError: the scene is not an AVSynth scene graph (a converted real clip).
    """
    try:
        t = int(scene["num_segments"])
        objects = list(scene["objects"])
        mood = vocab.MOODS.index(scene["mood"])
        k, columns, rows = len(vocab.CLASSES), len(vocab.POSITIONS), len(vocab.ROWS)
        visible, column, row = torch.zeros(t, k), torch.zeros(t, k * columns), torch.zeros(t, k * rows)
        sounding, loudest = torch.zeros(t, k), torch.zeros(t, k)
        loudness = torch.full((t,), -1.0)
        for obj in objects:
            c = vocab.CLASSES.index(obj["class"])
            p, r = vocab.POSITIONS.index(obj["position"]), vocab.ROWS.index(obj["row"])
            for s, e in obj["visible"]:
                visible[s:e, c] = 1
                column[s:e, c * columns + p] = 1
                row[s:e, c * rows + r] = 1
            for s, e in obj["sounding"]:
                sounding[s:e, c] = 1
                louder = torch.zeros(t, dtype=torch.bool)
                louder[s:e] = loudness[s:e] < float(obj["loudness"])
                loudest[louder] = 0
                loudest[louder, c] = 1
                loudness[louder] = float(obj["loudness"])
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainingDataError(
            f"clip {key!r} has no AVSynth scene graph ({type(e).__name__}: {e}); media pretraining learns from "
            "AVSynth scenes: set model.media_pretraining: null for converted datasets and use pretrained encoders"
        ) from None
    moods = torch.zeros(t, len(vocab.MOODS))
    moods[:, mood] = 1
    return torch.cat([visible, column, row], dim=1), torch.cat([sounding, loudest, moods], dim=1)


def _stack(clips: Iterable[Clip], limit: int | None = None) -> dict[str, torch.Tensor]:
    """``frames uint8 [N, T, 3, H, W]`` (segment frames), ``audio [N, S]``, targets ``[N, T, *]``."""
    frames, audio, vision, hearing = [], [], [], []
    for clip in clips:
        if limit is not None and len(frames) >= limit:
            break
        v, a = segment_targets(clip.scene, clip.key)
        frames.append(clip.frames[segment_frames(clip.frames.shape[0], clip.num_segments)])
        audio.append(clip.audio)
        vision.append(v)
        hearing.append(a)
    if not frames:
        raise PretrainingDataError("media pretraining found no usable clip in the training shards")
    return {"frames": torch.stack(frames), "audio": torch.stack(audio),
            "vision": torch.stack(vision), "audio_targets": torch.stack(hearing)}


class MediaPretraining:
    """Stage-1 pretraining of the encoders and connectors (the model's ``media_pretraining``).

    Args:
        epochs: passes over the training clips (a learning-curve point after each).
        learning_rate: AdamW learning rate (constant after a linear warm-up over 5 % of the steps).
        clips_per_batch: clips per step.
        eval_clips: validation clips scored for the learning curve.
        freeze_encoders: freeze the encoders afterwards (as the reference systems freeze their
            pretrained encoders); the connectors stay trainable.
        cache: reuse (and write) the result under ``$AVMT_CACHE/media-pretraining/``.
        seed: batch order and probe initialization.
    """

    def __init__(
        self,
        epochs: int = 5,
        learning_rate: float = 2e-3,
        clips_per_batch: int = 16,
        eval_clips: int = 100,
        freeze_encoders: bool = True,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        for name, value in (("epochs", epochs), ("clips_per_batch", clips_per_batch), ("eval_clips", eval_clips)):
            if int(value) < 1:
                raise UserError(f"model.media_pretraining.{name} must be >= 1, got {value}")
        self.epochs = int(epochs)
        self.learning_rate = float(learning_rate)
        self.clips_per_batch = int(clips_per_batch)
        self.eval_clips = int(eval_clips)
        self.freeze_encoders = bool(freeze_encoders)
        self.cache = bool(cache)
        self.seed = int(seed)
        self.curve: list[dict[str, float]] = []

    def settings(self) -> dict[str, Any]:
        """The settings that change the result (part of the cache fingerprint)."""
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "clips_per_batch": self.clips_per_batch,
                "eval_clips": self.eval_clips, "seed": self.seed}

    def fingerprint(self, model: nn.Module, train_shards: Sequence[Path]) -> str:
        """Hex digest of the settings, the parts' structure and initial weights, and the shard files."""
        digest = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, **self.settings()}, sort_keys=True).encode())
        for name in _PARTS:
            part = getattr(model, name)
            digest.update(repr(part).encode())
            tensors = {**part.state_dict(), **dict(part.named_buffers())}  # non-persistent buffers too (pixel mean/std)
            for key, tensor in sorted(tensors.items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for path in train_shards:
            path = Path(path)
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()[:16]

    def apply(self, model: nn.Module, train_shards: Sequence[Path], val_shards: Sequence[Path],
              device: torch.device | str = "cpu") -> list[dict[str, float]]:
        """Pretrain ``model``'s encoders and connectors (or load the cached result), then freeze the
        encoders when configured.

        Args:
            model: an :class:`~avmt.model.AVModel`.
            train_shards, val_shards: AVSynth shard files of the training and validation clips.
            device: where to train.
        Returns:
            the learning curve, one point per epoch: ``[{"step", "epoch", "loss", "vision_accuracy",
            "vision_baseline", "audio_accuracy", "audio_baseline", "mood_accuracy"}, ...]`` (baselines:
            all-absent answers).
        """
        from avmt.data.datamodule import default_cache_dir
        from avmt.data.shards import dir_lock

        folder = default_cache_dir() / "media-pretraining" / self.fingerprint(model, train_shards)
        weights = folder / "weights.pt"
        with dir_lock(folder):
            if self.cache and weights.is_file():
                saved = torch.load(weights, map_location="cpu", weights_only=True)
                self.curve = json.loads((folder / "curve.json").read_text())
                rank_zero_info(f"media pretraining: loaded from {folder}")
            else:
                saved = self._train(model, train_shards, val_shards, device)
                if self.cache:
                    _save(folder, saved, self.curve, self.settings())
        for name in _PARTS:
            getattr(model, name).load_state_dict(saved[name])
        self.freeze(model)
        return self.curve

    def freeze(self, model: nn.Module) -> None:
        """Freeze ``model``'s encoders when ``freeze_encoders`` is set, as after stage 1.

        A checkpoint of a fit that ran stage 1 holds the stage-1 encoder weights; validate, test and
        predict call this so that the encoders are frozen there as they were in training (and the
        feature cache, which accepts only frozen encoders, can serve them).
        """
        if self.freeze_encoders:
            model.vision_encoder._apply_freeze(True)
            model.audio_encoder._apply_freeze(True)

    def _train(self, model: nn.Module, train_shards: Sequence[Path], val_shards: Sequence[Path],
               device: torch.device | str) -> dict[str, dict[str, torch.Tensor]]:
        from avmt.data.shards import iter_clips

        started = time.time()
        train = _stack(iter_clips(list(train_shards)))
        val = _stack(iter_clips(list(val_shards)), limit=self.eval_clips)
        parts = nn.ModuleDict({name: getattr(model, name) for name in _PARTS})
        modes = {name: part.training for name, part in parts.items()}
        original_device = next(parts.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        width = model.llm.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            probes = nn.ModuleDict({
                "vision": nn.Linear(width, sum(size for _, size in VISION_TARGETS)),
                "audio": nn.Linear(width, sum(size for _, size in AUDIO_TARGETS)),
            })
        parts.to(device).train()
        probes.to(device)
        parameters = [p for p in [*parts.parameters(), *probes.parameters()] if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=0.0)
        num_train = train["frames"].shape[0]
        steps_per_epoch = -(-num_train // self.clips_per_batch)
        warmup = max(1, self.epochs * steps_per_epoch // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        loss_fn = nn.BCEWithLogitsLoss()
        step, self.curve = 0, []
        for epoch in range(1, self.epochs + 1):
            total = 0.0
            for index in torch.randperm(num_train, generator=generator).split(self.clips_per_batch):
                step += 1
                vision_logits, audio_logits = _probe_logits(model, probes, train["frames"][index].to(device),
                                                            train["audio"][index].to(device))
                loss = loss_fn(vision_logits, train["vision"][index].to(device)) + loss_fn(
                    audio_logits, train["audio_targets"][index].to(device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"media pretraining: the loss is {loss.item()} at step {step}; lower "
                                             "model.media_pretraining.learning_rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(index)
            point = {"step": step, "epoch": epoch, "loss": total / num_train, **_evaluate(model, probes, val, device, self.clips_per_batch)}
            parts.train()
            self.curve.append(point)
            rank_zero_info(
                f"media pretraining epoch {epoch}/{self.epochs} (step {step}): loss {point['loss']:.3f}, visible "
                f"classes {point['vision_accuracy']:.3f} (all-absent {point['vision_baseline']:.3f}), sounding "
                f"classes {point['audio_accuracy']:.3f} (all-silent {point['audio_baseline']:.3f}), mood "
                f"{point['mood_accuracy']:.3f} "
                f"[{time.time() - started:.0f} s]"
            )
        parts.to(original_device)
        for name, part in parts.items():
            part.train(modes[name])
        return {name: {k: v.detach().cpu().clone() for k, v in part.state_dict().items()} for name, part in parts.items()}


def _segment_mean(tokens: torch.Tensor, segments: int, kind: str) -> torch.Tensor:
    """Connector tokens ``[C, T·k, D]`` -> the mean token of each segment ``[C, T, D]``."""
    if tokens.shape[1] % segments:
        raise UserError(f"media pretraining needs the {kind} connector to give k tokens per segment; it gives "
                         f"{tokens.shape[1]} for {segments} segments (set model.media_pretraining: null)")
    return tokens.view(tokens.shape[0], segments, -1, tokens.shape[-1]).mean(dim=2)


def _probe_logits(model: nn.Module, probes: nn.ModuleDict, frames: torch.Tensor, audio: torch.Tensor):
    """Probe logits ``vision [C, T, 6K]`` and ``audio [C, T, 2K + M]`` of segment frames ``[C, T, 3, H, W]``
    and waveforms ``[C, S]``, encoded as the model encodes media (:meth:`~avmt.model.AVModel.encode_media`)."""
    t = frames.shape[1]
    media = model.encode_media(frames, audio)

    def tokens(connector: nn.Module, features: torch.Tensor) -> torch.Tensor:
        context = media.features(getattr(connector, "context_modality", None))  # a cross-modal connector's other modality
        return connector(features, *(() if context is None else (context,)))

    return (probes["vision"](_segment_mean(tokens(model.vision_connector, media.vision), t, "vision")),
            probes["audio"](_segment_mean(tokens(model.audio_connector, media.audio), t, "audio")))


@torch.no_grad()
def _evaluate(model: nn.Module, probes: nn.ModuleDict, val: dict[str, torch.Tensor], device,
              batch_size: int) -> dict[str, float]:
    """Per-segment exact-match accuracy of the visible and sounding class sets and of all-absent answers, and
    the accuracy of the mood read from each segment's audio tokens."""
    for name in _PARTS:
        getattr(model, name).eval()
    k = len(vocab.CLASSES)
    vision_hits = audio_hits = vision_empty = audio_empty = mood_hits = 0.0
    count = 0
    for start in range(0, val["frames"].shape[0], batch_size):
        rows = slice(start, start + batch_size)
        vision_logits, audio_logits = _probe_logits(model, probes, val["frames"][rows].to(device), val["audio"][rows].to(device))
        visible, sounding = val["vision"][rows, :, :k].to(device), val["audio_targets"][rows, :, :k].to(device)
        vision_hits += ((vision_logits[..., :k] > 0).float() == visible).all(-1).sum().item()
        audio_hits += ((audio_logits[..., :k] > 0).float() == sounding).all(-1).sum().item()
        mood = val["audio_targets"][rows, :, 2 * k :].to(device)
        mood_hits += (audio_logits[..., 2 * k :].argmax(-1) == mood.argmax(-1)).sum().item()
        vision_empty += (visible.sum(-1) == 0).sum().item()
        audio_empty += (sounding.sum(-1) == 0).sum().item()
        count += visible.shape[0] * visible.shape[1]
    return {"vision_accuracy": vision_hits / count, "audio_accuracy": audio_hits / count,
            "vision_baseline": vision_empty / count, "audio_baseline": audio_empty / count,
            "mood_accuracy": mood_hits / count}


def _save(folder: Path, saved: dict, curve: list[dict[str, float]], settings: dict[str, Any]) -> None:
    """Write ``weights.pt`` and ``curve.json`` atomically (the weights last: their presence marks a result)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curve.json").write_text(json.dumps(curve, indent=1))
    (folder / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    tmp = folder / ".weights.pt.tmp"
    torch.save(saved, tmp)
    os.replace(tmp, folder / "weights.pt")
