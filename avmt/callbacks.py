"""Lightning callbacks: cross-cutting reports that read what the module collected.

``GenerationExamples`` writes, at the end of every validation / test epoch, the generated
examples the module kept (``AVModule.examples``) to TensorBoard: each example's prompt, target
and answer as text, and, for tasks that can draw their predictions (``Task.render``), one image
per example (frames with the target and the prediction overlaid, boxes drawn).
"""

from __future__ import annotations

import lightning as L
import numpy as np

__all__ = ["GenerationExamples"]


class GenerationExamples(L.Callback):
    """Log the module's generated examples (text, and images where the task draws them) to TensorBoard.

    Tags: ``{stage}/{task}/examples`` (text) and ``{stage}/{task}/examples/{i}`` (images, HWC).
    Needs a logger with ``add_text`` / ``add_image`` (TensorBoard); does nothing otherwise.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = trainer.logger
        writer = getattr(logger, "experiment", None) if logger is not None else None
        if writer is None or not hasattr(writer, "add_text") or not trainer.is_global_zero:
            return
        step = pl_module.global_step
        for name, examples in getattr(pl_module, "examples", {}).items():
            if not examples:
                continue
            text = "\n\n".join(
                f"**prompt** {e.prompt}\n\n**target** {e.target}\n\n**answer** {e.text}" for e in examples
            )
            writer.add_text(f"{stage}/{name}/examples", text, step)
            task = pl_module._task(name)
            for index, example in enumerate(examples):
                image = task.render(example.frames, example.media, example.answer, example.prediction)
                if image is not None:
                    writer.add_image(f"{stage}/{name}/examples/{index}", np.asarray(image), step, dataformats="HWC")
