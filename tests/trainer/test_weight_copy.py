"""optimizer.bf16_weight_copy: every linear layer's weight kept in bf16 beside the fp32 master,
written by the optimizer, read by the matmuls under bf16 autocast. The copy is exactly the cast it
replaces, so training must be bitwise the same as without it; tests on the CPU under bf16 autocast
(the Triton AdamW through the interpreter)."""

from __future__ import annotations

import pytest
import torch

from src.models import KernelConfig
from src.models.components import Linear, attach_weight_copies, compute_weight, refresh_weight_copies, weight_copies
from src.trainer.optimizer import TritonAdamW
from src.trainer.trainer import Trainer
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo

from .helpers import (
    SyntheticLoader, assert_resume_is_bitwise, make_config, params, tiny_model, tiny_qwen2_model, train_losses,
    with_optimizer,
)

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)

# The optimized kernels of each family that read a weight copy: the projections (fp32_wgrad), GPT-2's
# MLP op, Qwen2's SwiGLU + down projection op and fused linear + cross-entropy (tied head).
GPT2_KERNELS = KernelConfig.reference().replace(linear="fp32_wgrad", gelu="cublaslt", cross_entropy="triton")
QWEN2_KERNELS = KernelConfig.reference().replace(linear="fp32_wgrad", swiglu="fused_linear_recompute",
                                                 cross_entropy="fused_linear", rope="triton")
FAMILIES = {
    "gpt2": lambda seed=0: tiny_model(seed, kernels=GPT2_KERNELS),
    "qwen2": lambda seed=0: tiny_qwen2_model(seed, kernels=QWEN2_KERNELS),
}


def _config(path, implementation="triton", copy=True, **changes):
    cfg = make_config(path, max_steps=4, grad_accum_steps=2, precision="bf16", residual_dtype="bf16", **changes)
    return with_optimizer(cfg, implementation=implementation, bf16_weight_copy=copy)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("implementation", ["triton", "torch"])
def test_training_with_weight_copies_is_bitwise_the_same(family, implementation, tmp_path):
    plain = Trainer(_config(tmp_path / "plain", implementation, copy=False), FAMILIES[family](), SyntheticLoader(4),
                    None, CPU)
    plain.fit()
    copied = Trainer(_config(tmp_path / "copied", implementation), FAMILIES[family](), SyntheticLoader(4), None, CPU)
    assert len(copied.weight_copies) > 0 and not plain.weight_copies
    copied.fit()
    assert train_losses(copied) == train_losses(plain)
    for name, p in params(plain).items():
        assert torch.equal(params(copied)[name], p), name
    # After the last update every copy is its weight, rounded as .to(bfloat16) rounds
    for weight, copy in copied.weight_copies.items():
        assert copy.dtype == torch.bfloat16 and torch.equal(copy, weight.detach().to(torch.bfloat16))


def test_every_linear_weight_gets_one_copy_and_tied_weights_share_it():
    model = tiny_qwen2_model(kernels=QWEN2_KERNELS)
    keys = set(model.state_dict())
    n = attach_weight_copies(model)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert n == len({id(m.weight) for m in linears}) == len(linears)  # the tied head shares the embedding's weight
    assert model.lm_head.weight is model.embed_tokens.weight and model.lm_head.weight_copy is not None
    assert set(model.state_dict()) == keys  # not saved: checkpoints and HF exports are unchanged
    assert all(m.weight_copy.dtype == torch.bfloat16 for m in linears)
    assert "bf16 weight copy" in repr(model.lm_head)


def test_the_copy_is_read_only_under_autocast_in_its_dtype():
    weight = torch.randn(8, 4, requires_grad=True)
    stale = torch.zeros(8, 4, dtype=torch.bfloat16)  # a stale copy shows whether it was read
    assert compute_weight(weight, stale) is weight  # no autocast: the fp32 weight
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_weight(weight, stale) is weight  # another dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        read = compute_weight(weight, stale)
        assert read.dtype == torch.bfloat16 and torch.equal(read, stale)
        (read.float() * torch.arange(32.0).view(8, 4)).sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.equal(weight.grad, torch.arange(32.0).view(8, 4))


def test_resume_with_weight_copies_is_bitwise(tmp_path):
    def copies_follow_the_loaded_weights(second):  # not the ones its model was built with
        for weight, copy in second.weight_copies.items():
            assert torch.equal(copy, weight.detach().to(torch.bfloat16))

    assert_resume_is_bitwise(_config(tmp_path / "straight"), _config(tmp_path / "split"), FAMILIES["qwen2"], CPU,
                             copies_follow_the_loaded_weights)


def test_a_skipped_step_leaves_the_copies_with_their_weights(tmp_path):
    trainer = Trainer(_config(tmp_path / "run"), FAMILIES["gpt2"](), SyntheticLoader(4), None, CPU)
    assert isinstance(trainer.optimizer, TritonAdamW)
    trainer.fit(until_step=1)
    before = {w: c.clone() for w, c in trainer.weight_copies.items()}
    trainer.optimizer.found_inf = torch.ones(())
    trainer.optimizer.step()
    for weight, copy in trainer.weight_copies.items():
        assert torch.equal(copy, before[weight])


def test_refresh_writes_each_weight_into_its_copy():
    model = tiny_model(kernels=GPT2_KERNELS)
    attach_weight_copies(model)
    copies = weight_copies(model)
    with torch.no_grad():
        for weight in copies:
            weight.add_(1.0)  # as a checkpoint load would change them
    refresh_weight_copies(copies)
    for weight, copy in copies.items():
        assert torch.equal(copy, weight.detach().to(torch.bfloat16))


def test_weight_copies_need_bf16_and_no_fsdp2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="trainer.precision: bf16"):
        with_optimizer(make_config(tmp_path / "a", precision="fp32"), bf16_weight_copy=True)
    with pytest.raises(ConfigError, match="FSDP2"):
        _config(tmp_path / "b", strategy="fsdp2")
    # precision auto resolves to fp32 on the CPU: no copies, and the log says so
    trainer = Trainer(with_optimizer(make_config(tmp_path / "c"), bf16_weight_copy=True), tiny_model(),
                      SyntheticLoader(4), None, CPU)
    assert not trainer.weight_copies and not any(isinstance(m, Linear) and m.weight_copy is not None
                                                 for m in trainer.bare.modules())
    assert "bf16_weight_copy is off for this run: it computes in fp32" in capsys.readouterr().out
