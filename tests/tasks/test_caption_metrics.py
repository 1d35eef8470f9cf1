"""CIDEr-D (coco-caption's CiderScorer, re-implemented) against hand-computed corpora.

Notation in the comments: N clips, L = log N; an n-gram's weight is tf * (L - log max(1, df)) with
df = the number of clips whose references contain it, so within one corpus most n-grams share
the weight L and it cancels in the cosines. g(d) = exp(-d^2 / 72) is the length penalty (sigma 6),
d the difference of the bigram counts (= words - 1) of hypothesis and reference. A clip scores
10 * mean over references of g(d) * (cos_1 + cos_2 + cos_3 + cos_4) / 4.
"""

import math
import random

import pytest
import torch

from avmt.tasks import get_task
from avmt.tasks.metrics import CaptionCIDErD, cider_d_scores

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")

L3, M3 = math.log(3), math.log(3) - math.log(2)  # weights of df 1 and df 2 in a 3-clip corpus

# Three clips, two references on the first (df counts clips: "dog" is in clips 1 and 2 -> df 2).
THREE_HYPS = ["a dog", "the dog", "a cat"]
THREE_REFS = [["a dog", "the dog"], ["a big dog"], ["a cat"]]
# df: "a" 3 -> weight 0; "dog" 2 -> M3; every other n-gram df 1 (or 0 for hypothesis-only ones) -> L3.
# clip 1, hyp "a dog" (a 0, dog M3; "a dog" L3):
#   ref "a dog": identical -> cos_1 = cos_2 = 1, no 3/4-grams -> 0; d = 0 -> sum 2
#   ref "the dog" (the L3, dog M3; "the dog" L3): cos_1 = M3^2 / (M3 * sqrt(L3^2 + M3^2)), cos_2 = 0
#   -> 10 * (2 + M3 / sqrt(L3^2 + M3^2)) / 4 / 2
CLIP1 = 10 * (2 + M3 / math.sqrt(L3 ** 2 + M3 ** 2)) / 4 / 2
# clip 2, hyp "the dog" (the L3, dog M3; "the dog" L3) vs "a big dog" (a 0, big L3, dog M3; "a big",
#   "big dog" L3): cos_1 = M3^2 / (L3^2 + M3^2), cos_2 = 0; d = 1 - 2 -> g(1) = exp(-1/72)
CLIP2 = 10 * math.exp(-1 / 72) * (M3 ** 2 / (L3 ** 2 + M3 ** 2)) / 4
# clip 3, hyp == ref "a cat" (a 0, cat L3; "a cat" L3): cos_1 = cos_2 = 1 -> 10 * 2 / 4
CLIP3 = 5.0


def value(metric):
    return float(metric.compute())


def cider(hyps, refs):
    m = CaptionCIDErD()
    m.update(hyps, refs)
    return value(m)


def test_single_clip_scores_zero_even_when_perfect():
    # N = 1: every reference n-gram has df = 1, weight log 1 - log 1 = 0; all vectors are zero,
    # coco's cosine is then 0 (it only divides by non-zero norms): CIDEr-D needs a corpus.
    assert cider(["a red violin is heard"], ["a red violin is heard"]) == 0.0
    assert cider_d_scores(["a dog"], [["a dog", "a dog barks"]]) == [0.0]


def test_two_clips_hand_computed():
    # N = 2, L = log 2. "a" in both clips' references: weight 0; dog, cat, "a dog", "a cat": L.
    # each hypothesis equals its reference: cos_1 = L^2 / (L * L) = 1, cos_2 = 1, no 3-/4-grams: 0
    # -> 10 * (1 + 1 + 0 + 0) / 4 = 5 per clip
    assert cider(["a dog", "a cat"], ["a dog", "a cat"]) == pytest.approx(5.0, abs=1e-12)
    # a parse failure is the empty caption: its clip scores 0 and still counts; the df come from
    # the references only, so clip 1 still scores 5 -> (5 + 0) / 2
    assert cider(["a dog", None], ["a dog", "a cat"]) == pytest.approx(2.5, abs=1e-12)
    assert cider_d_scores(["a dog", ""], [["a dog"], ["a cat"]]) == pytest.approx([5.0, 0.0], abs=1e-12)


def test_clipping_and_length_penalty_hand_computed():
    # N = 2, L = log 2. Clip 1: hyp "dog dog dog dog" (dog 4L; "dog dog" 3L, "dog dog dog" 2L and the
    # 4-gram L have df 0 -> weight L each), ref "a dog" (a 0, dog L; "a dog" L).
    # cos_1 = min(4L, L) * L / (4L * L) = 1/4 (unclipped it would be 1); cos_2..4 = 0.
    # d = 3 - 1 bigrams = 2 -> g = exp(-4/72). Clip 2 "a cat" == ref -> 5.
    clip1 = 10 * math.exp(-4 / 72) * (1 / 4) / 4
    score = cider(["dog dog dog dog", "a cat"], ["a dog", "a cat"])
    assert score == pytest.approx((clip1 + 5) / 2, abs=1e-12)


def test_three_clips_idf_references_and_penalty_hand_computed():
    assert cider_d_scores(THREE_HYPS, THREE_REFS) == pytest.approx([CLIP1, CLIP2, CLIP3], abs=1e-12)
    assert cider(THREE_HYPS, THREE_REFS) == pytest.approx((CLIP1 + CLIP2 + CLIP3) / 3, abs=1e-12)


