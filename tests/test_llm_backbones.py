"""Real LLM families through CausalLM by local path: Llama-3, Qwen2 and SmolLM2 with their chat templates.

Each checkpoint is a TINY random config of the family saved next to a small byte-level BPE
tokenizer that carries the family's real special tokens and instruct chat template, so the prompt
wrapping, the placeholders, the end-of-turn target and the stop at end of turn are exercised the
way they are with the real checkpoints (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from avmt.connectors import MLPConnector
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.llm import CausalLM, end_of_turn_token_id
from avmt.model import IGNORE_INDEX, AVModel

T = 2  # segments

# Meta-Llama-3-8B-Instruct's template (bos, then header / trimmed content / <|eot_id|> per message).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2-Instruct's ChatML template, with its default system message.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2-Instruct's ChatML template (as shipped in SmolLM2-135M-Instruct and its GGUF).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = {
    # The first Llama-3-Instruct release: eos <|end_of_text|>, turns end with <|eot_id|>.
    "llama3": dict(
        template=LLAMA3_TEMPLATE,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
        end_of_turn="<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        default_system=None,
        tied=False,
    ),
    # Qwen2 (base tokenizer config): eos <|endoftext|>, pad <|endoftext|>, no bos; turns end with <|im_end|>.
    "qwen2": dict(
        template=QWEN2_TEMPLATE,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokens=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        end_of_turn="<|im_end|>",
        assistant_header="<|im_start|>assistant\n",
        default_system="You are a helpful assistant.",
        tied=True,
    ),
    # SmolLM2-Instruct: bos <|im_start|>, eos = pad = <|im_end|>, unk <|endoftext|>; a Llama with tied embeddings.
    "smollm2": dict(
        template=SMOLLM2_TEMPLATE,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"),
        end_of_turn="<|im_end|>",
        assistant_header="<|im_start|>assistant\n",
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        tied=True,
    ),
}
CORPUS = [
    "Which instrument sounds first? The violin starts first. So the answer is <answer> violin </answer>.",
    "Is the dog heard? A dog barks on the left. <event> dog </event> <range> 2,7 </range>",
    "You are a helpful assistant. You watch and listen. user assistant system",
]
PROMPT = "<video> <audio> Which instrument sounds first?"
TARGET = "The violin starts first. So the answer is <answer> violin </answer>."


def chat_tokenizer(family: str):
    """A small byte-level BPE tokenizer with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    backend.add_special_tokens(spec["specials"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **spec["tokens"])
    tokenizer.chat_template = spec["template"]
    return tokenizer


def save_checkpoint(family: str, folder) -> None:
    """A tiny random checkpoint of ``family`` with its tokenizer, written as a hub checkpoint is laid out."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = FAMILIES[family]
    tokenizer = chat_tokenizer(family)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=spec["tied"],
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def av_model(llm: CausalLM) -> AVModel:
    torch.manual_seed(0)
    return AVModel(
        llm,
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=1),
        MLPConnector(tokens_per_segment=2, hidden_size=32),
        MLPConnector(tokens_per_segment=1, hidden_size=32),
        num_segments=T,
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """``(family name, AVModel around the checkpoint loaded by path)``."""
    folder = tmp_path_factory.mktemp(request.param)
    save_checkpoint(request.param, folder)
    return request.param, av_model(CausalLM(model=str(folder)))


def test_prompt_is_wrapped_by_the_template_and_placeholders_stay_single_ids(family):
    name, model = family
    spec = FAMILIES[name]
    formatted = model.format_prompt(PROMPT)
    system = spec["default_system"]
    if name == "llama3":
        assert formatted == f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>" + spec["assistant_header"]
    else:
        assert formatted == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
                             + spec["assistant_header"])
    tokenizer = model.tokenizer
    for placeholder in ("<video>", "<audio>", "<image>", "<seg>"):
        ids = tokenizer(f"a{placeholder}b {placeholder}", add_special_tokens=False)["input_ids"]
        assert ids.count(model.llm.placeholder_id(placeholder)) == 2
        assert tokenizer(placeholder, add_special_tokens=False)["input_ids"] == [model.llm.placeholder_id(placeholder)]
    row = model.tokenize([PROMPT]).input_ids[0].tolist()
    for placeholder in ("<video>", "<audio>"):
        assert row.count(model.placeholder_ids[placeholder]) == model.placeholder_lengths[placeholder]
    if tokenizer.bos_token_id is not None:  # one bos (Llama-3's template writes it; SmolLM2's bos is <|im_start|>)
        assert row[0] == tokenizer.bos_token_id and (name != "llama3" or row.count(tokenizer.bos_token_id) == 1)


def test_target_ends_the_assistant_turn_and_labels_mask_the_whole_prompt(family):
    name, model = family
    spec = FAMILIES[name]
    tokenizer = model.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(spec["end_of_turn"])
    assert model.llm.end_of_turn_id == end_of_turn == end_of_turn_token_id(tokenizer)
    if name in ("llama3", "qwen2"):  # eos is not the end of turn in these checkpoints
        assert tokenizer.eos_token_id != end_of_turn
        assert model.llm.stop_token_ids == [end_of_turn, tokenizer.eos_token_id]
        assert model.llm.model.generation_config.eos_token_id == [end_of_turn, tokenizer.eos_token_id]
    else:
        assert model.llm.stop_token_ids == [end_of_turn]

    question = "Which instrument sounds first?"  # no placeholders: the row must read as the template renders it
    tokens = model.tokenize([question, PROMPT], [TARGET, "<answer> dog </answer>"])
    for row, (prompt, target) in enumerate([(question, TARGET), (PROMPT, "<answer> dog </answer>")]):
        labels = tokens.labels[row]
        length = int(tokens.attention_mask[row].sum())
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == tokenizer(target, add_special_tokens=False)["input_ids"] + [end_of_turn]
        assert tokenizer.eos_token_id not in kept or tokenizer.eos_token_id == end_of_turn
        start = length - len(kept)
        assert (labels[:start] == IGNORE_INDEX).all() and labels[start:length].tolist() == kept
        prompt_text = tokenizer.decode(tokens.input_ids[row, :start])
        assert prompt_text.endswith(spec["assistant_header"])  # the assistant header is masked too
    # the training sequence reads exactly as the template renders the conversation, up to its end of turn
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": TARGET}], tokenize=False
    )
    through_end = rendered[: rendered.index(spec["end_of_turn"], rendered.index(TARGET)) + len(spec["end_of_turn"])]
    length = int(tokens.attention_mask[0].sum())
    assert tokenizer.decode(tokens.input_ids[0, :length]) == through_end


class Script(LogitsProcessor):
    """Forces the token ``ids[k]`` at generation step k (then keeps forcing the last one)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        wanted = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, wanted] = 0.0
        return forced


