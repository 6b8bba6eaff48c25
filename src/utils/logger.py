"""Rank-0 logging: console messages, a progress line per logging step, metrics.jsonl, wandb.

    logger = MetricsLogger(run_dir, is_rank0, run_id, wandb_cfg=...)
    logger.info("building model")
    logger.log_metrics(step, {"loss": 3.2, "lr": 3e-4, ...})   # progress line + jsonl + wandb
    logger.close()

Only rank 0 prints and writes; other ranks get a logger whose methods do nothing, so callers
never branch on the rank. metrics.jsonl is strict JSON: a NaN or infinite value is written as
null. wandb is imported only when enabled; a resumed run passes the same
`run_id`, so wandb continues the same run (resume="allow").
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from .misc import format_count, format_duration


def console(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        is_rank0: bool,
        run_id: str,
        wandb_mode: str = "disabled",
        wandb_project: str = "trainer",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = is_rank0
        self.run_id = run_id
        self._wandb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # Appending keeps the history of a resumed run in one file; rows carry their step.
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    f"logging.wandb={wandb_mode!r} but wandb is not installed; pip install wandb or set logging.wandb=disabled"
                ) from e
            self._wandb = wandb.init(
                project=wandb_project,
                name=run_name,
                id=run_id,
                resume="allow",
                mode=wandb_mode,
                dir=run_dir,
                config=config,
            )

    def info(self, message: str) -> None:
        if self.enabled:
            console(message)

    def log_metrics(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Write one row; for the train prefix also print the progress line."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        # NaN and inf are no JSON (json.dumps would write bare NaN / Infinity, which strict parsers
        # refuse): a window of skipped steps or an infinite gradient norm is written as null.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        self._jsonl.write(json.dumps(finite, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)
        console(progress_line(step, metrics, prefix))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def progress_line(step: int, m: dict[str, float], prefix: str = "train") -> str:
    """`step 120/1000 | loss 3.2145 | lr 3.00e-04 | gnorm 0.85 | 125.3k tok/s | MFU 41.2% | mem 12.3 GiB | ETA 5m12s`."""
    total = m.get("max_steps")
    parts = [f"{prefix} step {step}" + (f"/{int(total)}" if total else "")]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}")
    if "lr" in m:
        parts.append(f"lr {m['lr']:.2e}")
    if "grad_norm" in m:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    if "tokens_per_s" in m:
        parts.append(f"{format_count(m['tokens_per_s'])} tok/s")
    if m.get("mfu") is not None and not math.isnan(m["mfu"]):
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "mem_gib" in m:
        parts.append(f"mem {m['mem_gib']:.1f} GiB")
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])}")
    if "eta_s" in m:
        parts.append(f"ETA {format_duration(m['eta_s'])}")
    return " | ".join(parts)
