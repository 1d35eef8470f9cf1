"""Qwen2.5-Omni (Crab+'s backbone) as three avmt plugins that share one loaded thinker.

Qwen2.5-Omni's *thinker* (transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``) holds an
audio tower, a vision tower and a causal LLM; both towers end in a projection to the LLM's width,
and the LLM numbers its tokens with TMRoPE (3-D temporal/height/width rotary positions). Each
part is the plugin of its kind here, so Crab+ is one YAML (``experiments/qwen_omni.yaml``) and
each part can also be combined with avmt's other plugins:

* :class:`QwenOmniLM` (a :class:`~avmt.llm.CausalLM`): the thinker without its towers and Qwen's
  tokenizer; :meth:`QwenOmniLM.position_ids` numbers avmt's prompts with TMRoPE.
* :class:`QwenOmniVisionEncoder`: the vision tower behind Qwen's patching (below).
* :class:`QwenOmniAudioEncoder`: the audio tower on 128-bin Whisper log-mel features
  (:class:`WhisperLogMel`, torch, equal to ``WhisperFeatureExtractor(feature_size=128)``).
* :class:`avmt.connectors.DirectConnector` passes the towers' tokens to the LLM as Crab+ does.

**Loading and sharing.** The plugins name the same checkpoint (a hub id such as
``Qwen/Qwen2.5-Omni-7B`` or a local folder). The first one built loads the thinker ONCE with
``from_pretrained``, splits it into its three parts (``"llm"``: the thinker with its towers
detached, ``"vision"``, ``"audio"``) and each plugin takes its own part; loads are keyed by
(checkpoint, dtype), so give the three plugins the same dtype. The split parts are held by the
plugins that took them (and any part not taken yet by the plugins of that load), not by a global
cache: nothing outlives the model.

**Built from an architecture.** Each plugin takes an optional ``config``: the thinker's
architecture (``model_type: qwen2_5_omni_thinker`` plus the sizes that differ from
``Qwen2_5OmniThinkerConfig``'s defaults, sub-configs as nested dicts; write it once with a YAML
anchor and alias it in the other two plugins). When the checkpoint is loaded, every key written
must equal the checkpoint's. ``python -m avmt inspect`` builds the thinker from it on the meta
device instead of loading it, and ``model: null`` builds a randomly initialized thinker of that
architecture (a tiny one trains on a CPU, ``experiments/seeds/crab_plus_tiny.yaml``) with avmt's
offline tokenizer, whose size becomes the text model's ``vocab_size``. A thinker built from a
config is built by each plugin for itself (random weights are not shared; on the meta device
there is nothing to share). Why not read only each plugin's tensors from the safetensors
shards: the released checkpoint stores ``thinker.model.*`` / ``thinker.visual.*`` /
``thinker.audio_tower.*`` next to the talker's weights, and transformers maps these names onto
its current module tree with a conversion table that changes between versions, skips the talker
and reports missing or mismatched keys (an error here); partial reading would have to copy that
table. One load through ``from_pretrained`` reads each thinker tensor once, with the same result.

**Video.** avmt gives the vision encoder one frame per segment ``[B, T, 3, H, W]`` (the middle
frame of each segment). Qwen's video patches are ``temporal_patch_size`` (2) frames deep: Qwen
samples 2 frames per second and merges each pair into one temporal patch of 1 s. Here a segment's
frame fills both slots of its temporal patch (what Qwen's processor does with a still image), so
T' = T: temporal patch t is segment t, the output keeps the contract ``[B, T, P, D]``, and segment
t's features depend on frame t only (the tower attends within one temporal patch). Frames are
resized to ``image_size`` (a multiple of ``patch_size * spatial_merge_size`` = 28), CLIP-normalized
as Qwen's image processor does, cut into 14-px patches, and every 2 x 2 patches become one token:
``P = (H / 28) * (W / 28)`` tokens per segment, row-major on an ``(H/28, W/28)`` grid.

**Audio.** The tower reads the whole clip's log-mel features (100 frames per second; it attends
within 2-s chunks) and emits one token per 40 ms. The T windows of the contract are consecutive
runs of these tokens: ``tokens_per_segment`` of them per window when the clip holds exactly that
many (25 per 1-s segment, Qwen's native rate), otherwise the clip's tokens are average-pooled
into ``T * tokens_per_segment`` time bins.

**TMRoPE** (:func:`tmrope_position_ids`) follows the thinker's ``get_rope_index``: text tokens
count up by one in all three axes; a media block starts one id after its (virtual) start marker,
``<|vision_bos|>`` / ``<|audio_bos|>`` (avmt's prompts hold no markers, but the ids are those
Qwen gives the same prompt with its markers around each block); video token (t, h, w) of a block
starting at s gets ``(s + int(t * seconds_per_segment * 25), s + h, s + w)``, an image token
``(s, s + h, s + w)``, audio token j ``s + int(j * 25 * d)`` in all three axes, d being one
audio token's duration (a segment's ``seconds_per_segment`` over its tokens): at the tower's
native 40 ms per token that is Qwen's ``s + j``, and pooled tokens keep their time (25 ids per
second is Qwen's ``position_id_per_seconds``, so audio and video share one time axis); the text after a
block continues at the block's largest id + 2 (its virtual end marker takes + 1). With
``audio_in_video`` a ``<video>`` block and an ``<audio>`` block next to each other (nothing but
blank text between them) are one audio-visual clip, numbered as Qwen numbers a video with its own
sound track (``use_audio_in_video``): both start at the same id, so a second of sound and the
frame of that second share their temporal ids; Qwen interleaves the two in 2-s chunks in the
sequence, avmt keeps them as two blocks, and each token has the same ids either way. A text-only
prompt gets ordinary positions in all three axes. Generated tokens continue from the last prompt
token's ids + 1, which is Qwen's ``max + 1`` whenever the prompt ends with text (the chat
template's assistant header does).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avmt.encoders import whisper
from avmt.encoders.base import AudioEncoder, VisionEncoder, torch_dtype
from avmt.llm import DEFAULT_SPECIAL_TOKENS, CausalLM, MediaSpan

__all__ = [
    "QwenOmniAudioEncoder",
    "QwenOmniLM",
    "QwenOmniVisionEncoder",
    "WhisperLogMel",
    "claim_thinker_part",
    "tmrope_position_ids",
]

THINKER_PARTS: tuple[str, ...] = ("llm", "vision", "audio")
_MODEL_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")
#: a blank gap between a <video> and an <audio> block that pair is at most this many tokens
_MAX_PAIR_GAP = 4


# --------------------------------------------------------------------------- loading and sharing
class _ThinkerShare:
    """The parts of one loaded thinker that no plugin has taken yet (``part name -> module``)."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.parts = parts


