"""CausalLM: offline tokenizer, split embedding/head, tiny forward/loss/generate, freezing,
tokenizer state, and the pretrained (local path) code path."""

import json
import sys
import types

import pytest
import torch

from avmt.llm import SPACE, CausalLM, SplitEmbedding, SplitLMHead, build_word_tokenizer, word_pieces

WORDS = [
    "so", "the", "audible", "and", "visible", "event", "is", "violin", "time", "range",
    "answer", "dog", "moving left", "<event>", "<range>", "</answer>", "<answer>", "<seg>",
]
SENTENCE = (
    "So the audible and visible event is <event> violin </event>, "
    "and the time range is <range> 2,17 </range>."
)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return CausalLM(words=WORDS, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ offline tokenizer
def test_word_pieces():
    assert word_pieces("<range> 2,17 </range>.") == ["<range>", "2", ",", "1", "7", "</range>", "."]
    assert word_pieces("moving left") == ["moving", "left"]


def test_tokenizer_is_deterministic():
    a, b = build_word_tokenizer(WORDS), build_word_tokenizer(list(reversed(WORDS)))
    assert a.get_vocab() == b.get_vocab()
    assert _ids(a, SENTENCE) == _ids(b, SENTENCE)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    c = CausalLM(words=WORDS, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    d = CausalLM(words=WORDS, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    assert c.tokenizer.get_vocab() == d.tokenizer.get_vocab()
    assert c.tokenizer_state() == d.tokenizer_state()


def test_round_trip_tags_digits_punctuation(lm):
    tok = lm.tokenizer
    text = "<video>\n<audio> " + SENTENCE + " <answer>42</answer> <seg>"
    ids = _ids(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tokens = tok.convert_ids_to_tokens(ids)
    expected = ["<video>", "<audio>", SPACE + "So", SPACE + "<event>", SPACE + "</event>"]
    expected += [SPACE + "2", "1", "7"]
    expected += [",", SPACE + "<answer>", "4", "2", "</answer>", "<seg>"]
    for t in expected:
        assert t in tokens, t
    # digits are single tokens, never merged
    assert all(not (t.lstrip(SPACE).isdigit() and len(t.lstrip(SPACE)) > 1) for t in tokens)
    # eos / pad are dropped by skip_special_tokens, the added tokens are kept
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text


def test_decode_drops_only_a_leading_space(lm):
    tok = lm.tokenizer
    assert tok.decode(_ids(tok, " the  dog")) == "the  dog"
    assert tok.decode(_ids(tok, "the dog\n the <seg>")) == "the dog\n the <seg>"


def test_unknown_word_and_capitalization(lm):
    tok = lm.tokenizer
    assert _ids(tok, "The dog")[0] != tok.unk_token_id  # capitalized form of a declared word
    assert tok.unk_token_id in _ids(tok, "the zebra")


def test_special_tokens_single_new_ids(lm):
    tok = lm.tokenizer
    ids = [lm.placeholder_id(t) for t in ("<video>", "<audio>", "<image>", "<seg>")]
    assert ids == lm.new_token_ids == list(range(lm.base_vocab_size, lm.base_vocab_size + 4))
    for t, i in zip(("<video>", "<audio>", "<image>", "<seg>"), ids):
        assert _ids(tok, f"dog{t}dog")[1] == i and _ids(tok, t) == [i]
    with pytest.raises(ValueError):
        lm.placeholder_id("<nope>")


def test_missing_task_vocabulary_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "avmt.tasks", types.ModuleType("avmt.tasks"))
    with pytest.raises(RuntimeError, match="words"):
        CausalLM(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)


def test_default_vocabulary_comes_from_tasks():
    tasks = pytest.importorskip("avmt.tasks")
    if not hasattr(tasks, "all_words"):
        pytest.skip("avmt.tasks.all_words not available yet")
    lm = CausalLM(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    words = tasks.all_words()
    ids = _ids(lm.tokenizer, " ".join(w for w in words if w not in lm.special_tokens))
    assert lm.tokenizer.unk_token_id not in ids


# ------------------------------------------------------------------ split embedding / head
def test_split_embedding():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 6)
    split = SplitEmbedding(base, new_start=10, num_new=3)
    assert not base.weight.requires_grad and split.new_rows.requires_grad
    torch.testing.assert_close(split.new_rows, base.weight.mean(0, keepdim=True).expand(3, 6))
    ids = torch.tensor([[0, 9, 10, 12], [3, 11, 4, 4]])
    out = split(ids)
    assert out.shape == (2, 4, 6)
    old = ids < 10
    torch.testing.assert_close(out[old], base(ids[old]))
    out.square().sum().backward()
    assert base.weight.grad is None
    assert split.new_rows.grad is not None and (split.new_rows.grad.abs().sum(-1) > 0).all()
    with torch.no_grad():
        split.new_rows[1] = 5.0
    assert torch.all(split(torch.tensor([[11]])) == 5.0)
    assert split.weight.shape == (13, 6)


def test_split_head_drops_unused_base_rows_and_ties():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 6)  # 12 rows, tokenizer uses only 10
    head = torch.nn.Linear(6, 12, bias=False)
    head.weight = emb.weight
    split = SplitEmbedding(emb, 10, 2)
    lm_head = SplitLMHead(head, 10, 2, tied=split)
    h = torch.randn(3, 6)
    logits = lm_head(h)
    assert logits.shape == (3, 12)
    torch.testing.assert_close(logits[:, :10], h @ emb.weight[:10].T)
    torch.testing.assert_close(logits[:, 10:], h @ split.new_rows.T)
    assert "new_rows" not in dict(lm_head.named_parameters())  # tied rows live (and are saved) once


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_forward_loss_generate(architecture):
    torch.manual_seed(0)
    lm = CausalLM(architecture=architecture, words=WORDS, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, intermediate_size=64)
    assert lm.pretrained is False and lm.hidden_size == 32
    ids = torch.tensor([_ids(lm.tokenizer, "<video> the dog <seg>")])
    embeds = lm.embed(ids)
    assert embeds.shape == (1, ids.shape[1], 32)
    out = lm(embeds, torch.ones_like(ids), labels=ids)  # labels may contain new tokens
    assert out.logits.shape == (1, ids.shape[1], lm.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0
    lm.eval()
    gen = lm.generate(embeds, torch.ones_like(ids), max_new_tokens=5)
    assert gen.dtype == torch.long and gen.shape[0] == 1 and 1 <= gen.shape[1] <= 5
    # greedy = argmax step by step
    cur, expected = embeds, []
    with torch.no_grad():
        for _ in range(gen.shape[1]):
            nxt = lm(cur, torch.ones(cur.shape[:2], dtype=torch.long)).logits[0, -1].argmax().item()
            expected.append(nxt)
            if nxt == lm.tokenizer.eos_token_id:
                break
            cur = torch.cat([cur, lm.embed(torch.tensor([[nxt]]))], dim=1)
    assert gen[0, : len(expected)].tolist() == expected


def test_left_padded_batch_generation_matches_single(lm):
    tok = lm.tokenizer
    lm.eval()
    p1, p2 = _ids(tok, "the dog is"), _ids(tok, "so the visible event is <video> <video>")
    length = len(p2)
    ids = torch.full((2, length), tok.pad_token_id)
    mask = torch.zeros(2, length, dtype=torch.long)
    ids[0, length - len(p1):], mask[0, length - len(p1):] = torch.tensor(p1), 1
    ids[1], mask[1] = torch.tensor(p2), 1
    batch = lm.generate(lm.embed(ids), mask, max_new_tokens=4, eos_token_id=None)
    one = torch.tensor([p1])
    single = lm.generate(lm.embed(one), torch.ones_like(one), max_new_tokens=4, eos_token_id=None)
    assert batch[0].tolist() == single[0].tolist()


def test_init_is_deterministic_under_seed():
    kw = dict(words=WORDS, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    torch.manual_seed(3)
    a = CausalLM(**kw)
    torch.manual_seed(3)
    b = CausalLM(**kw)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_freeze_base_keeps_new_rows_and_later_params_trainable():
    torch.manual_seed(0)
    lm = CausalLM(words=WORDS, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    layer = lm.model.model.layers[0].self_attn.q_proj
    layer.lora = torch.nn.Parameter(torch.zeros(2))  # stands for an adapter injected afterwards
    lm.freeze_base()
    trainable = sorted(n for n, p in lm.named_parameters() if p.requires_grad)
    assert trainable == [
        "model.lm_head.new_rows",
        "model.model.embed_tokens.new_rows",
        "model.model.layers.0.self_attn.q_proj.lora",
    ]
    ids = torch.tensor([[lm.placeholder_id("<seg>"), 5, 6]])
    out = lm(lm.embed(ids), torch.ones_like(ids), labels=torch.tensor([[5, 6, lm.placeholder_id("<seg>")]]))
    out.loss.backward()
    assert lm.model.model.embed_tokens.new_rows.grad is not None
    assert lm.model.lm_head.new_rows.grad is not None


def test_tokenizer_state_round_trip(lm):
    state = lm.tokenizer_state()
    state = json.loads(json.dumps(state))  # JSON-able, as stored in a checkpoint
    tok = CausalLM.tokenizer_from_state(state)
    assert tok.get_vocab() == lm.tokenizer.get_vocab()
    text = "<video> " + SENTENCE + " <seg>"
    assert _ids(tok, text) == _ids(lm.tokenizer, text)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
        assert getattr(tok, name) == getattr(lm.tokenizer, name), name
    with pytest.raises(ValueError):
        CausalLM.tokenizer_from_state({"kind": "nope"})


# ------------------------------------------------------------------ pretrained path (a local directory)
def test_local_checkpoint_without_pad_token_and_tied_embeddings(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = build_word_tokenizer(WORDS, exclude=["<seg>"])
    tok.pad_token = None
    config = Qwen2Config(vocab_size=len(tok) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    lm = CausalLM(model=str(tmp_path), words=None)
    assert lm.pretrained is True
    assert lm.tokenizer.pad_token == lm.tokenizer.unk_token  # missing pad -> unk
    assert lm.base_vocab_size == len(tok) and lm.vocab_size == len(tok) + 4
    head = lm.model.get_output_embeddings()
    assert isinstance(head, SplitLMHead) and head._tied is lm.model.get_input_embeddings()
    ids = torch.tensor([_ids(lm.tokenizer, "<audio> the dog <seg>")])
    out = lm(lm.embed(ids), torch.ones_like(ids), labels=ids)
    assert out.logits.shape[-1] == lm.vocab_size and torch.isfinite(out.loss)

    state = json.loads(json.dumps(lm.tokenizer_state()))
    assert state["kind"] == "pretrained"
    rebuilt = CausalLM.tokenizer_from_state(state)
    assert rebuilt.get_vocab() == lm.tokenizer.get_vocab() and rebuilt.pad_token == lm.tokenizer.pad_token


def test_bad_arguments():
    with pytest.raises(ValueError, match="architecture"):
        CausalLM(architecture="gpt9", words=WORDS)
    with pytest.raises(OSError, match="could not load"):
        CausalLM(model="/nonexistent/path/to/model")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing activations in the backward pass trades compute for memory, nothing else."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lm = CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      gradient_checkpointing=checkpointing, train_modules=["embed_tokens", "lm_head", "norm"])
        lm.freeze_base()
        lm.model.train()
        ids = lm.tokenizer(["the violin is heard", "a dog is seen"], return_tensors="pt", padding=True)["input_ids"]
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in lm.parameters() if p.requires_grad and p.grad is not None]))
        assert getattr(lm.model, "is_activation_checkpointing", None) in (checkpointing, None)
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.allclose(loss_a, loss_b) and len(grads_a) == len(grads_b) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_tiny_llm_draws_its_weights_with_initializer_range(architecture):
    from avmt.errors import UserError

    torch.manual_seed(0)
    default = CausalLM(architecture=architecture, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    wide = CausalLM(architecture=architecture, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                    initializer_range=0.125)
    for llm, std in ((default, 0.02), (wide, 0.125)):
        assert llm.model.config.initializer_range == std
        for name in ("q_proj", "down_proj"):
            weight = next(p for n, p in llm.model.named_parameters() if n.endswith(f"{name}.weight"))
            assert weight.std().item() == pytest.approx(std, rel=0.1), name
    with pytest.raises(UserError, match="initializer_range must be > 0"):
        CausalLM(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, initializer_range=0.0)
