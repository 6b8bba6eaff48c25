"""benchmarks/gpu_clocks.py: nvidia-smi's loop output parsed by time window, and the sampler run
against a stand-in nvidia-smi on the PATH (this machine has none)."""

import datetime
import os

import pytest

from benchmarks import gpu_clocks

T = datetime.datetime(2026, 12, 7, 23, 41, 26)


def stamp(seconds: float) -> str:
    return (T + datetime.timedelta(seconds=seconds)).strftime(gpu_clocks.TIMESTAMP_FORMAT)[:-3]  # ms, as nvidia-smi


def test_parse_keeps_the_samples_of_the_window_and_skips_unreadable_lines():
    text = "\n".join([
        f"{stamp(0.00)}, 1980, 120.5",  # before the work started
        f"{stamp(0.30)}, 1755, 690.0",
        f"{stamp(0.32)}, 1620, 700.1",
        f"{stamp(0.34)}, [N/A], [N/A]",
        "garbage",
        f"{stamp(0.36)}, 1650, 699.9",
        f"{stamp(2.00)}, 1980, 130.0",  # after it ended
    ])  # fmt: skip
    reading = gpu_clocks.parse(text, T + datetime.timedelta(seconds=0.1), T + datetime.timedelta(seconds=1.0))
    assert reading == {"sm_mhz": 1650.0, "power_w": 699.9, "samples": 3}
    assert gpu_clocks.parse(text, T + datetime.timedelta(seconds=3), T + datetime.timedelta(seconds=4)) is None


def test_sampler_without_nvidia_smi_measures_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sampler = gpu_clocks.ClockSampler(0)
    assert sampler.start() is False
    assert sampler.stop(T, T) is None
    assert gpu_clocks.limits(0) is None


def test_sampler_reads_a_stand_in_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *clocks.max.sm*) echo "1980, 700.00" ;;\n'
        '  *) trap "exit 0" TERM; while true; do echo "$(date +\'%Y/%m/%d %H:%M:%S.%3N\'), 1620, 699.5"; sleep 0.02; done ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu_clocks, "device_id", lambda index: f"GPU-fake-{index}")
    assert gpu_clocks.limits(0) == {"max_sm_mhz": 1980.0, "power_limit_w": 700.0}
    sampler = gpu_clocks.ClockSampler(0)
    assert sampler.start()
    begin = datetime.datetime.now()
    import time

    time.sleep(0.3)
    reading = sampler.stop(begin, datetime.datetime.now())
    assert reading is not None and reading["sm_mhz"] == 1620.0 and reading["power_w"] == 699.5
    assert reading["samples"] >= 3


def test_kernels_script_takes_the_clocks_flag(capsys):
    import torch

    from benchmarks import kernels as kernels_script

    if torch.cuda.is_available():
        pytest.skip("checks the flag through the CPU refusal")
    with pytest.raises(SystemExit):
        kernels_script.main(["--ops", "fused_linear_cross_entropy", "--clocks"])
    assert "needs a CUDA GPU" in capsys.readouterr().err  # parsed: the refusal, not "unrecognized arguments"


def test_a_long_run_keeps_sampling_past_a_pipe_buffer(tmp_path, monkeypatch):
    """nvidia-smi's output went to a pipe nobody read before stop(): after 64 KiB (about 30 s of
    samples, less than a compiled model's warm-up) it blocked and took no more samples. The
    stand-in writes 200 KB at once, then samples."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'exit 0' TERM\n"
        'for i in $(seq 5000); do echo "2000/01/01 00:00:00.000, 1980, 100.0"; done\n'
        'while true; do echo "$(date +\'%Y/%m/%d %H:%M:%S.%3N\'), 1700, 650.0"; sleep 0.02; done\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu_clocks, "device_id", lambda index: "GPU-fake")
    sampler = gpu_clocks.ClockSampler(0)
    assert sampler.start()
    import time

    time.sleep(0.5)
    begin = datetime.datetime.now()
    time.sleep(0.3)
    reading = sampler.stop(begin, datetime.datetime.now())
    assert reading is not None and reading["sm_mhz"] == 1700.0 and reading["samples"] >= 3
