"""benchmarks/attention.py's arguments, checked before it looks for a GPU (the timings themselves
are measured on a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import attention  # noqa: E402


@pytest.mark.parametrize("flag", ["--seq-lens", "--head-dims", "--tokens", "--gqa-ratio", "--doc-len", "--window"])
def test_non_positive_sizes_are_refused_by_name(flag, capsys):
    """A zero was a ZeroDivisionError deep in the shape loop."""
    with pytest.raises(SystemExit):
        attention.main([flag, "0"])
    assert f"{flag} must be positive, got 0" in capsys.readouterr().err
