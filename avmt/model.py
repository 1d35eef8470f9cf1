"""AVModel: composes encoders, connectors, the LLM, an adapter and heads; splices media tokens.

No training logic lives here (that is :mod:`avmt.module`). The data flow is one direction:

``frames [C,T·F,3,H,W]`` → vision encoder ``[C,T,P,D_v]`` → vision connector ``[C,N_v,D_llm]``
(``<video>``) or, for one segment's frame, the image connector ``[·,N_i,D_llm]`` (``<image>``);
``audio [C,S]`` → audio encoder ``[C,T,Q,D_a]`` → audio connector ``[C,N_a,D_llm]`` (``<audio>``).
Each placeholder of a prompt was expanded to its token count when the text was tokenized
(:meth:`AVModel.tokenize`); :meth:`AVModel.embed` writes, for every placeholder kind, the
features of the clips (and segments) the samples' :class:`~avmt.data.sample.MediaRef` s name
into those positions with one ``masked_scatter``. Heads read the last-layer hidden states at
the positions that predict their special token, together with the encoder features of the
sample's clip, and return dense predictions (e.g. per-frame mask logits). A head may hold a token
group in place of its token (``Head.query_tokens``: written into training targets, forced in
generation once its first token is out, decoded back to the head's token) and may feed its
prediction back into the LLM (``Head.feedback``: added to the input embedding of the group's last
token; a second teacher-forced pass, a greedy loop in generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from avmt.adapters import Adapter
from avmt.connectors import Connector, Instruction
from avmt.data.sample import IGNORE_INDEX, PLACEHOLDERS, Batch, Dense, TokenizedBatch, iter_refs, segment_frames
from avmt.encoders import AudioEncoder, VisionEncoder
from avmt.errors import UserError
from avmt.heads import Head
from avmt.llm import CausalLM, MediaSpan
from avmt.outputs import EncodedMedia, GenerationOutput, ModelOutput

__all__ = ["AVModel", "IGNORE_INDEX", "TokenGroupForcing", "TokenizedBatch"]


class AVModel(nn.Module):
    """Vision/audio encoders → connectors → causal LLM with an injected adapter → heads.

    Args:
        llm: the causal language model and its tokenizer.
        vision_encoder: video ``[C, T, 3, H, W]`` → ``[C, T, P, D_v]``.
        audio_encoder: waveform ``[C, S]`` → ``[C, T, Q, D_a]``.
        vision_connector: ``[C, T, P, D_v]`` → ``[C, N_v, D_llm]`` (the ``<video>`` tokens).
        audio_connector: ``[C, T, Q, D_a]`` → ``[C, N_a, D_llm]`` (the ``<audio>`` tokens).
        adapter: injected into the LLM (and the encoders when its scopes say so); ``None``
            trains only the connectors, heads and new token rows.
        num_segments: T, the number of video segments / audio windows per clip.
        segment_embedding: add a learned embedding of the segment index to every media token
            (shared by video, audio and image tokens, so the tokens of one second carry the same
            time code); it tells the LLM *when* a token was seen or heard.
        media_token_rms: rescale every connector token to this root mean square before its time code
            is added (``None``: as the connector gives it). Stage-1 connectors give tokens ~100x the
            tiny LLM's word embeddings, which then hardly move the residual stream at text positions.
        time_word_rms: also add to every media token of segment ``s`` the LLM's own input embedding
            of the word that answers write for time ``s`` (:meth:`set_time_words`; "3" for the third
            second with tagged text), rescaled to this root mean square (``None``: off). The time
            code is then the very token the answer has to produce for that second.
        image_connector: ``[n, 1, P, D_v]`` → ``[n, N_i, D_llm]`` for ``<image>`` (one segment's
            frame); ``None`` uses the vision connector on that one frame.
        heads: dense heads, each reading the states at its own special token.
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
        image_connector: Connector | None = None,
        heads: Sequence[Head] = (),
        media_token_rms: float | None = None,
        time_word_rms: float | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("media_token_rms", media_token_rms), ("time_word_rms", time_word_rms)):
            if value is not None and not value > 0:
                raise UserError(f"model.{key} must be > 0 (or null), got {value!r}")
        self.media_token_rms = None if media_token_rms is None else float(media_token_rms)
        self.time_word_rms = None if time_word_rms is None else float(time_word_rms)
        self.time_word_ids: list[list[int]] = []  # per segment, the token ids of its time word (set_time_words)
        # the same, padded for one embedding lookup [T, L], and each id's weight in its word's mean [T, L]
        self.register_buffer("_time_word_table", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("_time_word_weights", torch.zeros(0, 0), persistent=False)
        self.llm = llm
        self.vision_encoder = vision_encoder
        self.audio_encoder = audio_encoder
        self.vision_connector = vision_connector
        self.audio_connector = audio_connector
        self.image_connector = image_connector
        self.heads = nn.ModuleList(heads)
        self.num_segments = num_segments
        widths = {"vision": vision_encoder.output_dim, "audio": audio_encoder.output_dim}
        for connector, modality in ((vision_connector, "vision"), (audio_connector, "audio"), (image_connector, "vision")):
            if connector is None:
                continue
            if connector.context_modality is not None and connector.context_modality not in widths:
                raise UserError(f"{type(connector).__name__}.context_modality must be one of {sorted(widths)}, "
                                f"got {connector.context_modality!r}")
            connector.build(widths[modality], llm.hidden_size, widths.get(connector.context_modality))
        outputs = [head.output for head in heads]
        if len(set(outputs)) != len(outputs):
            raise UserError(f"model.heads: two heads produce the same output ({outputs}); each output needs one head")
        for head in heads:
            head.build(llm.hidden_size, vision_encoder.output_dim, audio_encoder.output_dim)
        for head in heads:
            for token in (head.token, *head.query_tokens):
                llm.placeholder_id(token)  # a clear error when the LLM lacks the head's token
        for head in heads:  # a group replaces its head's token in answers: no other head can read either
            if head.query_tokens == (head.token,):
                continue
            for other in heads:
                shared = {head.token, *head.query_tokens} & {other.token, *other.query_tokens}
                if other is not head and shared:
                    raise UserError(f"model.heads: {type(head).__name__} (query_tokens {list(head.query_tokens)}) and "
                                    f"{type(other).__name__} both read {sorted(shared)}; give them their own tokens")
        # head token -> the ids its answers hold in its place (its own id, or its group's)
        self.query_token_ids = {head.token: [llm.placeholder_id(t) for t in head.query_tokens] for head in heads}
        # head token id -> the ids of its group, for the heads whose answers hold a group in its place
        self.token_groups = {llm.placeholder_id(head.token): self.query_token_ids[head.token]
                             for head in heads if head.query_tokens != (head.token,)}
        llm.freeze_base()
        self.adapter = adapter
        if adapter is not None:
            adapter.apply({"llm": llm.model, "vision": vision_encoder, "audio": audio_encoder})
        vocabulary = llm.tokenizer.get_vocab()
        self.placeholder_ids = {name: llm.placeholder_id(name) for name in PLACEHOLDERS if name in vocabulary}
        self.segment_embedding = nn.Embedding(num_segments, llm.hidden_size) if segment_embedding else None
        if self.segment_embedding is not None:
            nn.init.normal_(self.segment_embedding.weight, std=0.5)
        self.placeholder_lengths = {
            "<video>": vision_connector.num_tokens(num_segments),
            "<audio>": audio_connector.num_tokens(num_segments),
            "<image>": (image_connector or vision_connector).num_tokens(1),
        }
        # where each placeholder's tokens sit, for an LLM that numbers media tokens itself (TMRoPE)
        self.media_layout = {name: self._media_span(name) for name in self.placeholder_ids}

    def _media_span(self, name: str) -> MediaSpan:
        """Layout of placeholder ``name``'s tokens: its segments and each segment's token grid (the
        encoder's patch grid when the connector declares ``token_grid`` and keeps it, else ``(1, n)``)."""
        if name == "<audio>":
            connector, segments = self.audio_connector, self.num_segments
        elif name == "<image>":
            connector, segments = self.image_connector or self.vision_connector, 1
        else:
            connector, segments = self.vision_connector, self.num_segments
        tokens = self.placeholder_lengths[name]
        if tokens % segments:
            segments = 1
        grid = (1, tokens // segments)
        token_grid = getattr(connector, "token_grid", None)
        if name != "<audio>" and token_grid is not None:
            kept = token_grid(self.vision_encoder.grid)
            if kept is not None and kept[0] * kept[1] == grid[1]:
                grid = (int(kept[0]), int(kept[1]))
        return MediaSpan(self.placeholder_ids[name], name.strip("<>"), segments, grid)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """The LLM's tokenizer (a transformers tokenizer)."""
        return self.llm.tokenizer

    def format_prompt(self, prompt: str) -> str:
        """Wrap a task prompt in the LLM's chat template when it has one.

        The result is one user turn (after the LLM's ``system_prompt`` when one is set, else the
        template's own default system turn, if any) followed by the template's assistant header, so
        the answer starts right after it; without a template the prompt is returned unchanged.
        """
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None):
            system = getattr(self.llm, "system_prompt", None)
            messages = [{"role": "system", "content": system}] if system is not None else []
            return tokenizer.apply_chat_template(
                [*messages, {"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _prompt_ids(self, prompt: str) -> list[int]:
        tokenizer = self.tokenizer
        ids = tokenizer(self.format_prompt(prompt), add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id, *ids]
        lengths = {self.placeholder_ids[name]: self.placeholder_lengths[name] for name in self.placeholder_ids}
        expanded: list[int] = []
        for token_id in ids:
            expanded.extend([token_id] * lengths.get(token_id, 1))
        return expanded

    def _target_ids(self, target: str) -> list[int]:
        """The answer's ids followed by the id that ends an assistant turn (the chat template's end of
        turn, e.g. ``<|im_end|>`` / ``<|eot_id|>``; the tokenizer's eos without a template), with each
        head token whose head holds a token group written as that group."""
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        if self.token_groups:
            ids = [part for token_id in ids for part in self.token_groups.get(token_id, [token_id])]
        return [*ids, self.llm.end_of_turn_id]

    def tokenize(self, prompts: Sequence[str], targets: Sequence[str] | None = None) -> TokenizedBatch:
        """Tokenize prompts (and targets), expanding each placeholder to its connector's token count.

        With targets: ``prompt + target + end of turn`` (the chat template's end-of-turn token, eos
        without a template), right-padded, labels masked over the prompt (the template's header
        and assistant header included) and padding (training and loss evaluation). Without: prompts only, left-padded (generation).

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
    def encode_media(
        self,
        frames: torch.Tensor,
        audio: torch.Tensor,
        vision_features: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
    ) -> EncodedMedia:
        """Encoder features of each clip: the encoders' outputs, or the cached ones when given.

        Args:
            frames: ``uint8 [C, T·F, 3, H, W]`` video of C clips (the middle frame of each
                segment feeds the encoder, see :func:`~avmt.data.sample.segment_frames`).
            audio: ``[C, S]`` waveforms.
            vision_features: ``[C, T, P, D_v]`` cached vision encoder outputs (a feature cache,
                :mod:`avmt.data.features`); the vision encoder is not run when given.
            audio_features: ``[C, T, Q, D_a]`` cached audio encoder outputs; the audio encoder is
                not run when given.

        Returns:
            EncodedMedia: segment frames ``[C, T, 3, H, W]``, vision ``[C, T, P, D_v]`` with its
            grid, audio ``[C, T, Q, D_a]``, and the encoder's ``feature_layers`` as ``levels``.

        Raises:
            ValueError: cached features whose shape is not what this model's encoders produce.
        """
        frames = frames[:, segment_frames(frames.shape[1], self.num_segments)]
        clips, t = frames.shape[0], self.num_segments
        levels: tuple[torch.Tensor, ...] = ()
        if vision_features is None:
            vision, levels = self.vision_encoder.forward_levels(frames)
        elif self.vision_encoder.feature_layers:
            raise UserError(
                f"vision_encoder.feature_layers {list(self.vision_encoder.feature_layers)}: the heads read these "
                "layers, which a feature cache (data.features) does not hold; run without data.features"
            )
        else:
            expected = (clips, t, self.vision_encoder.num_patches, self.vision_encoder.output_dim)
            vision = _cached_features("vision", vision_features, expected, self.vision_encoder.dtype)
        if audio_features is None:
            encoded_audio = self.audio_encoder(audio, t)
        else:
            expected = (clips, t, self.audio_encoder.tokens_per_segment, self.audio_encoder.output_dim)
            encoded_audio = _cached_features("audio", audio_features, expected, self.audio_encoder.dtype)
        return EncodedMedia(frames=frames, vision=vision, grid=self.vision_encoder.grid, audio=encoded_audio,
                            levels=levels)

    def media_tokens(self, media: EncodedMedia, refs_by_kind: dict[str, list],
                     instructions: Instruction | None = None) -> dict[str, torch.Tensor]:
        """Connector tokens for every media reference, in reference order.

        Args:
            media: the clips' encoder features.
            refs_by_kind: placeholder -> ``[(row, MediaRef), ...]`` (:func:`~avmt.data.sample.iter_refs`).
            instructions: each sample's prompt text (``[B, L, D_llm]``, :meth:`instructions`), for
                the connectors that read it (``Connector.reads_instruction``); they run once per
                reference, the others once per clip. A cross-modal connector
                (``Connector.context_modality``) also gets the same clips' (and segments') features
                of that modality.
        Returns:
            placeholder -> ``[n_refs, N, D_llm]`` (``<video>``/``<audio>`` with their time codes,
            ``<image>`` with its segment's time code).
        """
        out: dict[str, torch.Tensor] = {}
        for name, refs in refs_by_kind.items():
            if not refs:
                continue
            device = media.vision.device
            clips = torch.tensor([ref.clip for _, ref in refs], dtype=torch.long, device=device)
            segments = None
            connector = self.image_connector or self.vision_connector
            if name == "<audio>":
                connector = self.audio_connector
            elif name == "<video>":
                connector = self.vision_connector
            features = media.features("audio" if name == "<audio>" else "vision")
            context = media.features(connector.context_modality)
            if name == "<image>":
                segments = torch.tensor([ref.segment for _, ref in refs], dtype=torch.long, device=device)
                features = features[clips, segments].unsqueeze(1)  # [n, 1, P, D_v]
                context = None if context is None else context[clips, segments].unsqueeze(1)
            extra = () if context is None else (context,)
            if connector.reads_instruction:
                if instructions is None:
                    raise ValueError(f"{type(connector).__name__} reads the prompt but no instructions were given")
                rows = torch.tensor([row for row, _ in refs], dtype=torch.long, device=device)
                if name != "<image>":
                    features, extra = features[clips], tuple(c[clips] for c in extra)
                instruction = Instruction(instructions.embeds[rows], instructions.mask[rows])
                out[name] = self._add_time_codes(connector(features, *extra, instruction), segments)
            elif name == "<image>":
                out[name] = self._add_time_codes(connector(features, *extra), segments)
            else:
                unique, inverse = torch.unique(clips, return_inverse=True)
                tokens = connector(features[unique], *(c[unique] for c in extra))
                out[name] = self._add_time_codes(tokens)[inverse]
        return out

    def instructions(self, input_ids: torch.Tensor, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> Instruction:
        """Each row's prompt text as the LLM embeds it, for connectors that read the prompt.

        Args:
            input_ids: ``[B, L]`` with placeholders expanded.
            embeds: ``[B, L, D_llm]`` their LLM input embeddings.
            prompt_mask: ``bool [B, L]`` the prompt's positions (no padding, no answer tokens).
        Returns:
            Instruction: embeds ``[B, L', D_llm]`` of the prompt tokens that are not media
            placeholders, in order and left-aligned, and their mask ``[B, L']``.
        """
        placeholders = torch.tensor(list(self.placeholder_ids.values()), dtype=input_ids.dtype, device=input_ids.device)
        keep = prompt_mask.bool() & ~torch.isin(input_ids, placeholders)
        lengths = keep.sum(dim=1)
        width = max(1, int(lengths.max()))
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first
        text = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        mask = torch.arange(width, device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        return Instruction(text, mask)

    def set_time_words(self, words: Sequence[str]) -> None:
        """The word answers write for each time ``0..T-1`` (an answer format's ``time(s)``), whose
        input embedding is the segment's time code when ``time_word_rms`` is set.

        Raises:
            UserError: not one word per segment, or a word the tokenizer does not know.
        """
        if len(words) != self.num_segments:
            raise UserError(f"model.time_word_rms needs one time word per segment ({self.num_segments}), "
                            f"got {len(words)}")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        ids = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
        unknown = [word for word, word_ids in zip(words, ids) if not word_ids or unk in word_ids]
        if unknown:
            raise UserError(f"model.time_word_rms: the LLM's tokenizer does not know the time word(s) {unknown}")
        self.time_word_ids = ids
        width, device = max(map(len, ids)), self._time_word_table.device
        self._time_word_table = torch.tensor([w + w[:1] * (width - len(w)) for w in ids], device=device)
        self._time_word_weights = torch.tensor([[1 / len(w)] * len(w) + [0.0] * (width - len(w)) for w in ids],
                                               device=device)

    def time_codes(self) -> torch.Tensor | None:
        """``[T, D]`` what is added to every media token of each segment: the learned segment
        embedding and/or the rescaled embedding of its time word; ``None`` when neither is on."""
        codes = None if self.segment_embedding is None else self.segment_embedding.weight
        if self.time_word_rms is None:
            return codes
        if not self.time_word_ids:
            raise RuntimeError("model.time_word_rms is set but set_time_words was never called")
        embedded = self.llm.embed(self._time_word_table)  # [T, L, D]
        words = (embedded * self._time_word_weights.to(embedded.dtype).unsqueeze(-1)).sum(1)  # each word's mean
        words = nn.functional.rms_norm(words, words.shape[-1:], eps=1e-6) * self.time_word_rms  # [T, D]
        return words if codes is None else codes + words

    def _add_time_codes(self, tokens: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Connector tokens (rescaled to ``media_token_rms`` when set) plus their segment's time code.

        ``tokens [n, T·k, D]`` are segment by segment (``segments`` None), or ``[n, k, D]`` all of
        segment ``segments [n]``.
        """
        if self.media_token_rms is not None:
            tokens = nn.functional.rms_norm(tokens, tokens.shape[-1:], eps=1e-6) * self.media_token_rms
        codes = self.time_codes()
        if codes is None:
            return tokens
        if segments is not None:
            return tokens + codes[segments].unsqueeze(1).to(tokens.dtype)
        per_segment = tokens.shape[1] // self.num_segments
        return tokens + codes.repeat_interleave(per_segment, dim=0).to(tokens.dtype)  # [T·k, D]

    def embed(self, input_ids: torch.Tensor, media: EncodedMedia, refs: Sequence[tuple],
              prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """LLM input embeddings with media tokens spliced in at the placeholder positions.

        Args:
            input_ids: ``[B, L]`` with each placeholder already expanded to ``N`` copies.
            media: the clips' encoder features (:meth:`encode_media`).
            refs: ``[B]`` media references of each sample (``clip`` indexes the clips of ``media``).
            prompt_mask: ``bool [B, L]`` the prompt's positions, which connectors that read the
                prompt see (None: every position; must exclude answer tokens when there are any).

        Returns:
            ``[B, L, D_llm]`` embeddings.
        """
        embeds = self.llm.embed(input_ids)
        refs_by_kind = {name: iter_refs(refs, name) for name in PLACEHOLDERS}
        for name in PLACEHOLDERS:
            placeholder_id = self.placeholder_ids.get(name)
            positions = input_ids == placeholder_id if placeholder_id is not None else None
            wanted = len(refs_by_kind[name]) * self.placeholder_lengths[name]
            found = int(positions.sum()) if positions is not None else 0
            if found != wanted:
                raise ValueError(
                    f"{name}: the prompts hold {found} placeholder positions but their media references ask "
                    f"for {len(refs_by_kind[name])} x {self.placeholder_lengths[name]}; a prompt's placeholders "
                    "and its media references must match one to one"
                )
        instructions = None
        if any(connector is not None and connector.reads_instruction for connector in
               (self.vision_connector, self.audio_connector, self.image_connector)):
            mask = prompt_mask if prompt_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            instructions = self.instructions(input_ids, embeds, mask)
        for name, tokens in self.media_tokens(media, refs_by_kind, instructions).items():
            positions = input_ids == self.placeholder_ids[name]
            embeds = embeds.masked_scatter(positions.unsqueeze(-1), tokens.to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------- heads
    @contextlib.contextmanager
    def _final_states(self) -> Iterator[list[torch.Tensor]]:
        """Collect the LLM's last-layer hidden states (the input of its output head) per call."""
        captured: list[torch.Tensor] = []
        hook = self.llm.model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: captured.append(args[0])
        )
        try:
            yield captured
        finally:
            hook.remove()

    def run_heads(self, states: dict[str, Dense], media: EncodedMedia, anchors: torch.Tensor) -> dict[str, Dense]:
        """Each head on the states at its token.

        Args:
            states: special token -> states with their sample rows (every head's token): ``[M, D_llm]``,
                or ``[M, G, D_llm]`` for a head whose answers hold a group of G tokens.
            media: encoder features of the batch's clips.
            anchors: ``long [B]`` the clip of each sample.
        Returns:
            head output name -> predictions ``[M, ...]`` with the same rows.
        """
        return {head.output: self._run_head(head, states[head.token], media, anchors)[0] for head in self.heads}

    def _run_head(self, head: Head, found: Dense, media: EncodedMedia, anchors: torch.Tensor,
                  feedback: bool = False) -> tuple[Dense, torch.Tensor | None]:
        """``head`` on ``found`` (its queries, rows = samples): its predictions and, with ``feedback``,
        what it feeds back into the LLM (``[M, D_llm]``, or None)."""
        used, clip_index = torch.unique(anchors[found.rows], return_inverse=True)
        clips = media.take(used)
        prediction = head(found.values, clips, clip_index)
        back = head.feedback(prediction, clips, clip_index) if feedback and head.gives_feedback else None
        if back is not None and tuple(back.shape) != (found.rows.shape[0], self.llm.hidden_size):
            raise ValueError(f"{type(head).__name__}.feedback returned shape {tuple(back.shape)}, "
                             f"expected [{found.rows.shape[0]}, {self.llm.hidden_size}]")
        return Dense(found.rows, prediction), back

    def _token_states(self, ids: torch.Tensor, states: torch.Tensor, valid: torch.Tensor | None,
                      state_tokens: Sequence[str]) -> tuple[dict[str, Dense], dict[str, torch.Tensor]]:
        """The states at every head's token group and at the ``state_tokens``.

        Args:
            ids: ``long [B, N]`` tokens; states: ``[B, N, D]`` the state that predicts each of them;
            valid: ``bool [B, N]`` the positions that count (None: all).
        Returns:
            token -> ``Dense(rows, [M, D])`` (``[M, G, D]`` for a head with a group of G tokens), and
            token -> ``long [M]`` the index in ``ids`` of each emission's last group token.
        """
        groups = dict(self.query_token_ids)
        for token in state_tokens:
            groups.setdefault(token, [self.llm.placeholder_id(token)])
        found: dict[str, Dense] = {}
        last: dict[str, torch.Tensor] = {}
        for token, group in groups.items():
            rows, starts = _find_group(ids, group, valid)
            values = states[rows.unsqueeze(1), starts.unsqueeze(1) + torch.arange(len(group), device=ids.device)]
            found[token] = Dense(rows, values if len(group) > 1 else values[:, 0])
            last[token] = starts + len(group) - 1
        return found, last

    # --------------------------------------------------------------- forward
    def forward(self, batch: Batch, return_logits: bool = False, state_tokens: Sequence[str] = ()) -> ModelOutput:
        """Teacher-forced pass over ``batch`` (``batch.tokens`` set, with labels).

        With a head that gives feedback, a first pass gives the states and the heads' predictions,
        and a second pass, with each feedback added to the input embedding of its group's last token,
        gives the logits and the LM loss (the states before that token are the same in both passes).

        Args:
            batch: the batch, tokenized with targets.
            return_logits: also return the logits ``[B, L, V]``.
            state_tokens: special tokens whose states to return besides the heads' tokens.
        Returns:
            ModelOutput: per-sample summed token loss and token count ``[B]``, the encoder features,
            for every head's token (and ``state_tokens``) the last-layer states ``[M, D_llm]`` at the
            target positions that predict it (``[M, G, D_llm]``: those that predict each token of a
            head's group), the heads' predictions there, and the logits when asked.
        """
        tokens = batch.tokens
        if tokens is None or tokens.labels is None:
            raise ValueError("AVModel.forward needs batch.tokens with labels (AVModel.tokenize(prompts, targets))")
        media = self.encode_media(batch.frames, batch.audio, batch.vision_features, batch.audio_features)
        prompt_mask = tokens.attention_mask.bool() & (tokens.labels == IGNORE_INDEX)
        embeds = self.embed(tokens.input_ids, media, batch.media, prompt_mask)
        position_ids = self.llm.position_ids(tokens.input_ids, tokens.attention_mask, self.media_layout)
        positions = {} if position_ids is None else {"position_ids": position_ids}
        with self._final_states() as captured:
            logits = self.llm(inputs_embeds=embeds, attention_mask=tokens.attention_mask, **positions).logits
        hidden = captured[-1]  # [B, L, D]
        shift_labels = tokens.labels[:, 1:]
        # position p predicts p + 1
        states, last = self._token_states(shift_labels, hidden[:, :-1], None, state_tokens)
        anchors = torch.tensor(batch.anchor_clips, dtype=torch.long, device=hidden.device)
        dense: dict[str, Dense] = {}
        fed = embeds
        for head in self.heads:
            dense[head.output], back = self._run_head(head, states[head.token], media, anchors, feedback=True)
            if back is not None and back.shape[0]:  # onto the input of the group's last token (shifted index + 1)
                index = (states[head.token].rows, last[head.token] + 1)
                fed = fed.index_put(index, back.to(fed.dtype), accumulate=True)
        if fed is not embeds:
            logits = self.llm(inputs_embeds=fed, attention_mask=tokens.attention_mask, **positions).logits
        shift_logits = logits[:, :-1].float()
        losses = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(shift_labels.shape)
        counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
        return ModelOutput(
            loss_sum=losses.sum(dim=1),
            token_count=counts.to(losses.dtype),
            media=media,
            states=states,
            dense=dense,
            logits=logits if return_logits else None,
        )

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 64, return_dense: bool = False,
                 state_tokens: Sequence[str] = (), **generate_kwargs: Any) -> GenerationOutput:
        """Greedy answers to ``batch.prompts`` about the batch's clips.

        A head's token group is forced once its first token is emitted (:class:`TokenGroupForcing`,
        after the ``logits_processor`` s given) and decoded back to the head's token in ``texts``.
        With a head that gives feedback, a greedy loop with the KV cache replaces transformers'
        ``generate`` (same logits processors, same stop tokens): the head runs when its group is
        complete and its feedback joins the input embedding of the group's last token.

        Args:
            batch: prompts, media references and clips (``batch.tokens`` is not used).
            max_new_tokens: generation length limit.
            return_dense: also return, for every head's token (and ``state_tokens``), the states that
                predicted each emission of it (of each token of its group) before the end of the
                answer, and the heads' predictions there.
            state_tokens: special tokens whose states to return besides the heads' tokens.
            generate_kwargs: passed to transformers ``generate`` (e.g. ``logits_processor``); with
                a feedback head only ``logits_processor`` is taken.

        Returns:
            GenerationOutput with B decoded answers (the tokenizer's special tokens such as eos and
            padding removed; added tokens such as ``<seg>`` kept) and the generated ids (groups kept).

        Raises:
            UserError: a feedback head with an LLM that numbers positions itself (its position ids
                cannot be continued by the greedy loop).
        """
        tokens = self.tokenize(batch.prompts)
        device = batch.frames.device
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device)
        media = self.encode_media(batch.frames, batch.audio, batch.vision_features, batch.audio_features)
        embeds = self.embed(input_ids, media, batch.media, attention_mask.bool())
        position_ids = self.llm.position_ids(input_ids, attention_mask, self.media_layout)
        anchors = torch.tensor(batch.anchor_clips, dtype=torch.long, device=device)
        if self.token_groups:
            given = generate_kwargs.pop("logits_processor", None) or []
            generate_kwargs["logits_processor"] = LogitsProcessorList([*given, TokenGroupForcing(self.token_groups)])
        feedback = any(head.gives_feedback for head in self.heads)
        if feedback and position_ids is not None:
            raise UserError(
                f"model.heads: {[type(h).__name__ for h in self.heads if h.gives_feedback]} feed their predictions back "
                f"into the LLM, which {type(self.llm).__name__} (its own position ids) does not support in generation; "
                "use a head without feedback or another LLM"
            )
        if position_ids is not None:  # generated tokens continue from the last prompt token's ids + 1
            generate_kwargs["position_ids"] = position_ids
        with self._final_states() as captured:
            if feedback:
                output_ids = self._generate_with_feedback(embeds, attention_mask, media, anchors, max_new_tokens,
                                                          captured, **generate_kwargs)
            else:
                output_ids = self.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        texts = self.tokenizer.batch_decode(self._ungroup(output_ids), skip_special_tokens=True)
        if not return_dense or not (self.heads or state_tokens):
            return GenerationOutput(texts, output_ids)
        # step k's last position predicted token k (the prefill may hold the whole prompt)
        steps = torch.stack([states[:, -1] for states in captured[: output_ids.shape[1]]], dim=1)  # [B, N, D]
        states, _ = self._token_states(output_ids, steps, self._answer_mask(output_ids), state_tokens)
        return GenerationOutput(texts, output_ids, states, self.run_heads(states, media, anchors))

    def _generate_with_feedback(self, embeds: torch.Tensor, attention_mask: torch.Tensor, media: EncodedMedia,
                                anchors: torch.Tensor, max_new_tokens: int, captured: list[torch.Tensor],
                                logits_processor: LogitsProcessorList | None = None, **unsupported: Any) -> torch.Tensor:
        """Greedy decoding with the KV cache in which each feedback head runs as soon as its group is
        complete and its feedback joins that token's input embedding.

        It decodes as transformers' greedy ``generate`` does: the processors see the generated ids
        (``[B, n]``) and the float32 logits, a row stops at any of the LLM's stop tokens and is padded
        afterwards, positions count the prompt's tokens from 0 (left padding skipped).

        Args:
            embeds: ``[B, L, D]`` LEFT-padded prompts; attention_mask: ``[B, L]``.
            media, anchors: the clips and the clip of each row, for the heads.
            captured: the list the output head's inputs are collected in (:meth:`_final_states`).
        Returns:
            ``long [B, N]`` generated ids, N <= ``max_new_tokens``.
        """
        if unsupported:
            raise ValueError(f"generation with a feedback head takes only logits_processor, got {sorted(unsupported)}")
        processors = logits_processor if logits_processor is not None else LogitsProcessorList()
        batch_size, device = embeds.shape[0], embeds.device
        pad = self.tokenizer.pad_token_id
        stops = torch.tensor(self.llm.stop_token_ids, dtype=torch.long, device=device)
        heads = [(head, torch.tensor(self.query_token_ids[head.token], device=device))
                 for head in self.heads if head.gives_feedback]
        generated = torch.zeros((batch_size, 0), dtype=torch.long, device=device)
        unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        mask = attention_mask
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        position = positions[:, -1:]
        for step in range(max_new_tokens):
            scores = processors(generated, out.logits[:, -1].float())
            token = torch.where(unfinished, scores.argmax(dim=-1), torch.full_like(unfinished, pad, dtype=torch.long))
            generated = torch.cat([generated, token[:, None]], dim=1)
            unfinished &= ~torch.isin(token, stops)
            if not unfinished.any() or step + 1 == max_new_tokens:
                break
            embed = self.llm.embed(token[:, None])
            for head, group in heads:
                g = group.shape[0]
                if generated.shape[1] < g:
                    continue
                rows = torch.nonzero((generated[:, -g:] == group).all(dim=1), as_tuple=True)[0]
                if rows.numel():  # captured[-g:]: the states that predicted the group's tokens
                    queries = torch.stack([states[rows, -1] for states in captured[-g:]], dim=1)
                    _, back = self._run_head(head, Dense(rows, queries if g > 1 else queries[:, 0]), media, anchors,
                                             feedback=True)
                    if back is not None:
                        embed = embed.index_put((rows, torch.zeros_like(rows)), back.to(embed.dtype), accumulate=True)
            mask = torch.cat([mask, mask.new_ones((batch_size, 1))], dim=1)
            position = position + 1
            out = self.llm(inputs_embeds=embed, attention_mask=mask, position_ids=position,
                           cache=out.cache, use_cache=True)
        return generated

    def _ungroup(self, output_ids: torch.Tensor) -> torch.Tensor | list[list[int]]:
        """The ids to decode: each complete token group turned back into its head's token."""
        if not self.token_groups:
            return output_ids
        rows = []
        for row in output_ids.tolist():
            ids, i = [], 0
            while i < len(row):
                for token_id, group in self.token_groups.items():
                    if row[i:i + len(group)] == group:
                        ids.append(token_id)
                        i += len(group)
                        break
                else:
                    ids.append(row[i])
                    i += 1
            rows.append(ids)
        return rows

    def _answer_mask(self, output_ids: torch.Tensor) -> torch.Tensor:
        """``bool [B, N]``: generated positions before each row's first stop token (end of turn or eos)."""
        stops = self.llm.stop_token_ids
        if not stops:
            return torch.ones_like(output_ids, dtype=torch.bool)
        stop = torch.tensor(stops, dtype=output_ids.dtype, device=output_ids.device)
        ended = torch.isin(output_ids, stop).long().cumsum(dim=1) > 0
        return ~ended


class TokenGroupForcing(LogitsProcessor):
    """Generation of token groups (``Head.query_tokens``): once a group's first token is emitted, the
    rest of the group follows in order; the group's other tokens, and the head token the group
    stands for, are never emitted otherwise.

    Args:
        groups: head token id -> the ids of its group (distinct, at least two).
    """

    def __init__(self, groups: dict[int, list[int]]) -> None:
        self.groups = {int(k): [int(i) for i in v] for k, v in groups.items()}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids [B, n]`` generated so far, ``scores [B, V]`` -> the scores with the groups enforced."""
        scores = scores.clone()
        for replaced, group in self.groups.items():
            forced = torch.full((scores.shape[0],), -1, dtype=torch.long, device=scores.device)
            for k in range(1, min(len(group), input_ids.shape[1] + 1)):
                hit = (input_ids[:, -k:] == torch.tensor(group[:k], device=input_ids.device)).all(dim=1)
                forced = torch.where(hit, group[k], forced)  # the group's tokens are distinct: one k fits
            scores[:, [replaced, *group[1:]]] = -float("inf")
            rows = torch.nonzero(forced >= 0, as_tuple=True)[0]
            if rows.numel():
                scores[rows] = -float("inf")
                scores[rows, forced[rows]] = 0.0
        return scores


def _find_group(ids: torch.Tensor, group: list[int], valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``group`` occurs in ``ids [B, N]`` (wholly inside ``valid [B, N]`` when given): ``rows [M]``,
    ``starts [M]``, in row-major order."""
    g = len(group)
    if ids.shape[1] < g:
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty
    hit = (ids.unfold(1, g, 1) == torch.tensor(group, dtype=ids.dtype, device=ids.device)).all(dim=-1)
    if valid is not None:
        hit &= valid.unfold(1, g, 1).all(dim=-1)
    rows, starts = torch.nonzero(hit, as_tuple=True)
    return rows, starts


def _cached_features(kind: str, features: torch.Tensor, expected: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Cached ``kind`` encoder features ``[C, T, N, D]`` checked against the ``expected`` shape, in ``dtype``."""
    if tuple(features.shape) != expected:
        raise UserError(
            f"cached {kind} features have shape {tuple(features.shape)} but this model's {kind} encoder produces "
            f"{expected} ([clips, segments, tokens, width]); the feature cache (data.features) was made for "
            "another model: rebuild it with python -m avmt data features"
        )
    return features.to(dtype)
