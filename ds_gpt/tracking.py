"""Weights & Biases, nanoGPT's way (--wandb_log, --wandb_project, --wandb_run_name), made for clusters.

Compute nodes usually have no internet, so a run logs offline unless WANDB_MODE says otherwise;
`wandb sync OUT/wandb/offline-run-*` uploads it from a login node. The run id lives in
OUT/wandb_run_id, so a requeued or resumed job continues the same W&B run instead of starting
a new one. The x-axis is the trainer's `iter` (not W&B's own step counter), so a resume that
repeats iterations since the last checkpoint is recorded, as metrics.jsonl records it, rather
than dropped as a step that went backwards.

wandb is an optional extra (`make setup EXTRAS=wandb`), imported only when asked for. The API key
stays in the environment (WANDB_API_KEY) or ~/.netrc: nothing here writes it anywhere.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from ds_gpt import atomic, file_modes
from ds_gpt.errors import UserError

RUN_ID_FILE = "wandb_run_id"


def check_available() -> None:
    """Refuse --wandb_log without the extra while the run is being built, before any rendezvous."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb_log needs the wandb package", hint="make setup EXTRAS=wandb") from None


class WandbRun:
    """One W&B run fed the same scalars as metrics.jsonl and TensorBoard."""

    def __init__(self, out_dir: Path, project: str, name: str | None, config: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        id_path = Path(out_dir) / RUN_ID_FILE
        run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:8]  # W&B's id length
        atomic.write_with(id_path, lambda tmp: file_modes.write_private(tmp, run_id + "\n"))
        file_modes.private_dir(Path(out_dir) / "wandb")  # W&B's files (config, host, args) stay the owner's
        self.run = wandb.init(project=project, name=name or Path(out_dir).resolve().name, id=run_id,
                              resume="allow", dir=str(out_dir), config=config)
        self.run.define_metric("iter")
        self.run.define_metric("*", step_metric="iter")

    def log(self, scalars: dict[str, float], iter_num: int) -> None:
        self.run.log({**scalars, "iter": iter_num})

    def close(self) -> None:
        self.run.finish()
