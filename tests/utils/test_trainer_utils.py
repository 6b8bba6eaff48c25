"""src/utils: device choice, rank-0 logging sinks, formatting, peak FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from src.utils.config import ConfigError
from src.utils.distributed import init_distributed, resolve_device
from src.utils.logger import MetricsLogger, progress_line
from src.utils.misc import format_count, format_duration, peak_flops, rng_state, set_rng_state


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU is visible; set trainer.device=auto or cpu"):
            resolve_device("cuda")


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.backend, info.is_rank0) == (0, 1, None, True)


def test_metrics_logger_writes_jsonl_and_prints(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), is_rank0=True, run_id="abc")
    logger.log_metrics(10, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.0, "max_steps": 100.0,
                            "mfu": 0.41, "eta_s": 75.0})
    logger.log_metrics(10, {"loss": 2.7}, prefix="val")
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 10 and rows[0]["train/loss"] == 2.5 and rows[1]["val/loss"] == 2.7
    out = capsys.readouterr().out
    assert "train step 10/100 | loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | 12.3k tok/s | MFU 41.0% | ETA 1m15s" in out


def test_other_ranks_write_nothing(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path / "r1"), is_rank0=False, run_id="abc")
    logger.info("hello")
    logger.log_metrics(1, {"loss": 1.0})
    logger.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "r1").exists()


def test_progress_line_skips_unknowns():
    assert progress_line(3, {"loss": 1.0}) == "train step 3 | loss 1.0000"


def test_formatting_and_peak_flops():
    assert format_count(1234567) == "1.2M" and format_count(12) == "12"
    assert format_duration(3725) == "1h02m" and format_duration(59) == "59s"
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override=1e12) == 1e12


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_non_finite_metrics_are_written_as_json_null(tmp_path):
    """A window of skipped steps has a NaN loss and an infinite gradient norm: metrics.jsonl stays
    strict JSON (null), which every parser reads."""
    logger = MetricsLogger(str(tmp_path), is_rank0=True, run_id="abc")
    logger.log_metrics(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(constant):
        raise ValueError(constant)

    row = json.loads(line, parse_constant=refuse)
    assert row["train/loss"] is None and row["train/grad_norm"] is None and row["train/lr"] == 1e-3