# (checkpoint, dtype) -> the share of its latest load; held by the plugins that took parts, so an
# entry disappears with the last of them (weak values)
_SHARES: weakref.WeakValueDictionary[tuple[str, str], _ThinkerShare] = weakref.WeakValueDictionary()


def _dtype_key(dtype: str, argument: str) -> str:
    """Canonical name of a dtype argument (``"bf16"`` -> ``"bfloat16"``); ``"auto"`` stays."""
    if dtype == "auto":
        return "auto"
    try:
        return str(torch_dtype(dtype)).removeprefix("torch.")
    except ValueError as e:
        raise ValueError(f"{argument}: {e} (or 'auto')") from e


#: the YAML key of each part's plugin's ``config`` (named in errors)
_CONFIG_KEYS = {
    "llm": "model.llm.init_args.config",
    "vision": "model.vision_encoder.init_args.config",
    "audio": "model.audio_encoder.init_args.config",
}


def _require_checkpoint(model: Any, plugin: str, config: dict[str, Any] | None = None) -> str | None:
    """``model``, checked: a checkpoint's name, or ``None`` when ``config`` gives the architecture."""
    if model is None and config is not None:
        return None
    if not isinstance(model, str) or not model.strip():
        raise ValueError(
            f"{plugin}: model must name a Qwen2.5-Omni checkpoint (hub id such as Qwen/Qwen2.5-Omni-7B or a "
            f"local folder), or be null with a config (the architecture of a randomly initialized thinker), "
            f"got {model!r}"
        )
    return model


