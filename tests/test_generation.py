"""Answer budgets: shapes learned from training targets, and the reasoning budget that makes a
looping answer conclude."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from avmt.generation import AnswerShapes, ReasoningBudget, sentence_end_ids, tagged_sentence_index
from avmt.llm import CausalLM

REASONED = "A red violin on the left is seen and heard from second 2 to second 7. A dog is heard. " \
           "So the answer is <answer> violin </answer>."
TAGS = "<answer> violin </answer>"
CAPTION = "A red violin on the left is seen and heard from second 2 to second 7. The mood is happy."


def llm() -> CausalLM:
    return CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def ids(model: CausalLM, text: str) -> list[int]:
    tokenizer = model.tokenizer
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def token(model: CausalLM, word: str) -> int:
    (index,) = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    return index


def test_tagged_sentence_index():
    assert tagged_sentence_index(REASONED) == 2
    assert tagged_sentence_index(TAGS) == 0
    assert tagged_sentence_index(CAPTION) is None


def test_shapes_from_targets():
    model = llm()
    ends = sentence_end_ids(model.tokenizer)
    assert token(model, ".") in ends
    shapes = AnswerShapes(ends, margin=0.25)
    shapes.update("qa", REASONED, ids(model, REASONED))
    shapes.update("qa", "A dog is heard. So the answer is <answer> dog </answer>.",
                  ids(model, "A dog is heard. So the answer is <answer> dog </answer>."))
    shapes.update("tags", TAGS, ids(model, TAGS))
    shapes.update("cap", CAPTION, ids(model, CAPTION))
    qa = shapes.shapes["qa"]
    after_a_sentence = model.tokenizer("heard. So", add_special_tokens=False)["input_ids"][-1]  # "▁So"
    assert qa.max_sentences == 2 and qa.lead_id == after_a_sentence
    assert qa.max_tokens == len(ids(model, REASONED))
    first = REASONED.split(". ")[0] + "."
    assert qa.max_sentence_tokens == len(ids(model, first)) - 1  # without the eos
    assert shapes.shapes["tags"].max_sentences == 0 and shapes.shapes["tags"].lead_id == token(model, "<answer>")
    assert shapes.shapes["cap"].lead_id is None
    assert shapes.max_new_tokens("qa", cap=1000) == int(-(-qa.max_tokens * 1.25 // 1)) + 2
    assert shapes.max_new_tokens("qa", cap=10) == 10
    assert shapes.max_new_tokens("never seen", cap=77) == 77
    assert shapes.processor(["cap", "cap"]) is None
    # a lead that varies is no lead
    shapes.update("tags", "violin <answer> x </answer>", ids(model, "violin <answer> x </answer>"))
    assert shapes.shapes["tags"].lead_id is None
    restored = AnswerShapes(ends)
    restored.load_state_dict(shapes.state_dict())
    assert restored.state_dict() == shapes.state_dict()


def run(budget: ReasoningBudget, rows: list[list[int]], vocab: int = 20) -> torch.Tensor:
    """The argmax token per row after the budget (scores favour token 0 everywhere)."""
    scores = torch.zeros(len(rows), vocab)
    scores[:, 0] = 5.0
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows]) if width else torch.zeros(len(rows), 0,
                                                                                                   dtype=torch.long)
    return budget(input_ids, scores).argmax(-1)


END, LEAD, A, B = 1, 2, 3, 4


def test_budget_forces_the_lead_after_the_sentences_the_targets_had():
    budget = ReasoningBudget([LEAD], [2], [0], [END])
    assert run(budget, [[A, B, END]]).tolist() == [0]  # one sentence written, two allowed
    assert run(budget, [[A, B, END, B, END]]).tolist() == [LEAD]  # two written: conclude
    assert budget.forced_rows == {0}
    assert run(ReasoningBudget([LEAD], [2], [0], [END]), [[A, B, END, B]]).tolist() == [0]  # mid-sentence


def test_budget_forces_the_lead_on_a_repeated_sentence_and_ends_long_sentences():
    assert run(ReasoningBudget([LEAD], [5], [0], [END]), [[A, B, END, A, B, END]]).tolist() == [LEAD]
    assert run(ReasoningBudget([LEAD], [5], [3], [END]), [[A, B, A]]).tolist() == [END]
    assert run(ReasoningBudget([LEAD], [5], [4], [END]), [[A, B, A]]).tolist() == [0]


def test_budget_leaves_concluded_and_unbudgeted_rows_alone():
    budget = ReasoningBudget([LEAD, None], [0, 0], [0, 0], [END])
    # tags only (no sentence allowed): the lead starts the answer; once it is there, nothing is forced
    assert run(budget, [[], []]).tolist() == [LEAD, 0]
    assert budget.forced_rows == {0}  # the model's own choice was token 0: the budget intervened
    assert run(ReasoningBudget([LEAD], [1], [2], [END]), [[A, END, LEAD, A, B, A, B, END]]).tolist() == [0]


class Recorder(LogitsProcessor):
    def __init__(self) -> None:
        self.lengths: list[int] = []

    def __call__(self, input_ids, scores):
        self.lengths.append(input_ids.shape[1])
        return scores


def test_generation_from_embeddings_hands_the_processor_only_the_new_tokens():
    """The budget counts sentences in ``input_ids``: transformers must not include the prompt there."""
    model = llm()
    embeds = torch.randn(2, 5, 32)
    recorder = Recorder()
    out = model.generate(embeds, torch.ones(2, 5, dtype=torch.long), max_new_tokens=4,
                         logits_processor=LogitsProcessorList([recorder]))
    assert recorder.lengths[0] == 0 and recorder.lengths == list(range(len(recorder.lengths)))
    assert out.shape[1] <= 4


def test_an_untrained_model_is_made_to_answer(make_batch):
    """Through the module: a task whose targets start with ``<answer>`` gets answers that start
    with it, within the task's own length budget, even from a random model."""
    from tests.test_task_contract import tiny_module

    module = tiny_module(heads=False, generation_tasks=["action"], max_new_tokens=40)
    tokenizer = module.model.tokenizer
    shapes = module._answer_budget()
    target = "<answer> moving left </answer>"
    shapes.update("action", target, ids(module.model.llm, target))
    frames = torch.randint(0, 255, (1, 10, 3, 32, 32), dtype=torch.uint8)
    batch = make_batch(["<video> <audio> What does it do?"] * 2, frames, torch.zeros(1, 16000 * 10), [0, 0],
                       tasks=["action", "action"])
    results = module._generate(batch, [0, 1])
    for _, text, _ in results:
        assert text.startswith("<answer>")
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= shapes.max_new_tokens("action", 40)
    assert module._forced_rows["action"] == 2


def test_budget_reads_each_row_incrementally_with_the_same_decisions():
    """Generation calls the budget once per step with one more token per row; its decisions must
    equal those of a fresh budget reading the whole row at once."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        streams = [[rng.choice([0, END, LEAD, A, B]) for _ in range(30)] for _ in range(3)]
        args = ([LEAD, LEAD, None], [2, 3, 1], [4, 0, 3], [END])
        stepwise = ReasoningBudget(*args)
        for n in range(31):
            rows = [s[:n] for s in streams]
            assert run(stepwise, rows).tolist() == run(ReasoningBudget(*args), rows).tolist(), (streams, n)