def test_generation_stops_at_the_end_of_turn(family, make_batch):
    name, model = family
    tokenizer = model.tokenizer
    end_of_turn = model.llm.end_of_turn_id
    answer = tokenizer("violin", add_special_tokens=False)["input_ids"][:2]
    after = tokenizer("dog", add_special_tokens=False)["input_ids"][0]
    frames = torch.randint(0, 256, (1, T, 3, 32, 32), dtype=torch.uint8)
    audio = torch.randn(1, T * 4000) * 0.1
    batch = make_batch([PROMPT], frames, audio, [0])
    model.eval()
    out = model.generate(batch, max_new_tokens=8, logits_processor=LogitsProcessorList([Script([*answer, end_of_turn, after])]))
    assert out.token_ids[0].tolist() == [*answer, end_of_turn]  # stopped there, not at max_new_tokens
    assert out.texts == [tokenizer.decode(answer)]  # the end-of-turn token is not part of the answer
    assert model._answer_mask(out.token_ids).tolist() == [[True] * len(answer) + [False]]


def test_an_explicit_system_prompt_replaces_the_template_default(tmp_path):
    save_checkpoint("qwen2", tmp_path)
    model = av_model(CausalLM(model=str(tmp_path), system_prompt="You watch and listen."))
    formatted = model.format_prompt("Is the dog heard?")
    assert formatted.startswith("<|im_start|>system\nYou watch and listen.<|im_end|>\n<|im_start|>user\nIs the dog heard?")
    assert "You are a helpful assistant." not in formatted


def test_offline_tiny_llm_keeps_eos_as_its_end_of_turn():
    llm = CausalLM(words=["the", "dog"], hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    assert not getattr(llm.tokenizer, "chat_template", None)
    assert llm.end_of_turn_id == llm.tokenizer.eos_token_id and llm.stop_token_ids == [llm.tokenizer.eos_token_id]


# ------------------------------------------------------------------ frozen reduced-precision base, float32 training
@pytest.mark.parametrize("adapter_kind", ["ilora", "lora"])
def test_bfloat16_base_keeps_every_trained_parameter_float32(adapter_kind):
    from avmt.adapters import ILoRA, LoRA

    words = ["the", "dog", "violin", "is", "heard"]
    losses = {}
    for base_dtype in (None, "bfloat16"):
        torch.manual_seed(0)
        llm = CausalLM(words=words, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       base_dtype=base_dtype, train_modules=["norm"])
        llm.freeze_base()  # before the adapter, as AVModel does
        adapter = (ILoRA(r=4, alpha=8, num_heads=3, dropout=0.0, kernel="torch") if adapter_kind == "ilora"
                   else LoRA(r=4, alpha=8, dropout=0.0))
        adapter.apply({"llm": llm.model})
        with torch.no_grad():
            for name, parameter in llm.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01)
        ids = torch.tensor([[5, 6, llm.placeholder_id("<video>"), 7, llm.placeholder_id("<seg>"), 8]])
        output = llm(llm.embed(ids), torch.ones_like(ids), labels=ids)
        output.loss.backward()
        losses[base_dtype] = float(output.loss.detach())
        trained = {n: p for n, p in llm.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in llm.named_parameters() if not p.requires_grad}
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   for p in trained.values()), {n: (p.dtype, p.grad is None) for n, p in trained.items()}
        assert any("lora_" in n for n in trained) and "model.model.norm.weight" in trained
        assert {p.dtype for p in frozen.values()} == {torch.float32 if base_dtype is None else torch.bfloat16}
    assert losses["bfloat16"] == pytest.approx(losses[None], abs=0.05)


def test_base_dtype_arguments_are_checked():
    with pytest.raises(ValueError, match="base_dtype"):
        CausalLM(words=["the"], hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, base_dtype="float32")
    with pytest.raises(ValueError, match="torch_dtype"):
        CausalLM(words=["the"], hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                 base_dtype="bfloat16", torch_dtype="bfloat16")
