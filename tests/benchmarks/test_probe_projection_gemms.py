"""benchmarks/probe_projection_gemms.py: the GEMMs it times are the ones our Linear runs for each
projection of the models it names (shapes from the model configs, operands laid out as Linear
lays them out); the GPU timing itself runs on the GPU machine."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from probe_projection_gemms import MODELS, operands, projection_gemms  # noqa: E402

from src.models import load_model_config  # noqa: E402


def test_qwen2_projection_gemms_follow_the_config():
    cfg = load_model_config(str(REPO / MODELS["qwen2_0.5b"][0]))
    gemms = projection_gemms("qwen2_0.5b")
    forward = {g.layer: (g.N, g.K) for g in gemms if g.case == "forward"}
    head_dim = cfg.n_embd // cfg.n_head
    assert forward == {
        "self_attn.qkv": (cfg.n_embd + 2 * cfg.num_kv_heads * head_dim, cfg.n_embd),
        "self_attn.o_proj": (cfg.n_embd, cfg.n_embd),
        "mlp.gate_up": (2 * cfg.intermediate_size, cfg.n_embd),
        "mlp.down": (cfg.n_embd, cfg.intermediate_size),
    }
    assert {g.M for g in gemms if g.case != "weight grad fp32"} == {4 * 2048}
    # The three GEMMs of one projection do the same work
    for layer in forward:
        assert len({g.flops for g in gemms if g.layer == layer}) == 1


@pytest.mark.parametrize("model", list(MODELS))
def test_operands_multiply_to_the_output_shape(model):
    for g in projection_gemms(model, tokens=64):
        a, b, out_dtype = operands(g, torch.device("cpu"))
        assert a.shape == (g.M, g.K) and b.shape == (g.K, g.N) and a.dtype == b.dtype == torch.bfloat16
        assert (out_dtype == torch.float32) == (g.case == "weight grad fp32")
        if g.case == "forward":  # the weight (N, K) read transposed, as F.linear reads it
            assert b.t().is_contiguous()


def test_list_runs_without_a_gpu():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "probe_projection_gemms.py"), "--list",
                          "--models", "gpt_125m"], capture_output=True, text=True, check=True).stdout
    assert "attn.qkv" in out and "16384 x 2304 x 768" in out and len(out.strip().splitlines()) == 12 + 2
    assert "lm_head chunk          forward           2048 x 50304 x 768" in out  # the loss head's GEMMs per chunk