def claim_thinker_part(
    model: str | None, dtype: str, part: str, config: dict[str, Any] | None = None, random_vocab: int | None = None
) -> tuple[nn.Module, _ThinkerShare | None]:
    """Take one part of the Qwen2.5-Omni thinker in ``model``, loading the thinker if needed.

    The thinker is loaded once per (checkpoint, dtype) and split into :data:`THINKER_PARTS`;
    each part is handed out once. A part asked for again (a second model from the same
    checkpoint) triggers a new load. A thinker built from ``config`` (``model=None``, or an
    inspect build) is built for this call alone.

    Args:
        model: hub id or local folder of a Qwen2.5-Omni (or thinker-only) checkpoint; ``None``:
            random weights of the ``config`` architecture.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or fp32/bf16/fp16) or ``"auto"``.
        part: ``"llm"`` (the thinker with its towers detached), ``"vision"`` or ``"audio"``.
        config: the plugin's ``config`` (the thinker's architecture; checked against a loaded
            checkpoint).
        random_vocab: the text model's ``vocab_size`` of a thinker built from ``config`` (the
            offline tokenizer's size; the LLM plugin passes it).
    Returns:
        ``(module, share)``: the part, and the share the caller keeps a reference to so that the
        parts of this load not taken yet stay available to the other plugins (``None`` for a
        thinker built from ``config``).
    """
    from avmt.inspect import building_without_weights

    if part not in THINKER_PARTS:
        raise ValueError(f"part must be one of {THINKER_PARTS}, got {part!r}")
    dtype_name = _dtype_key(dtype, "torch_dtype" if part == "llm" else "dtype")
    if model is None or building_without_weights():
        return _split_thinker(_build_thinker(config, model, dtype_name, part, random_vocab))[part], None
    key = (os.path.realpath(model) if os.path.isdir(model) else model, dtype_name)  # one key per local folder
    share = _SHARES.get(key)
    if share is None or part not in share.parts:
        share = _ThinkerShare(_split_thinker(_load_thinker(model, dtype_name, config, _CONFIG_KEYS[part])))
        _SHARES[key] = share
    elif config is not None:
        _check_thinker_config(config, model, _CONFIG_KEYS[part])
    return share.parts.pop(part), share


def _build_thinker(
    config: dict[str, Any] | None, model: str | None, dtype_name: str, part: str, random_vocab: int | None
) -> nn.Module:
    """A thinker of the written architecture, randomly initialized (on the meta device under inspect)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from avmt.inspect import config_from_dict

    key = _CONFIG_KEYS[part]
    built = config_from_dict(config, key, model)
    built = getattr(built, "thinker_config", built)  # a whole Qwen2.5-Omni config: its thinker
    if built.model_type not in _MODEL_TYPES:
        raise ValueError(f"{key}: model_type {built.model_type!r} is not a Qwen2.5-Omni architecture "
                         f"({' or '.join(_MODEL_TYPES)})")
    if random_vocab is not None:
        built.get_text_config().vocab_size = int(random_vocab)
    dtype = torch.float32 if dtype_name == "auto" else getattr(torch, dtype_name)
    return Qwen2_5OmniThinkerForConditionalGeneration._from_config(built, dtype=dtype)


def _check_thinker_config(config: dict[str, Any], model: str, key: str) -> None:
    """The written architecture must be the checkpoint's (:func:`avmt.inspect.check_written_config`)."""
    from transformers import AutoConfig

    from avmt.inspect import check_written_config

    check_written_config(config, AutoConfig.from_pretrained(model), key, model)


def _load_thinker(model: str, dtype_name: str, written: dict[str, Any] | None = None, key: str = "") -> nn.Module:
    """``Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`` with a strict key check; the
    ``written`` architecture (the plugin's ``config``, YAML key ``key``) checked against the checkpoint's."""
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from avmt.inspect import check_written_config

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise OSError(
            f"could not read the Qwen2.5-Omni checkpoint {model!r} (a hub id such as Qwen/Qwen2.5-Omni-7B or a "
            f"local folder with its config.json and weights is expected): {e}"
        ) from e
    if config.model_type not in _MODEL_TYPES:
        raise ValueError(
            f"{model!r} holds a {config.model_type!r} model; the avmt.omni plugins load Qwen2.5-Omni checkpoints "
            f"(model_type {' or '.join(_MODEL_TYPES)})"
        )
    check_written_config(written, config, key, model)
    dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
    try:
        thinker, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            model, dtype=dtype, output_loading_info=True
        )
    except OSError as e:
        raise OSError(f"could not load the Qwen2.5-Omni thinker weights from {model!r}: {e}") from e
    problems = [
        f"{name.replace('_', ' ')} {sorted(str(k) for k in keys)[:10]}"
        for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (keys := info.get(name))
    ]
    if problems:
        raise ValueError(
            f"the weights in {model!r} do not fit transformers' Qwen2_5OmniThinkerForConditionalGeneration: "
            f"{'; '.join(problems)}. Is it a complete Qwen2.5-Omni checkpoint for this transformers version?"
        )
    return thinker


