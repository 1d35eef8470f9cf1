"""Head contract extensions on AVModel: token groups (``Head.query_tokens``) and feedback
(``Head.feedback``), teacher-forced and generated, with small heads defined here."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from avmt.connectors import MLPConnector
from avmt.data.sample import IGNORE_INDEX, TokenizedBatch
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.errors import UserError
from avmt.heads import Head
from avmt.llm import DEFAULT_SPECIAL_TOKENS, CausalLM
from avmt.model import AVModel

T = 4
GROUP = ["<m0>", "<m1>"]
PROMPTS = ["<video> <audio> Which mood?", "<video> <audio> Is the dog heard in the clip?"]


class ProbeHead(Head):
    """Returns its queries as they are (``[M, D]`` or ``[M, G, D]``); with ``feedback`` it feeds back
    a projection of them and of its clip's mean vision feature."""

    output = "probe"

    def __init__(self, token: str = "<seg>", query_tokens: list[str] | None = None, feedback: bool = False) -> None:
        super().__init__(token, query_tokens)
        self.enabled = feedback

    @property
    def gives_feedback(self) -> bool:
        return self.enabled

    def _build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        self.back = nn.Linear(llm_dim, llm_dim)
        self.region = nn.Linear(vision_dim, llm_dim)

    def forward(self, queries, media, clip_index=None):
        return queries

    def feedback(self, prediction, media, clip_index=None):
        index = torch.arange(prediction.shape[0]) if clip_index is None else clip_index
        query = prediction.reshape(prediction.shape[0], -1, prediction.shape[-1]).mean(dim=1)
        return 3.0 * self.back(query) + self.region(media.vision[index].mean(dim=(1, 2)))


def tiny_model(head: Head) -> AVModel:
    return tiny_model_with_heads([head])


def tiny_model_with_heads(heads: list[Head]) -> AVModel:
    torch.manual_seed(0)
    return AVModel(
        CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 special_tokens=[*DEFAULT_SPECIAL_TOKENS, *GROUP]),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
        MLPConnector(tokens_per_segment=2, hidden_size=32),
        MLPConnector(tokens_per_segment=2, hidden_size=32),
        num_segments=T,
        heads=heads,
    ).eval()


def clips(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    frames = torch.randint(0, 256, (n, T, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return frames, torch.randn(n, T * 4000, generator=generator) * 0.1


class ForceSequence(LogitsProcessor):
    """Forces ``ids[n]`` at generation step n (None: the model's own choice)."""

    def __init__(self, ids: list[int | None]) -> None:
        self.ids = ids

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        if step < len(self.ids) and self.ids[step] is not None:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.ids[step]] = 0.0
        return scores


def word_ids(model: AVModel, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_recording_logits(model, batch, sequence):
    """Generate with ``sequence`` forced (None steps free); the raw logits of every step ``[B, N, V]``."""
    seen = []
    handle = model.llm.model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out[:, -1]))
    try:
        out = model.generate(batch, max_new_tokens=len(sequence) + 2, return_dense=True,
                             logits_processor=LogitsProcessorList([ForceSequence(sequence)]))
    finally:
        handle.remove()
    return out, torch.stack(seen[: out.token_ids.shape[1]], dim=1)


def teacher_forced(model, batch, answers: torch.Tensor):
    """``batch`` teacher-forced on the generated ``answers [B, N]`` (up to each row's first stop)."""
    stop = model.llm.end_of_turn_id
    rows, labels = [], []
    for prompt, answer in zip(batch.prompts, answers.tolist()):
        prompt_ids = model._prompt_ids(prompt)
        answer = answer[: answer.index(stop) + 1] if stop in answer else answer
        rows.append(prompt_ids + answer)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + answer)
    length = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    batch.tokens = TokenizedBatch(
        torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in labels]),
    )
    with torch.no_grad():
        return model(batch, return_logits=True), [len(model._prompt_ids(p)) for p in batch.prompts]


