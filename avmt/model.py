"""AVModel: composes encoders, connectors, the LLM and an adapter; splices media tokens.

No training logic lives here (that is :mod:`avmt.module`). The data flow is one direction:

``frames [B,T,3,H,W]`` → vision encoder ``[B,T,P,D_v]`` → vision connector ``[B,N_v,D_llm]``;
``audio [B,S]`` → audio encoder ``[B,T,Q,D_a]`` → audio connector ``[B,N_a,D_llm]``;
the prompt's ``<video>``/``<audio>`` placeholders were expanded to ``N_v``/``N_a`` copies when the
text was tokenized (:meth:`AVModel.tokenize`), and :meth:`AVModel.embed` writes the connector
outputs into those positions with one ``masked_scatter`` per modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from avmt.adapters import Adapter
from avmt.connectors import Connector
from avmt.encoders import AudioEncoder, VisionEncoder
from avmt.llm import CausalLM

IGNORE_INDEX = -100


@dataclass
class TokenizedBatch:
    """Token ids of a batch; all tensors ``[B, L]``.

    ``labels`` is ``IGNORE_INDEX`` over the prompt and the padding (``None`` for generation).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


class AVModel(nn.Module):
    """Vision/audio encoders → connectors → causal LLM with an injected adapter.

    Args:
        llm: the causal language model and its tokenizer.
        vision_encoder: video ``[B,T,3,H,W]`` → ``[B,T,P,D_v]``.
        audio_encoder: waveform ``[B,S]`` → ``[B,T,Q,D_a]``.
        vision_connector: ``[B,T,P,D_v]`` → ``[B,N_v,D_llm]``.
        audio_connector: ``[B,T,Q,D_a]`` → ``[B,N_a,D_llm]``.
        adapter: injected into the LLM (and the encoders when its scopes say so); ``None``
            trains only the connectors and the new token rows.
        num_segments: T, the number of video segments / audio windows per clip.
        segment_embedding: add a learned embedding of the segment index to every media token
            (shared by video and audio, so the tokens of one second carry the same time code);
            it tells the LLM *when* a token was seen or heard, which temporal answers need.
    """

    def __init__(
        self,
        llm: CausalLM,
        vision_encoder: VisionEncoder,
        audio_encoder: AudioEncoder,
        vision_connector: Connector,
        audio_connector: Connector,
        adapter: Adapter | None = None,
        num_segments: int = 10,
        segment_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.vision_encoder = vision_encoder
        self.audio_encoder = audio_encoder
        self.vision_connector = vision_connector
        self.audio_connector = audio_connector
        self.num_segments = num_segments
        vision_connector.build(vision_encoder.output_dim, llm.hidden_size)
        audio_connector.build(audio_encoder.output_dim, llm.hidden_size)
        llm.freeze_base()
        self.adapter = adapter
        if adapter is not None:
            adapter.apply({"llm": llm.model, "vision": vision_encoder, "audio": audio_encoder})
        self.placeholder_ids = {
            "<video>": llm.placeholder_id("<video>"),
            "<audio>": llm.placeholder_id("<audio>"),
        }
        self.segment_embedding = nn.Embedding(num_segments, llm.hidden_size) if segment_embedding else None
        if self.segment_embedding is not None:
            nn.init.normal_(self.segment_embedding.weight, std=0.5)
        self.placeholder_lengths = {
            "<video>": vision_connector.num_tokens(num_segments),
            "<audio>": audio_connector.num_tokens(num_segments),
        }

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """The LLM's tokenizer (a transformers tokenizer)."""
        return self.llm.tokenizer

    def format_prompt(self, prompt: str) -> str:
        """Wrap a task prompt in the LLM's chat template when it has one."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _prompt_ids(self, prompt: str) -> list[int]:
        tokenizer = self.tokenizer
        ids = tokenizer(self.format_prompt(prompt), add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        expanded: list[int] = []
        for token_id in ids:
            for name, placeholder_id in self.placeholder_ids.items():
                if token_id == placeholder_id:
                    expanded.extend([placeholder_id] * self.placeholder_lengths[name])
                    break
            else:
                expanded.append(token_id)
        return expanded

    def _target_ids(self, target: str) -> list[int]:
        tokenizer = self.tokenizer
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        return [*ids, tokenizer.eos_token_id]

    def tokenize(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> TokenizedBatch:
        """Tokenize prompts (and targets), expanding each placeholder to its connector's token count.

        With targets: ``prompt + target + eos``, right-padded, labels masked over the prompt and
        padding (training and loss evaluation). Without: prompts only, left-padded (generation).

        Returns:
            TokenizedBatch with ``input_ids``/``attention_mask``/``labels`` of shape ``[B, L]``.
        """
        pad_id = self.tokenizer.pad_token_id
        rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            prompt_ids = self._prompt_ids(prompt)
            if targets is None:
                rows.append(prompt_ids)
                continue
            target_ids = self._target_ids(targets[i])
            rows.append(prompt_ids + target_ids)
            label_rows.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if targets is not None else slice(length - len(row), length)
            input_ids[i, span] = torch.tensor(row)
            attention_mask[i, span] = 1
            if labels is not None:
                labels[i, span] = torch.tensor(label_rows[i])
        return TokenizedBatch(input_ids, attention_mask, labels)

    # ----------------------------------------------------------------- media
    def encode_media(self, frames: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """Connector tokens of each clip.

        Args:
            frames: ``[C, T·F, 3, H, W]`` uint8 video of C clips.
            audio: ``[C, S]`` waveforms.

        Returns:
            ``{"<video>": [C, N_v, D_llm], "<audio>": [C, N_a, D_llm]}``.
        """
        clips, total_frames = frames.shape[:2]
        frames_per_segment = total_frames // self.num_segments
        if frames_per_segment > 1:  # one frame per segment (its middle) feeds the encoder
            frames = frames[:, frames_per_segment // 2 :: frames_per_segment]
        video_tokens = self.vision_connector(self.vision_encoder(frames))
        audio_tokens = self.audio_connector(self.audio_encoder(audio, self.num_segments))
        return {"<video>": self._add_time_codes(video_tokens), "<audio>": self._add_time_codes(audio_tokens)}

    def _add_time_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[C, T·n, D]`` connector tokens (segment by segment) plus their segment's embedding."""
        if self.segment_embedding is None:
            return tokens
        per_segment = tokens.shape[1] // self.num_segments
        codes = self.segment_embedding.weight.repeat_interleave(per_segment, dim=0)  # [T·n, D]
        return tokens + codes.to(tokens.dtype)

    def embed(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor], clip_index: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings with media tokens spliced in at the placeholder positions.

        Args:
            input_ids: ``[B, L]`` with each placeholder already expanded to ``N`` copies.
            media: output of :meth:`encode_media`, one row per clip, ``[C, N, D]``.
            clip_index: ``[B]`` row of ``media`` that sample b uses (samples of one clip share it).

        Returns:
            ``[B, L, D_llm]`` embeddings.
        """
        embeds = self.llm.embed(input_ids)
        for name, tokens in media.items():
            positions = input_ids == self.placeholder_ids[name]  # [B, L]
            has_placeholder = positions.any(dim=1)
            if not has_placeholder.any():
                continue
            features = tokens[clip_index[has_placeholder]].to(embeds.dtype)  # [B', N, D]
            count = int(positions.sum())
            if count != features.shape[0] * features.shape[1]:
                raise ValueError(
                    f"{name}: {count} placeholder positions but {features.shape[0]}×{features.shape[1]} media tokens"
                )
            embeds = embeds.masked_scatter(positions.unsqueeze(-1), features)
        return embeds

    def forward(
        self,
        tokens: TokenizedBatch,
        frames: torch.Tensor,
        audio: torch.Tensor,
        clip_index: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample summed token losses and token counts.

        Args:
            tokens: ``[B, L]`` ids, mask and labels.
            frames: ``[C, T·F, 3, H, W]`` uint8; audio: ``[C, S]``; clip_index: ``[B]``.

        Returns:
            ``[B, 2]``: column 0 the summed cross-entropy over sample b's target tokens,
            column 1 their count.
        """
        media = self.encode_media(frames, audio)
        embeds = self.embed(tokens.input_ids, media, clip_index)
        logits = self.llm(inputs_embeds=embeds, attention_mask=tokens.attention_mask).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = tokens.labels[:, 1:]
        losses = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(shift_labels.shape)
        counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
        return torch.stack([losses.sum(dim=1), counts.to(losses.dtype)], dim=1)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        frames: torch.Tensor,
        audio: torch.Tensor,
        clip_index: torch.Tensor,
        max_new_tokens: int = 64,
    ) -> list[str]:
        """Greedy answers to ``prompts`` (one per sample) about clips ``frames``/``audio``.

        Args:
            prompts: B prompt strings with placeholders.
            frames: ``[C, T·F, 3, H, W]``; audio: ``[C, S]``; clip_index: ``[B]``.

        Returns:
            B decoded answer strings (special tokens removed).
        """
        tokens = self.tokenize(prompts)
        device = frames.device
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device)
        media = self.encode_media(frames, audio)
        embeds = self.embed(input_ids, media, clip_index)
        output_ids = self.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