def _split_thinker(thinker: nn.Module) -> dict[str, nn.Module]:
    """``{"llm": thinker without towers, "vision": its vision tower, "audio": its audio tower}``.

    The towers are detached from the thinker so that no module is owned twice (one state-dict
    entry per weight, and an adapter scoped to the LLM never reaches into a tower).
    """
    inner = thinker.model
    vision, audio = inner.visual, inner.audio_tower
    inner.visual = None
    inner.audio_tower = None
    return {"llm": thinker, "vision": vision, "audio": audio}


# --------------------------------------------------------------------------- TMRoPE
def _block_offsets(span: MediaSpan, position_id_per_seconds: int, seconds_per_segment: float) -> torch.Tensor:
    """TMRoPE ids of one block of ``span`` relative to its first id: ``long [3, block_length]``."""
    if span.kind == "audio":  # one id per 40 ms (the tower's native token: Qwen's arange)
        ids_per_token = position_id_per_seconds * seconds_per_segment * span.segments / span.block_length
        times = torch.floor(torch.arange(span.block_length, dtype=torch.float64) * ids_per_token + 1e-6).long()
        return times.expand(3, -1)
    if span.kind not in ("video", "image"):
        raise ValueError(
            f"media_layout: unknown kind {span.kind!r} for token id {span.token_id}; use video, audio or image"
        )
    rows, cols = span.grid
    segments = span.segments
    if span.kind == "video":  # as get_rope_index: arange(grid_t) * second_per_grid * position_id_per_seconds
        times = (torch.arange(segments) * torch.tensor(seconds_per_segment, dtype=torch.float32)
                 * position_id_per_seconds).long()
    else:
        times = torch.zeros(segments, dtype=torch.long)
    temporal = times.repeat_interleave(rows * cols)
    height = torch.arange(rows).repeat_interleave(cols).repeat(segments)
    width = torch.arange(cols).repeat(rows * segments)
    return torch.stack([temporal, height, width])


def _media_blocks(ids: torch.Tensor, offsets: Mapping[int, tuple[MediaSpan, torch.Tensor]]) -> list[tuple]:
    """``[(start, end, span, offsets)]`` of every media block of one row ``ids [n]``, in order.

    A run of one placeholder id holds one or more consecutive blocks (two clips' ``<video>`` next
    to each other); its length must be a whole number of blocks.
    """
    token_ids = torch.tensor(sorted(offsets), dtype=ids.dtype)
    positions = torch.nonzero(torch.isin(ids, token_ids)).squeeze(1)
    if positions.numel() == 0:
        return []
    values = ids[positions]
    breaks = (positions[1:] != positions[:-1] + 1) | (values[1:] != values[:-1])
    firsts = [0, *(torch.nonzero(breaks).squeeze(1) + 1).tolist()]
    lasts = [*(first - 1 for first in firsts[1:]), positions.numel() - 1]
    blocks: list[tuple] = []
    for first, last in zip(firsts, lasts):
        start, end = int(positions[first]), int(positions[last]) + 1
        span, block_offsets = offsets[int(values[first])]
        if (end - start) % span.block_length:
            raise ValueError(
                f"media_layout: a run of {end - start} {span.kind} tokens (id {span.token_id}) is not a whole "
                f"number of blocks of {span.block_length} ({span.segments} segments x {span.grid[0]} x "
                f"{span.grid[1]} grid); the placeholders must be expanded as the layout says (AVModel.tokenize does)"
            )
        for block_start in range(start, end, span.block_length):
            blocks.append((block_start, block_start + span.block_length, span, block_offsets))
    return blocks


