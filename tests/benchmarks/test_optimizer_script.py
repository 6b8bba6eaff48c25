"""benchmarks/optimizer.py on the CPU: its launch-setting argument, the parameter shapes it takes
from a model config, and the correctness check each timed row carries (the timings themselves
are measured on a GPU)."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

from src.models import AutoModelForCausalLM, load_model_config
from tests.kernels.helpers import DEVICE, needs_triton

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import optimizer  # noqa: E402


def test_launch_settings_parse_and_bad_ones_name_the_rule():
    assert optimizer.parse_launch("1024x8") == (1024, 8)
    for bad, message in [("1024", "BLOCKxWARPS"), ("1000x8", "power of two"), ("1024x3", "num_warps")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            optimizer.parse_launch(bad)


def test_parameter_shapes_are_the_models_in_the_trainers_groups():
    path = REPO / "configs/model/qwen2_tiny.yaml"
    decayed, undecayed = optimizer.parameter_shapes(str(path))
    model = AutoModelForCausalLM.from_config(load_model_config(path))
    assert sum(torch.Size(s).numel() for s in decayed + undecayed) == model.num_parameters()
    assert all(len(s) == 2 for s in decayed)  # matrices; norms, biases and the embedding table undecayed
    assert any(len(s) == 1 for s in undecayed)


@needs_triton
@pytest.mark.parametrize("launch", [(1024, 8), (128, 1)])
def test_every_timed_launch_setting_is_checked_against_torch(launch):
    shapes = optimizer.parameter_shapes(str(REPO / "configs/model/gpt2_tiny.yaml"))
    assert optimizer.max_update_error(shapes, torch.device(DEVICE), launch) < 1e-6


def test_bytes_moved_per_parameter():
    assert optimizer.bytes_per_param("triton") == optimizer.bytes_per_param("torch fused") == optimizer.BYTES_PER_PARAM
    assert optimizer.bytes_per_param("triton bf16 moments") == 20


@needs_triton
def test_the_bf16_moment_row_is_checked_too():
    """Two steps of lr 1e-3 from the same state: bf16 moments move the weights by the fp32 update
    to within their rounding, far less than a step, but not bit for bit."""
    shapes = optimizer.parameter_shapes(str(REPO / "configs/model/gpt2_tiny.yaml"))
    assert 0 < optimizer.max_update_error(shapes, torch.device(DEVICE), (1024, 8), "triton bf16 moments") < 1e-4


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        optimizer.main([])
    assert "needs a CUDA GPU" in capsys.readouterr().err


@needs_triton
def test_each_optimizer_gets_its_own_settings_on_shared_parameters():
    groups = optimizer.make_groups([[(4, 3)], [(5,)]], torch.device(DEVICE))
    optimizer.build("triton", groups)
    fused = optimizer.build("torch foreach", groups)
    assert all(g["foreach"] is True for g in fused.param_groups)  # not TritonAdamW's foreach=False
    assert [g["weight_decay"] for g in fused.param_groups] == [optimizer.WEIGHT_DECAY, 0.0]