def test_a_group_is_written_into_targets_and_its_head_reads_the_states_of_each_token(make_batch):
    model = tiny_model(ProbeHead(query_tokens=GROUP))
    frames, audio = clips()
    batch = make_batch(PROMPTS, frames, audio, [0, 1], targets=["<answer> calm </answer> <seg>", "<seg> sad"],
                       model=model)
    labels = batch.tokens.labels
    seg, m0, m1 = (model.llm.placeholder_id(t) for t in ["<seg>", *GROUP])
    assert not (labels == seg).any() and (labels == m0).sum() == 2 == (labels == m1).sum()
    with torch.no_grad():
        out = model(batch, state_tokens=GROUP)
    states = out.states["<seg>"]
    assert states.rows.tolist() == [0, 1] and states.values.shape == (2, 2, 32)
    torch.testing.assert_close(states.values[:, 0], out.states["<m0>"].values, rtol=0, atol=0)
    torch.testing.assert_close(states.values[:, 1], out.states["<m1>"].values, rtol=0, atol=0)
    torch.testing.assert_close(out.dense["probe"].values, states.values, rtol=0, atol=0)


def test_generation_forces_the_group_decodes_it_as_the_head_token_and_reads_the_teacher_forced_states(make_batch):
    model = tiny_model(ProbeHead(query_tokens=GROUP))
    frames, audio = clips()
    batch = make_batch(PROMPTS, frames, audio, [0, 1])
    m0, m1 = (model.llm.placeholder_id(t) for t in GROUP)
    calm = word_ids(model, "calm")[0]
    # only <m0> is forced: <m1> must follow by itself; then the model's own tokens until the end of turn
    out, _ = generate_recording_logits(model, batch, [calm, m0, None, calm, model.llm.end_of_turn_id])
    assert out.token_ids[:, :4].tolist() == [[calm, m0, m1, calm]] * 2
    assert all("<seg>" in text and "<m0>" not in text and "<m1>" not in text for text in out.texts)
    assert out.states["<seg>"].values.shape == (2, 2, 32)
    trained, _ = teacher_forced(model, batch, out.token_ids)
    assert trained.states["<seg>"].rows.tolist() == out.states["<seg>"].rows.tolist() == [0, 1]
    torch.testing.assert_close(out.states["<seg>"].values, trained.states["<seg>"].values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dense["probe"].values, trained.dense["probe"].values, atol=1e-5, rtol=1e-5)


def test_a_group_token_is_never_emitted_out_of_its_group(make_batch):
    model = tiny_model(ProbeHead(query_tokens=GROUP))
    frames, audio = clips()
    m1, seg = model.llm.placeholder_id("<m1>"), model.llm.placeholder_id("<seg>")
    out = model.generate(make_batch(PROMPTS, frames, audio, [0, 1]), max_new_tokens=4,
                         logits_processor=LogitsProcessorList([ForceSequence([m1, seg])]))
    assert not torch.isin(out.token_ids[:, :2], torch.tensor([m1, seg])).any()


def test_feedback_changes_the_loss_of_the_tokens_after_the_head_token_and_not_before(make_batch):
    head = ProbeHead(feedback=True)
    model = tiny_model(head)
    frames, audio = clips()
    batch = make_batch(PROMPTS, frames, audio, [0, 1], targets=["<answer> calm </answer> <seg> sad", "<seg> calm"],
                       model=model)
    with torch.no_grad():
        fed = model(batch, return_logits=True)
        head.enabled = False
        plain = model(batch, return_logits=True)
    seg = model.llm.placeholder_id("<seg>")
    for row in range(2):
        at = int((batch.tokens.input_ids[row] == seg).nonzero())  # the <seg> token's input position
        length = int(batch.tokens.attention_mask[row].sum())
        torch.testing.assert_close(fed.logits[row, :at], plain.logits[row, :at], rtol=0, atol=0)
        assert (fed.logits[row, at:length] - plain.logits[row, at:length]).abs().amax(dim=-1).min() > 1e-4
    assert not torch.equal(fed.loss_sum, plain.loss_sum)
    torch.testing.assert_close(fed.states["<seg>"].values, plain.states["<seg>"].values, rtol=0, atol=0)