def _row_positions(
    ids: torch.Tensor,
    offsets: Mapping[int, tuple[MediaSpan, torch.Tensor]],
    pairs: Callable[[torch.Tensor], bool] | None,
) -> torch.Tensor:
    """TMRoPE ids ``long [3, n]`` of one unpadded row ``ids [n]`` (see the module docstring)."""
    positions = torch.empty(3, ids.numel(), dtype=torch.long)
    next_id = 0  # id of the next text token
    cursor = 0  # first token not numbered yet
    previous: tuple[str, int, int] | None = None  # the unpaired video/audio block before: (kind, first id, max id)
    for start, end, span, block in _media_blocks(ids, offsets):
        gap = ids[cursor:start]
        kinds = {span.kind, previous[0]} if previous is not None else set()
        if pairs is not None and kinds == {"video", "audio"} and pairs(gap):
            _, first, previous_max = previous
            positions[:, cursor:start] = first - 1  # the blank gap sits with the (virtual) start markers
            positions[:, start:end] = block + first
            next_id = max(previous_max, first + int(block.max())) + 2
            previous = None
            cursor = end
            continue
        positions[:, cursor:start] = torch.arange(next_id, next_id + gap.numel())
        first = next_id + gap.numel() + 1  # the virtual start marker takes the id before
        positions[:, start:end] = block + first
        block_max = first + int(block.max())
        next_id = block_max + 2  # the virtual end marker takes block_max + 1
        previous = (span.kind, first, block_max) if span.kind in ("video", "audio") else None
        cursor = end
    positions[:, cursor:] = torch.arange(next_id, next_id + ids.numel() - cursor)
    return positions


def tmrope_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    media_layout: Mapping[str, MediaSpan],
    position_id_per_seconds: int = 25,
    seconds_per_segment: float = 1.0,
    pairs: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Qwen2.5-Omni's TMRoPE position ids for prompts in avmt's layout (rules: module docstring).

    Args:
        input_ids: ``long [B, L]`` with each placeholder expanded to its blocks.
        attention_mask: ``[B, L]``, 1 = token, 0 = padding (left or right).
        media_layout: placeholder -> :class:`~avmt.llm.MediaSpan` (kind video / audio / image).
        position_id_per_seconds: temporal ids per second (the thinker config's; 25).
        seconds_per_segment: duration of one video segment.
        pairs: ``pairs(gap_ids [g]) -> bool``: whether a video block and an audio block separated
            by ``gap_ids`` are one clip's picture and sound (numbered on one time axis); ``None``
            numbers every block on its own.
    Returns:
        ``long [3, B, L]`` (temporal, height, width); padding positions hold 1, as the thinker's.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if seconds_per_segment <= 0:
        raise ValueError(f"seconds_per_segment must be > 0, got {seconds_per_segment}")
    offsets = {
        span.token_id: (span, _block_offsets(span, position_id_per_seconds, seconds_per_segment))
        for span in media_layout.values()
    }
    ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu().bool()
    positions = torch.ones(3, *input_ids.shape, dtype=torch.long)
    for row in range(input_ids.shape[0]):
        positions[:, row, mask_cpu[row]] = _row_positions(ids_cpu[row, mask_cpu[row]], offsets, pairs)
    return positions.to(input_ids.device)


# --------------------------------------------------------------------------- the LLM
class QwenOmniLM(CausalLM):
    """Qwen2.5-Omni's thinker LLM (its towers detached) with Qwen's tokenizer and TMRoPE positions.

    Args:
        model: hub id or local folder of a Qwen2.5-Omni checkpoint (``Qwen/Qwen2.5-Omni-7B``, or a
            folder holding a saved thinker) with its tokenizer.
        special_tokens: avmt's tokens added to Qwen's tokenizer, each with a new trainable row.
        seconds_per_segment: duration of one avmt segment in seconds (video segment t gets the
            temporal id ``int(t * seconds_per_segment * 25)``).
        audio_in_video: number a ``<video>`` block and an ``<audio>`` block that stand next to each
            other (blank text between at most) on one time axis, as Qwen numbers a video with its
            sound track; ``False`` numbers each block after the previous one.
        options: further :class:`~avmt.llm.CausalLM` options (``torch_dtype`` -- use the encoders'
            ``dtype`` so the three plugins share one load --, ``train_modules``,
            ``gradient_checkpointing``, ``system_prompt``, ``config`` -- the thinker's architecture, see
            the module docstring --, ...); the tiny-config ones are unused.
    """

    def __init__(
        self,
        model: str | None,
        special_tokens: list[str] = DEFAULT_SPECIAL_TOKENS,
        seconds_per_segment: float = 1.0,
        audio_in_video: bool = True,
        **options: Any,
    ) -> None:
        _require_checkpoint(model, "QwenOmniLM", options.get("config"))
        if not seconds_per_segment > 0:
            raise ValueError(f"QwenOmniLM: seconds_per_segment must be > 0, got {seconds_per_segment!r}")
        super().__init__(model=model, special_tokens=special_tokens, **options)
        self.seconds_per_segment = float(seconds_per_segment)
        self.audio_in_video = bool(audio_in_video)
        self.position_id_per_seconds = int(self.model.config.position_id_per_seconds)

    def load_checkpoint(
        self, model: str | None, gguf_file: str | None, torch_dtype: str, config: dict[str, Any] | None = None,
        random_vocab: int | None = None,
    ):
        """Qwen's tokenizer and the thinker's ``"llm"`` part (shared load, see the module docstring); a
        thinker built from ``config`` comes with no tokenizer (``None``: the offline one is used)."""
        from transformers import AutoTokenizer

        from avmt.inspect import building_without_weights

        if gguf_file is not None:
            raise ValueError(
                f"QwenOmniLM: gguf_file is not supported (got {gguf_file!r}); name a transformers checkpoint"
            )
        thinker, self._thinker_share = claim_thinker_part(model, torch_dtype, "llm", config, random_vocab)
        if model is None or building_without_weights():
            return None, thinker
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load the tokenizer of the Qwen2.5-Omni checkpoint {model!r}: {e}") from e
        return tokenizer, thinker

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media_layout: Mapping[str, MediaSpan]
    ) -> torch.Tensor:
        """TMRoPE ids (:func:`tmrope_position_ids`).

        Args:
            input_ids: ``long [B, L]``; attention_mask: ``[B, L]``; media_layout: placeholder ->
                :class:`~avmt.llm.MediaSpan`.
        Returns:
            ``long [3, B, L]``.
        """
        return tmrope_position_ids(
            input_ids,
            attention_mask,
            media_layout,
            position_id_per_seconds=self.position_id_per_seconds,
            seconds_per_segment=self.seconds_per_segment,
            pairs=self.is_blank if self.audio_in_video else None,
        )

    def is_blank(self, gap_ids: torch.Tensor) -> bool:
        """Whether the tokens ``gap_ids [g]`` between a video and an audio block are nothing but
        whitespace (at most a few tokens): then the blocks pair under ``audio_in_video``."""
        if gap_ids.numel() > _MAX_PAIR_GAP:
            return False
        return not self.tokenizer.decode(gap_ids.tolist()).strip()