def test_normalization_and_reference_forms():
    # same normalization as BLEU / ROUGE-L: lower case, punctuation split off ("dog!" -> "dog !")
    raw = cider(["A Dog!", "a CAT"], ["a dog !", ["A cat"]])
    assert raw == pytest.approx(cider(["a dog !", "a cat"], [["a dog !"], ["a cat"]]), abs=1e-12)
    assert cider(["A Dog!", "a CAT"], ["A dog.", "a cat"]) < raw  # "." is not "!"


def test_empty_cases_and_errors():
    assert value(CaptionCIDErD()) == 0.0  # no clips
    m = CaptionCIDErD()
    m.update([], [])
    assert value(m) == 0.0
    assert cider([None, None], ["a dog", "a cat"]) == 0.0
    assert cider(["", "a cat"], ["a dog", "a cat"]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="reference"):
        CaptionCIDErD().update(["a dog"], [[]])
    with pytest.raises(ValueError, match="pair up"):
        CaptionCIDErD().update(["a dog"], ["a dog", "a cat"])
    m = CaptionCIDErD()
    m.update(["a dog", "a cat"], ["a dog", "a cat"])
    m.reset()
    assert value(m) == 0.0


def test_order_independent():
    order = [2, 0, 1]
    shuffled = cider([THREE_HYPS[i] for i in order], [THREE_REFS[i] for i in order])
    assert shuffled == pytest.approx((CLIP1 + CLIP2 + CLIP3) / 3, abs=1e-12)


def test_states_are_utf8_bytes_concatenated():
    m = CaptionCIDErD()
    m.update(["a café", None], ["a café", ["a cat", "le chat"]])
    assert set(m._reductions) == {"hyp_bytes", "hyp_lengths", "ref_bytes", "ref_lengths", "ref_counts"}
    assert all(getattr(fx, "__name__", "") == "dim_zero_cat" for fx in m._reductions.values())
    assert m.hyp_bytes[0].dtype == torch.uint8 and m.ref_bytes[0].dtype == torch.uint8
    assert bytes(m.hyp_bytes[0].tolist()) == "a café".encode()  # the None is "" (0 bytes)
    assert m.hyp_lengths[0].tolist() == [7, 0] and m.ref_counts[0].tolist() == [1, 2]
    assert m.corpus() == (["a café", ""], [["a café"], ["a cat", "le chat"]])


def test_merged_state_equals_single_pass():
    """Two instances (two DDP ranks) merged = one instance that saw everything."""
    whole = CaptionCIDErD()
    whole.update(THREE_HYPS, THREE_REFS)
    a, b = CaptionCIDErD(), CaptionCIDErD()
    a.update(THREE_HYPS[:1], THREE_REFS[:1])
    b.update(THREE_HYPS[1:], THREE_REFS[1:])
    a.merge_state(b)
    assert value(a) == pytest.approx(value(whole), abs=1e-12)
    assert value(a) == pytest.approx((CLIP1 + CLIP2 + CLIP3) / 3, abs=1e-12)
    # neither part alone gives the corpus number (the df need every clip)
    assert value(b) != pytest.approx(value(whole))


def _fake_gather(other: CaptionCIDErD, seen: list):
    """A 2-rank all-gather: this rank's tensor, then the other rank's state of the same name (the
    states are gathered one by one in ``_reductions`` order)."""
    names = iter(other._reductions)

    def gather(tensor, group=None):
        name = next(names)
        seen.append((name, tensor.dtype))
        state = getattr(other, name)
        remote = torch.cat(state) if state else torch.zeros(0, dtype=other._STATE_DTYPES[name])
        return [tensor, remote]

    return gather


def test_sync_dist_gathers_and_keeps_dtypes():
    a, b = CaptionCIDErD(), CaptionCIDErD()
    a.update(THREE_HYPS[:2], THREE_REFS[:2])
    a.update(THREE_HYPS[2:], THREE_REFS[2:])
    seen: list = []
    a._sync_dist(_fake_gather(b, seen))  # rank 1 saw nothing
    assert value(a) == pytest.approx((CLIP1 + CLIP2 + CLIP3) / 3, abs=1e-12)
    # a rank without data sends empty tensors of the state's dtype (torchmetrics would send float32)
    empty, seen = CaptionCIDErD(), []
    other = CaptionCIDErD()
    other.update(THREE_HYPS, THREE_REFS)
    empty._sync_dist(_fake_gather(other, seen))
    assert seen == [(name, CaptionCIDErD._STATE_DTYPES[name]) for name in CaptionCIDErD._STATE_DTYPES]
    assert value(empty) == pytest.approx((CLIP1 + CLIP2 + CLIP3) / 3, abs=1e-12)


def test_random_corpus_invariants():
    rng = random.Random(3)
    words = "a the dog cat violin is seen heard and left right".split()
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))) for _ in range(20)]
    refs = [[" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 3))]
            for _ in range(20)]
    scores = cider_d_scores(hyps, refs)
    assert all(0.0 <= s <= 10.0 for s in scores)
    assert cider(hyps, refs) == pytest.approx(sum(scores) / 20, abs=1e-12)


def test_task_collections_report_cider_d():
    m = get_task("avcap").metrics()
    m.update(["a dog", None], ["a dog", "a cat"])
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["cider_d"] == pytest.approx(2.5, abs=1e-12)  # as in test_two_clips_hand_computed
    ssu = get_task("ssu").metrics()
    assert "cider_d" in ssu.keys() and {"bleu4", "rouge_l"} <= set(ssu.keys())
    cider_ssu = ssu["cider_d"]
    cider_ssu.update([{"description": "a dog"}, None], [{"description": "a dog"}, {"description": "a cat"}])
    assert value(cider_ssu) == pytest.approx(2.5, abs=1e-12)
