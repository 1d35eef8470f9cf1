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