# --------------------------------------------------------------------------- vision
def _image_size(image_size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    size = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or [height, width], got {image_size!r}")
    return int(size[0]), int(size[1])


class QwenOmniVisionEncoder(VisionEncoder):
    """Qwen2.5-Omni's vision tower: frames ``[B, T, 3, H, W]`` -> merged patch tokens ``[B, T, P, D]``.

    Args:
        model: hub id or local folder of a Qwen2.5-Omni checkpoint (shared load with the other
            plugins naming it).
        image_size: frames are resized to this (an int or ``[height, width]``, multiples of
            ``patch_size * spatial_merge_size`` = 28); ``P = (height / 28) * (width / 28)``.
        freeze: turn off the tower's gradients and keep it in eval mode (adapters injected with
            scope ``vision`` still train).
        dtype: dtype of the loaded weights (the same as the other plugins' to share one load).
        config: the thinker's architecture (module docstring); with ``model=None`` a random tower of it.

    ``D`` is the tower's ``out_hidden_size`` (the LLM's width). Each segment's frame fills both
    slots of its temporal patch, so T' = T (module docstring).
    """

    def __init__(
        self,
        model: str | None,
        image_size: int | list[int] = 224,
        freeze: bool = True,
        dtype: str = "float32",
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.model_name = _require_checkpoint(model, "QwenOmniVisionEncoder", config)
        height, width = _image_size(image_size)
        self.backbone, self._thinker_share = claim_thinker_part(model, dtype, "vision", config)
        self.pretrained = model is not None
        config = self.backbone.config
        self.patch_size = int(config.patch_size)
        self.temporal_patch_size = int(config.temporal_patch_size)
        self.spatial_merge_size = int(config.spatial_merge_size)
        unit = self.patch_size * self.spatial_merge_size
        if height % unit or width % unit:
            raise ValueError(
                f"QwenOmniVisionEncoder: image_size {image_size!r} must be a multiple of patch_size x "
                f"spatial_merge_size = {self.patch_size} x {self.spatial_merge_size} = {unit} (e.g. 224 or 448)"
            )
        self.image_size = (height, width)
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._apply_freeze(freeze)

    @property
    def output_dim(self) -> int:
        """D, the tower's output width (``out_hidden_size``, the LLM's width)."""
        return int(self.backbone.config.out_hidden_size)

    @property
    def grid(self) -> tuple[int, int]:
        """``(H / 28, W / 28)``: the merged tokens of a frame, row-major."""
        unit = self.patch_size * self.spatial_merge_size
        return self.image_size[0] // unit, self.image_size[1] // unit

    @property
    def num_patches(self) -> int:
        """P, merged tokens per frame."""
        rows, cols = self.grid
        return rows * cols

    def pixel_patches(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen's pixel patches of a batch of clips, one temporal patch per segment.

        Args:
            video: ``[B, T, 3, H, W]`` uint8 (0..255) or float (0..1).
        Returns:
            ``pixel_values [B * T * h * w, 3 * temporal_patch_size * patch_size²]`` float32 (h, w: the
            14-px patch grid; the order of Qwen's image processor: per frame, merge blocks
            row-major, the 2 x 2 patches of a block, each patch channel-major then temporal) and
            ``grid_thw long [B, 3]`` = ``(T, h, w)`` per clip.
        """
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        clips, segments = video.shape[:2]
        frames = video.flatten(0, 1)
        frames = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
        if tuple(frames.shape[-2:]) != self.image_size:
            frames = F.interpolate(
                frames, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            )
            frames = frames.clamp(0.0, 1.0)  # as resizing 8-bit frames does
        frames = (frames - self.pixel_mean) / self.pixel_std
        n, channels, height, width = frames.shape
        patch, merge = self.patch_size, self.spatial_merge_size
        rows, cols = height // patch, width // patch
        blocks = frames.view(n, channels, rows // merge, merge, patch, cols // merge, merge, patch)
        blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [n, rows/m, cols/m, m, m, C, p, p]
        blocks = blocks.unsqueeze(6).expand(*blocks.shape[:6], self.temporal_patch_size, patch, patch)
        pixel_values = blocks.reshape(n * rows * cols, channels * self.temporal_patch_size * patch * patch)
        grid_thw = torch.tensor([[segments, rows, cols]] * clips, dtype=torch.long, device=video.device)
        return pixel_values, grid_thw

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Encode every segment's frame.

        Args:
            video: ``[B, T, 3, H, W]`` uint8 (0..255) or float (0..1); resized to ``image_size``.
        Returns:
            ``[B, T, P, D]`` merged patch tokens (row-major on :attr:`grid`), ``D = output_dim``.
        """
        pixel_values, grid_thw = self.pixel_patches(video)
        merged = self.backbone(pixel_values.to(self.dtype), grid_thw=grid_thw).pooler_output
        return merged.reshape(video.shape[0], video.shape[1], self.num_patches, merged.shape[-1])


# --------------------------------------------------------------------------- audio
class WhisperLogMel(whisper.WhisperLogMel):
    """Whisper's log-mel spectrogram as Qwen2.5-Omni's processor computes it (128 bins).

    :class:`avmt.encoders.whisper.WhisperLogMel` built from settings, keeping the clip's valid
    frames (``pad_to_chunk=False``): equal to ``WhisperFeatureExtractor(feature_size=num_mel_bins)``
    on the frames its attention mask keeps, for a clip of any length. ``forward``:
    ``[B, S] -> [B, num_mel_bins, ceil(S / hop_length)]`` float32.

    Args:
        num_mel_bins, sampling_rate, hop_length, n_fft: the feature extractor's settings.
    """

    def __init__(
        self, num_mel_bins: int = 128, sampling_rate: int = 16000, hop_length: int = 160, n_fft: int = 400
    ) -> None:
        super().__init__(
            pad_to_chunk=False, num_mel_bins=num_mel_bins, sampling_rate=sampling_rate, hop_length=hop_length,
            n_fft=n_fft,
        )


class QwenOmniAudioEncoder(AudioEncoder):
    """Qwen2.5-Omni's audio tower: waveform ``[B, S]`` (16 kHz) -> ``[B, T, Q, D]``.

    Args:
        model: hub id or local folder of a Qwen2.5-Omni checkpoint (shared load).
        tokens_per_segment: Q. The tower emits one token per 40 ms of the clip; when the clip holds
            exactly ``T * Q`` of them (Q = 25 for 1-s segments) they are used as they are,
            otherwise they are average-pooled into ``T * Q`` time bins (never more than the clip has).
        freeze: turn off the tower's gradients and keep it in eval mode (adapters injected with
            scope ``audio`` still train).
        dtype: dtype of the loaded weights (the same as the other plugins' to share one load).
        config: the thinker's architecture (module docstring); with ``model=None`` a random tower of it.

    ``D`` is the tower's ``output_dim`` (the LLM's width).
    """

    sample_rate = 16000

    def __init__(
        self, model: str | None, tokens_per_segment: int = 25, freeze: bool = True, dtype: str = "float32",
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model_name = _require_checkpoint(model, "QwenOmniAudioEncoder", config)
        if not isinstance(tokens_per_segment, int) or tokens_per_segment < 1:
            raise ValueError(
                f"QwenOmniAudioEncoder: tokens_per_segment must be a positive int, got {tokens_per_segment!r}"
            )
        self.tokens_per_segment = int(tokens_per_segment)
        self.backbone, self._thinker_share = claim_thinker_part(model, dtype, "audio", config)
        self.pretrained = model is not None
        mel_bins = int(self.backbone.config.num_mel_bins)
        self.log_mel = WhisperLogMel(num_mel_bins=mel_bins, sampling_rate=self.sample_rate)
        self._apply_freeze(freeze)

    @property
    def output_dim(self) -> int:
        """D, the tower's output width (``output_dim``, the LLM's width)."""
        return int(self.backbone.config.output_dim)

    def num_tokens(self, num_samples: int) -> int:
        """Tokens the tower emits for a clip of ``num_samples`` samples (one per 40 ms)."""
        frames = torch.tensor([self.log_mel.num_frames(num_samples)])
        return int(self.backbone._get_feat_extract_output_lengths(frames)[1])

    def forward(self, audio: torch.Tensor, num_segments: int, sample_rate: int | None = None) -> torch.Tensor:
        """Encode each clip, then cut its tokens into the T windows.

        Args:
            audio: ``[B, S]`` float waveform at 16 kHz (mono).
            num_segments: T, the number of video segments.
            sample_rate: rate of ``audio`` when known; must be 16000.
        Returns:
            ``[B, T, Q, D]``, ``Q = tokens_per_segment``; window t covers the t-th T-th of the clip.
        """
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, S], got shape {tuple(audio.shape)}")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise ValueError(
                f"audio at {sample_rate} Hz but Qwen2.5-Omni's audio tower takes {self.sample_rate} Hz; resample when "
                "converting the data"
            )
        segments = int(num_segments)
        if segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        clips, samples = audio.shape
        wanted = segments * self.tokens_per_segment
        available = self.num_tokens(samples)
        if available < wanted:
            raise ValueError(
                f"a clip of {samples} samples ({samples / self.sample_rate:.2f} s) gives {available} audio tokens "
                f"(one per 40 ms), fewer than num_segments x tokens_per_segment = {segments} x "
                f"{self.tokens_per_segment}; lower the audio encoder's tokens_per_segment"
            )
        features = self.log_mel(audio)  # [B, mels, F]
        frames = features.shape[-1]
        lengths = torch.full((clips,), frames, dtype=torch.long, device=audio.device)
        after_cnn, _ = self.backbone._get_feat_extract_output_lengths(lengths)
        stacked = features.permute(1, 0, 2).reshape(features.shape[1], clips * frames)  # clips one after another
        hidden = self.backbone(
            input_features=stacked.to(self.dtype), feature_lens=lengths, aftercnn_lens=after_cnn
        ).last_hidden_state  # [B * available, D]
        hidden = hidden.reshape(clips, available, -1)
        if available != wanted:
            pooled = F.adaptive_avg_pool1d(hidden.transpose(1, 2).float(), wanted)
            hidden = pooled.transpose(1, 2).to(hidden.dtype)
        return hidden.reshape(clips, segments, self.tokens_per_segment, hidden.shape[-1])
