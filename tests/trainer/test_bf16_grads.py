"""optimizer.bf16_grads: the linear layers' weight gradients land in their bf16 weight copies (the
copies are leaves the matmuls read, as bf16 parameters) and our AdamW reads them there. The values
are the bf16 GEMM outputs that `linear: torch` casts to fp32 on their way to `.grad`, so with the
reference kernels a run is bitwise the run without bf16_grads; with the optimized kernels (fp32 weight
gradients straight from the GEMMs) it is within bf16 rounding. CPU under bf16 autocast, the Triton
AdamW through the interpreter."""

from __future__ import annotations

import pytest
import torch

from src.models import KernelConfig
from src.models.components import Linear, attach_weight_copies, gradient_copies
from src.trainer.trainer import Trainer
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo

from .helpers import (
    SyntheticLoader, assert_resume_is_bitwise, make_config, params, tiny_model, tiny_qwen2_model, train_losses,
    with_optimizer,
)
from .test_weight_copy import FAMILIES, GPT2_KERNELS, QWEN2_KERNELS

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
REFERENCE = {
    "gpt2": lambda seed=0: tiny_model(seed, kernels=KernelConfig.reference()),
    "qwen2": lambda seed=0: tiny_qwen2_model(seed, kernels=KernelConfig.reference()),
}


def _config(path, bf16_grads=True, implementation="triton", max_steps=4, grad_clip=1.0, **changes):
    cfg = make_config(path, max_steps=max_steps, precision="bf16", residual_dtype="bf16", **changes)
    cfg = with_optimizer(cfg, implementation=implementation, bf16_weight_copy=True, bf16_grads=bf16_grads,
                         grad_clip=grad_clip)
    return cfg


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_with_the_reference_kernels_training_is_bitwise_the_bf16_weight_gradients_cast_to_fp32(family, tmp_path):
    # No clipping: the norm of the same values summed in another order may differ in its last bit
    plain = Trainer(_config(tmp_path / "plain", bf16_grads=False, grad_clip=0.0), REFERENCE[family](),
                    SyntheticLoader(4), None, CPU)
    plain.fit()
    ours = Trainer(_config(tmp_path / "ours", grad_clip=0.0), REFERENCE[family](), SyntheticLoader(4), None, CPU)
    assert len(ours.gradient_copies) > 0 and not plain.gradient_copies
    ours.fit()
    assert train_losses(ours) == train_losses(plain)
    for name, p in params(plain).items():
        assert torch.equal(params(ours)[name], p), name
    for weight, copy in ours.gradient_copies.items():
        assert weight.grad is None and copy.grad is None  # zeroed after the last step
        assert torch.equal(copy.detach(), weight.detach().to(torch.bfloat16))


TUNED = {
    "gpt2": lambda seed=0: tiny_model(seed, kernels=GPT2_KERNELS.replace(linear="tuned")),
    "qwen2": lambda seed=0: tiny_qwen2_model(seed, kernels=QWEN2_KERNELS.replace(linear="tuned")),
}


@pytest.mark.parametrize("linear", ["fp32_wgrad", "tuned"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_with_the_optimized_kernels_gradients_are_the_fp32_ones_rounded(family, linear, tmp_path):
    """One backward of the optimized kernels (fp32_wgrad, the fused MLP ops, the fused loss): each
    copy's gradient is the fp32 weight gradient of the run without bf16_grads, to bf16 rounding.
    `linear: tuned` runs the copies' GEMMs in its own Function (not autograd's): the same."""
    grads = {}
    for bf16_grads in (False, True):
        model = (TUNED if linear == "tuned" and bf16_grads else FAMILIES)[family]()
        trainer = Trainer(_config(tmp_path / f"run{bf16_grads}", bf16_grads=bf16_grads), model,
                          SyntheticLoader(4), None, CPU)
        batch = trainer._to_device(next(iter(SyntheticLoader(4))))
        with trainer._autocast():
            trainer.model(**batch).loss.backward()
        grads[bf16_grads] = {name: trainer.gradient_of(p) for name, p in trainer.bare.named_parameters()}
    n_bf16 = 0
    for name, fp32 in grads[False].items():
        ours = grads[True][name]
        assert fp32.dtype == torch.float32, name
        if ours.dtype == torch.bfloat16:
            n_bf16 += 1
        torch.testing.assert_close(ours.float(), fp32, rtol=2e-2, atol=1e-4 * fp32.abs().max().item(), msg=name)
    assert n_bf16 > 0


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_the_lm_head_tied_or_frozen_weights_keep_fp32_gradients(family):
    model = FAMILIES[family]()
    frozen = next(m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head)
    frozen.weight.requires_grad_(False)
    n = attach_weight_copies(model, grads=True)
    copies = gradient_copies(model)
    linears = {id(m.weight): m for m in model.modules() if isinstance(m, Linear)}
    assert n == len(linears) and len(copies) == n - 2 > 0  # all but the (tied) head and the frozen one
    assert model.lm_head.weight not in copies and not model.lm_head.weight_copy.requires_grad
    assert frozen.weight not in copies and not frozen.weight_copy.requires_grad
    assert all(copy.dtype == torch.bfloat16 and copy.is_leaf for copy in copies.values())
    assert "bf16 weight copy with its gradient" in repr(next(m for m in model.modules()
                                                             if isinstance(m, Linear) and m.weight in copies))
    assert set(model.state_dict()) == set(FAMILIES[family]().state_dict())  # checkpoints unchanged


def test_resume_with_bf16_grads_is_bitwise(tmp_path):
    def copies_are_the_loaded_weights_and_still_leaves(second):
        assert second.gradient_copies
        for weight, copy in second.gradient_copies.items():
            assert torch.equal(copy.detach(), weight.detach().to(torch.bfloat16)) and copy.requires_grad

    assert_resume_is_bitwise(_config(tmp_path / "straight"), _config(tmp_path / "split"), FAMILIES["qwen2"], CPU,
                             copies_are_the_loaded_weights_and_still_leaves)


def test_a_nonfinite_gradient_in_a_copy_skips_the_step(tmp_path):
    trainer = Trainer(_config(tmp_path / "run"), FAMILIES["gpt2"](), SyntheticLoader(4), None, CPU)
    trainer.fit(until_step=1)
    before = {name: p.clone() for name, p in params(trainer).items()}
    copy = next(iter(trainer.gradient_copies.values()))
    hook = copy.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, grad_norm, applied = trainer.train_step([next(iter(SyntheticLoader(4)))])
    hook.remove()
    assert not bool(applied) and not torch.isfinite(grad_norm)
    for name, p in params(trainer).items():
        assert torch.equal(p, before[name]), name


def test_bf16_grads_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="bf16_weight_copy: true"):
        with_optimizer(make_config(tmp_path / "a", precision="bf16"), bf16_grads=True)
    with pytest.raises(ConfigError, match="needs our Triton AdamW"):
        _config(tmp_path / "b", implementation="torch")
    with pytest.raises(ConfigError, match="parallel.strategy: none"):
        _config(tmp_path / "c", strategy="ddp")
    with pytest.raises(ConfigError, match="trainer.grad_accum_steps: 1"):
        _config(tmp_path / "d", grad_accum_steps=2)
    # implementation auto resolves to torch's AdamW on the CPU
    with pytest.raises(ConfigError, match="resolves optimizer.implementation=auto to torch's"):
        Trainer(_config(tmp_path / "e", implementation="auto"), tiny_model(), SyntheticLoader(4), None, CPU)
