"""benchmarks/kernels.py's timing on a GPU: a provider whose CUDA graph capture fails must leave
the device usable for the next rows (it is then timed by its launches instead)."""

import pytest
import torch

from benchmarks import kernels as kernels_script  # benchmarks/kernels.py, not the kernels package


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_device_usable_gpu():
    x = torch.randn(4096, device="cuda", requires_grad=True)

    def syncs():  # a host sync inside the capture, as Liger-Kernel's cross-entropy does
        (x * 2).sum().item()

    home = torch.cuda.current_stream()
    with pytest.raises(Exception):
        kernels_script.graph_ms(syncs, [x])
    assert torch.cuda.current_stream() == home
    assert not torch.cuda.is_current_stream_capturing()
    torch.randn(1024, device="cuda")  # the generator left capture mode
    ms, reading = kernels_script.graph_ms(lambda: (x * 3).sum().backward(), [x])
    assert ms > 0 and reading is None  # no clock reading unless asked for


@pytest.mark.gpu
def test_a_failed_capture_gives_its_memory_back_gpu():
    """The memory a capture allocated before it failed comes back (its pool is released, and the
    allocator no longer counts a capture underway, which kept every later row's freed memory)."""
    x = torch.randn(4096, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()

    def allocates_then_syncs():
        big = torch.ones(256 * 2**20, device="cuda", dtype=torch.uint8)  # 256 MiB in the capture's pool
        (big.sum() + x.sum()).item()

    for _ in range(3):
        with pytest.raises(Exception):
            kernels_script.graph_ms(allocates_then_syncs, [x])
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() - before < 64 * 2**20
    # A side-stream tensor freed after a failed capture is reused, not held back: the same
    # 256 MiB allocated and freed on a second stream ten times leaves one block reserved.
    side = torch.cuda.Stream()
    for _ in range(10):
        with torch.cuda.stream(side):
            y = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)
        y.record_stream(torch.cuda.current_stream())
        y.zero_()
        del y
        torch.cuda.synchronize()  # its use on the current stream is over: the block is free again
    assert torch.cuda.memory_reserved() - before < 600 * 2**20


@pytest.mark.gpu
def test_graph_ms_reads_the_clock_of_its_replays_gpu():
    import shutil

    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi not on the PATH")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ms, reading = kernels_script.graph_ms(lambda: (a @ a).sum().backward(), [a], clock_seconds=1.0)
    assert ms > 0 and reading is not None, "no nvidia-smi sample within the second of replays"
    assert 100 < reading["sm_mhz"] < 5000 and reading["power_w"] > 0 and reading["samples"] >= 1