def test_feedback_reaches_the_head_and_the_states_through_the_lm_loss(make_batch):
    model = tiny_model(ProbeHead(feedback=True)).train()
    frames, audio = clips()
    batch = make_batch(PROMPTS, frames, audio, [0, 1], targets=["<seg> sad", "<seg> calm"], model=model)
    model(batch).mean_loss().backward()
    head = model.heads[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("query_tokens", [None, GROUP], ids=["token", "group"])
def test_generation_with_feedback_gives_the_logits_of_teacher_forcing_on_its_answer(make_batch, query_tokens):
    model = tiny_model(ProbeHead(query_tokens=query_tokens, feedback=True))
    frames, audio = clips()
    batch = make_batch(PROMPTS, frames, audio, [0, 1])
    first = model.llm.placeholder_id("<seg>" if query_tokens is None else query_tokens[0])
    calm = word_ids(model, "calm")[0]
    # the head token is forced at step 1; the model writes the rest (a few tokens) itself
    out, logits = generate_recording_logits(model, batch, [calm, first])
    assert out.states["<seg>"].rows.tolist() == [0, 1]
    trained, prompt_lengths = teacher_forced(model, batch, out.token_ids)
    for row, start in enumerate(prompt_lengths):
        answer = int(trained.token_count[row])  # the answer's tokens, end of turn included
        torch.testing.assert_close(logits[row, :answer], trained.logits[row, start - 1: start - 1 + answer],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.dense["probe"].values, trained.dense["probe"].values, atol=1e-5, rtol=1e-5)


def test_a_feedback_head_with_an_llm_numbering_its_own_positions_is_refused(make_batch, monkeypatch):
    model = tiny_model(ProbeHead(feedback=True))
    frames, audio = clips()
    monkeypatch.setattr(model.llm, "position_ids", lambda ids, mask, layout: torch.zeros(3, *ids.shape, dtype=torch.long))
    with pytest.raises(UserError, match="feed their predictions back"):
        model.generate(make_batch(PROMPTS, frames, audio, [0, 1]), max_new_tokens=3)


def test_the_integration_connector_reads_the_context_of_each_token_s_own_segment():
    """AVUFormer's integration connector: with its self-attention silenced, changing the context of one
    segment changes the tokens of that segment only (cross-attention is segment-aligned)."""
    from avmt.connectors import AVIntegrationConnector

    torch.manual_seed(0)
    connector = AVIntegrationConnector(tokens_per_segment=2, hidden_size=16, num_layers=1, num_heads=2,
                                       intermediate_size=32)
    connector.build(8, 12, context_dim=6)
    with torch.no_grad():
        connector.layers[0].self_attn.out_proj.weight.zero_()
        connector.layers[0].self_attn.out_proj.bias.zero_()
    features, context = torch.randn(1, T, 5, 8), torch.randn(1, T, 3, 6)
    changed = context.clone()
    changed[:, 1] = torch.randn(3, 6)
    delta = (connector(features, changed) - connector(features, context)).abs().amax(dim=-1)[0]  # [T * 2]
    assert (delta[2:4] > 1e-4).all() and torch.all(torch.cat([delta[:2], delta[4:]]) == 0)
    with pytest.raises(ValueError, match="aligned"):
        connector(features, torch.randn(1, T - 1, 3, 6))


def test_a_head_s_group_is_its_own():
    class OtherHead(ProbeHead):
        output = "other"

    with pytest.raises(UserError, match="both read"):
        tiny_model_with_heads([ProbeHead(query_tokens=GROUP), OtherHead()])  # OtherHead reads <seg>, now a group
