"""What a training run writes while it trains, on rank 0: the domain model file (the EMA, in the form's
layout), the resume state and the loss curve at every save (Saver), and the preview pictures (Previewer).
`run` is the loop's trainer.Run (module, EMA, optimizer, step, losses, form)."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..guidance.checkpoint import PRECISIONS
from .batches import TrainingData
from .config import TrainConfig, TrainingDiverged
from .data import TrainingInputError
from .gpu import on_rank0_others_wait
from .loss_curve import loss_curve_path, write_loss_curve
from .preview import PreviewRenderer, PreviewSettings, preview_dir_for, preview_due, save_previews
from .resume import save_resume_state

if TYPE_CHECKING:
    from .trainer import Run

log = logging.getLogger("indomain.training")


class Saver:
    """Writes the domain model file (the EMA, in the form's layout) and the resume state, on rank 0 only."""

    def __init__(self, out_path, resume_file, rank: int, meta, training_info: dict, config: TrainConfig, world: int):
        self.out_path, self.resume_file, self.rank = out_path, resume_file, rank
        self.meta, self.training_info, self.config, self.world = meta, training_info, config, world
        self.step, self.path = None, None
        self.loss_curve = loss_curve_path(out_path) if out_path is not None else None

    def save(self, run: "Run") -> None:
        if self.out_path is None or self.step == run.step:
            return
        # rank 0 writes; the other ranks wait for it on a long-timeout group (training/gpu.py): the resume file
        # (about 4x the UNet) can take longer to write than the collective timeout of the next step
        on_rank0_others_wait(lambda: self._write(run), self.rank, self.world)
        self.step, self.path = run.step, self.out_path

    def _write(self, run: "Run") -> None:
        meta = dataclasses.replace(self.meta, training=dict(self.training_info, steps=run.step,
                                                            target_steps=self.config.steps,
                                                            final_loss=run.losses[-1] if run.losses else None))
        state = run.ema.state_dict(run.module, run.form.keeps_key)
        self.check_not_diverged(run, state)  # before writing: the last good checkpoint stays as it is
        run.form.write(self.out_path, state, meta, precision=self.config.save_precision)
        save_resume_state(self.resume_file, run.module, run.ema, run.optimizer, run.step, {
            "config": dataclasses.asdict(self.config), "world_size": self.world,
            "data_fingerprint": self.training_info["data_fingerprint"], "calibration": run.record,
            "losses": run.losses, "output": self.out_path.name, **run.base_identity}, run.scaler,
            run.form.keeps_key)
        try:
            write_loss_curve(run.losses, self.loss_curve)
        except OSError as e:  # the checkpoint is saved; a missing picture must not stop training
            log.warning("InDomain training: cannot write the loss curve %s (%s)", self.loss_curve, e)

    def check_not_diverged(self, run: "Run", state: dict) -> None:
        """Weights that are NaN/inf, or beyond the file precision's range (fp16: |w| > 65504; no UNet weight is
        near that), mean the run is diverging: TrainingDiverged with the learning-rate advice, not a refusal
        to write that suggests another precision."""
        precision = self.config.save_precision
        top = PRECISIONS[precision]
        for k, v in state.items():
            if not v.is_floating_point() or not v.numel():
                continue
            lo, hi = torch.aminmax(v.detach())  # no |v| copy of each tensor (NaN propagates)
            peak = torch.maximum(-lo, hi)
            if not torch.isfinite(peak):
                raise self.diverged(run, f"the weights became {float(peak)} ({k}) by step {run.step}")
            if not torch.isfinite(peak.to(top)):
                raise self.diverged(run, f"the weights grew to {float(peak):.3g} ({k}) by step {run.step}, past the "
                                         f"range of the {precision} file", precision_note=True)

    def diverged(self, run: "Run", what, precision_note: bool = False) -> TrainingDiverged:
        """`what`: the non-finite loss value, or a sentence saying what diverged."""
        if not isinstance(what, str):
            what = f"training loss became {what} at step {run.step + 1}"
        where = (f"The last good checkpoint ({self.path}, step {self.step}) is kept" if self.step is not None
                 else "No checkpoint had been saved yet")
        lr = self.config.lr
        note = (" (save_precision fp32 would only store the diverging weights)" if precision_note else "")
        return TrainingDiverged(f"{what}; training stopped: it is diverging{note}. {where}. "
                                f"Lower the learning rate (now {lr:g}; try {lr / 10:g}) and start again "
                                "(or resume from the last checkpoint with the lower rate).")


class Previewer:
    """Every config.preview_every steps (and at the end), on rank 0: sample the EMA weights (training/preview.py),
    save the pictures next to the output and hand them to `on_preview(step, total, [(label, PIL image)])`.
    Other ranks wait at their next all-reduce meanwhile."""

    def __init__(self, model_patcher, clip, vae, config: TrainConfig, data: TrainingData, out_path, rank: int,
                 meta, on_preview: Callable | None):
        self.config, self.out_path, self.meta, self.on_preview = config, out_path, meta, on_preview
        self.paths: list[Path] = []
        self.renderer = None
        if config.preview_every and rank == 0:
            if vae is None:
                raise TrainingInputError("previews need the checkpoint's VAE to decode them; pass vae (or set "
                                         "preview_every to 0).")
            self.renderer = PreviewRenderer(model_patcher, clip, vae, PreviewSettings(
                config.preview_every, config.preview_prompt, config.preview_steps, config.seed), data.size_hw)

    def after_step(self, run: "Run") -> None:
        if self.renderer is None or not preview_due(run.step, self.config.steps, self.config.preview_every):
            return
        t0 = time.perf_counter()
        # only what the file holds (a LoRA form: the adapter and constants, never the frozen base's weights)
        images = self.renderer.render(run.form.file_state(run.ema.state_dict(run.module, run.form.keeps_key)),
                                      self.meta)
        if self.out_path is not None:
            self.paths.extend(save_previews(images, preview_dir_for(self.out_path), run.step))
        log.info("InDomain training: preview at step %d (%.1f s of sampling)", run.step, time.perf_counter() - t0)
        if self.on_preview is not None:
            self.on_preview(run.step, self.config.steps, images)
