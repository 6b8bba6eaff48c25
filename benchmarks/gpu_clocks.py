"""The GPU's SM clock and power draw while a benchmark runs, read by `nvidia-smi` in a loop.

A GEMM-bound op run back to back can hold the GPU at its power cap, where the SM clock drops below
its maximum (an H200 ran the fused linear + cross-entropy at 1620 of 1980 MHz). Timings under that
sustained load are slower than the same kernels launched with gaps, as a profile launches them, so
a benchmark that reports the clock its timing ran at says which of the two a gap is.

    sampler = ClockSampler(device_index=0)
    started = sampler.start()          # False where nvidia-smi is missing: nothing is measured
    begin = datetime.now()
    ...                                # the work, run until it is done
    reading = sampler.stop(begin, datetime.now())  # {"sm_mhz", "power_w", "samples"} or None

nvidia-smi takes a few hundred milliseconds to start sampling, so the work should run for about a
second. Samples are kept by nvidia-smi's own timestamps (local time, as `datetime.now()`), so only
those taken while the work ran count.
"""

from __future__ import annotations

import datetime
import shutil
import statistics
import subprocess
import tempfile

import torch

QUERY = "timestamp,clocks.sm,power.draw"
TIMESTAMP_FORMAT = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's, e.g. 2026/12/07 23:41:26.123


def device_id(device_index: int) -> str:
    """nvidia-smi's name for a CUDA device: its UUID (CUDA's indices follow CUDA_VISIBLE_DEVICES,
    nvidia-smi's do not)."""
    uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def parse(text: str, begin: datetime.datetime, end: datetime.datetime) -> dict | None:
    """Median SM clock (MHz) and power draw (W) of the `QUERY` lines stamped between begin and end;
    None without such a line. Lines nvidia-smi could not fill ("[N/A]") are skipped."""
    clocks, watts = [], []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            when = datetime.datetime.strptime(fields[0], TIMESTAMP_FORMAT)
            clock, power = float(fields[1]), float(fields[2])
        except ValueError:
            continue
        if begin <= when <= end:
            clocks.append(clock)
            watts.append(power)
    if not clocks:
        return None
    return {"sm_mhz": statistics.median(clocks), "power_w": statistics.median(watts), "samples": len(clocks)}


class ClockSampler:
    """`nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --loop-ms=period_ms` for one device,
    from `start()` to `stop()`."""

    def __init__(self, device_index: int, period_ms: int = 20):
        self.device_index = device_index
        self.period_ms = period_ms
        self.process: subprocess.Popen | None = None
        self.output = None

    def start(self) -> bool:
        executable = shutil.which("nvidia-smi")
        if executable is None:
            return False
        # Into a file, not a pipe: nothing reads until stop(), and a pipe's 64 KiB fill in about 30 s
        # at 50 lines a second, after which nvidia-smi blocks and samples no more (a compiled model's
        # warm-up alone takes longer).
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [executable, f"--id={device_id(self.device_index)}", f"--query-gpu={QUERY}",
             "--format=csv,noheader,nounits", f"--loop-ms={self.period_ms}"],
            stdout=self.output, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        return True

    def stop(self, begin: datetime.datetime, end: datetime.datetime) -> dict | None:
        if self.process is None:
            return None
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.output.seek(0)
        text = self.output.read()
        self.output.close()
        self.output = None
        return parse(text, begin, end)


def limits(device_index: int) -> dict | None:
    """The device's maximum SM clock (MHz) and power limit (W), or None without nvidia-smi."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    result = subprocess.run(
        [executable, f"--id={device_id(device_index)}", "--query-gpu=clocks.max.sm,power.limit",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    try:
        clock, power = (float(field) for field in result.stdout.strip().splitlines()[0].split(","))
    except (ValueError, IndexError):
        return None
    return {"max_sm_mhz": clock, "power_limit_w": power}
