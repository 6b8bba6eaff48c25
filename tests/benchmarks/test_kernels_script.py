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
    assert kernels_script.graph_ms(lambda: (x * 3).sum().backward(), [x]) > 0
