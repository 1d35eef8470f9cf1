"""Suite-wide setup.

Triton picks interpreter mode when it is first imported, so ``TRITON_INTERPRET=1`` is set here,
before any test module imports it: on a machine without CUDA the kernel tests then run on the
CPU through the interpreter, whichever test file happens to import triton first.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(prompts, frames, audio, clip_index, targets=None, model=None)``: a Batch whose media
    references follow each prompt's placeholders (about clip ``clip_index[b]``; ``<image>`` takes
    segment 0); with ``targets`` and ``model`` the tokens (with labels) are set too."""
    from avmt.data.sample import Batch, MediaRef

    def build(prompts, frames, audio, clip_index, targets=None, model=None, tasks=None):
        media = []
        for prompt, clip in zip(prompts, [int(c) for c in clip_index]):
            refs = re.findall(r"<video>|<audio>|<image>", prompt)
            media.append(tuple(MediaRef(r, clip, 0 if r == "<image>" else None) for r in refs))
        batch = Batch(
            frames=frames, audio=audio, clip_keys=[f"clip-{i}" for i in range(frames.shape[0])],
            tasks=list(tasks or ["test"] * len(prompts)), prompts=list(prompts),
            targets=list(targets or [""] * len(prompts)), answers=[None] * len(prompts), media=media,
        )
        if targets is not None and model is not None:
            batch.tokens = model.tokenize(prompts, targets)
        return batch

    return build


@pytest.fixture
def one_thread():
    """One torch thread for the test: its tiny models gain nothing from more, and two OpenMP
    threads crawl when the cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
