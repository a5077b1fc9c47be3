"""What a training run shows besides metrics.jsonl: images/curves.png, and TensorBoard when `tensorboard = true`.

The trainer calls it twice: `record` beside every metrics.jsonl line, `epoch_end` after an epoch's pictures. Rank 0
only. TensorBoard gets the same scalars as metrics.jsonl (tag "KIND/KEY" at the record's step) and the epoch's
grids, through torch.utils.tensorboard, which needs the optional tensorboard package (`facevae[tensorboard]`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from facevae.config import Config
from facevae.curves import save_run_curves
from facevae.errors import UserError
from facevae.run import Run

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"
GRIDS = ("reconstructions", "samples")  # images/NAME.png: the latest grids, sent to TensorBoard as they are drawn


def require_tensorboard() -> None:
    """A one-line UserError when the tensorboard package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401 - raises ImportError without the tensorboard package
    except ImportError:
        raise UserError("tensorboard = true needs the tensorboard package: pip install 'facevae[tensorboard]' "
                        "(or train without --set tensorboard=true)") from None


class RunWatch:
    """images/curves.png and TensorBoard for one run. Creating it checks the packages, before any training."""

    def __init__(self, run: Run, config: Config, *, enabled: bool = True):
        self.run, self.enabled = run, enabled
        self.tensorboard = enabled and config.tensorboard
        if self.tensorboard:
            require_tensorboard()
        self._writer: SummaryWriter | None = None

    def _board(self, step: int) -> "SummaryWriter":
        """The event writer, opened at the first record (a resumed run's is at its checkpoint's step): events an
        earlier process logged past `step` are hidden, as metrics.jsonl drops those lines."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run.path / TENSORBOARD_DIR), purge_step=step + 1 if step else None)
        return self._writer

    def record(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record's numbers as TensorBoard scalars "KIND/KEY" at its step (the run record as text)."""
        if not self.tensorboard:
            return
        step = int(record.get("step", 0))
        board = self._board(step)
        kind = record.get("kind", "record")
        if kind == "run":
            board.add_text("run", "  \n".join(f"{k}: {v}" for k, v in record.items()), global_step=step)
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and key not in ("step", "kind"):
                board.add_scalar(f"{kind}/{key}", value, global_step=step)
        board.flush()  # every logged line reaches the disk, as metrics.jsonl's does

    def epoch_end(self, step: int, *, pictures: bool) -> None:
        """After an epoch whose grids were drawn (`pictures`): redraw images/curves.png, send the grids."""
        if not (self.enabled and pictures):
            return
        save_run_curves(self.run)
        if self.tensorboard:
            import numpy as np
            from PIL import Image

            board = self._board(step)
            for name in GRIDS:
                path = self.run.picture(f"{name}.png")
                if path.is_file():
                    with Image.open(path) as img:
                        board.add_image(name, np.asarray(img.convert("RGB")), global_step=step, dataformats="HWC")
            board.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
