"""trainer.residual_dtype: the residual stream in bf16 under autocast (cast once after the
embeddings), inert without autocast, applied to every model inside the trained module."""

import pytest
import torch

from src.models import AutoModelForCausalLM, KernelConfig
from src.models.dpo import DPOModel
from src.trainer.config import TrainerConfig
from src.trainer.parallelize import apply_residual_dtype, prepare_model
from src.trainer.trainer import Trainer
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config, tiny_model

TINY = {"gpt2": "configs/model/gpt2_tiny.yaml", "qwen2": "configs/model/qwen2_tiny.yaml"}  # the shipped tiny models
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def _block_input_dtypes_and_loss(family, residual_dtype, autocast):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY[family], kernels=KernelConfig.reference())
    apply_residual_dtype(model, residual_dtype)
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    return seen, loss.detach(), model.lm_head.weight.grad


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_bf16_residual_stream_under_autocast(family):
    seen, loss, grad = _block_input_dtypes_and_loss(family, torch.bfloat16, autocast=True)
    assert seen == [torch.bfloat16] * len(seen) and seen
    ref_seen, ref_loss, ref_grad = _block_input_dtypes_and_loss(family, None, autocast=True)
    assert ref_seen == [torch.float32] * len(ref_seen)  # autocast's own: the fp32 embeddings carried through
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert grad.dtype == torch.float32  # the weights and their gradients stay fp32
    # bf16 rounding of the stream: compared as a whole, not element by element (one small element
    # can be 4x off on a CPU whose bf16 kernels round differently: an AVX2 machine gave 3.9 for one
    # of 20480, with 0.6% error overall)
    rel_error = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert rel_error < 0.02, rel_error
    assert (grad - ref_grad).abs().max() < 0.03 * ref_grad.abs().max()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_residual_dtype_is_inert_without_autocast(family):
    seen, loss, grad = _block_input_dtypes_and_loss(family, torch.bfloat16, autocast=False)
    ref_seen, ref_loss, ref_grad = _block_input_dtypes_and_loss(family, None, autocast=False)
    assert seen == ref_seen == [torch.float32] * len(seen)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def test_apply_reaches_the_policy_and_the_reference_of_dpo():
    dpo = DPOModel(tiny_model(0), tiny_model(1))
    apply_residual_dtype(dpo, torch.bfloat16)
    assert dpo.policy.residual_dtype == dpo.reference.residual_dtype == torch.bfloat16
    apply_residual_dtype(dpo, None)
    assert dpo.policy.residual_dtype is None and dpo.reference.residual_dtype is None


def test_prepare_model_sets_it_only_with_bf16(tmp_path):
    cfg = make_config(tmp_path / "run", residual_dtype="bf16", precision="bf16")
    _, bare = prepare_model(tiny_model(), cfg, CPU, bf16=True)
    assert bare.residual_dtype == torch.bfloat16
    _, bare = prepare_model(tiny_model(), make_config(tmp_path / "run2"), CPU, bf16=True)
    assert bare.residual_dtype is None  # the default: autocast's fp32 stream
    cfg = make_config(tmp_path / "run3", residual_dtype="bf16")  # precision auto: fp32 on the CPU
    _, bare = prepare_model(tiny_model(), cfg, CPU, bf16=False)
    assert bare.residual_dtype is None


def test_bf16_residual_needs_bf16_precision():
    with pytest.raises(ConfigError, match="residual_dtype=bf16 needs bf16 autocast"):
        TrainerConfig(max_steps=1, precision="fp32", residual_dtype="bf16")


def test_trainer_trains_with_a_bf16_residual_stream_on_the_cpu(tmp_path):
    cfg = make_config(tmp_path / "run", max_steps=6, precision="bf16", residual_dtype="bf16")
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    first = trainer.train_step([next(iter(SyntheticLoader(4)))])[0]
    trainer.fit()
    last = trainer.train_step([next(iter(SyntheticLoader(4, seed=3)))])[0]
    assert torch.isfinite(torch.as_tensor(last)) and float(last) < float(first)


def test_precomputed_dpo_reference_runs_like_the_live_one(tmp_path):
    """The stored reference log-probs of DPO come from the precision the live reference would run
    in, the residual stream included."""
    from src.trainer.launch import _reference_precision

    reference = tiny_model()
    cfg = make_config(tmp_path / "run", precision="bf16", residual_dtype="bf16")
    with _reference_precision(cfg, reference, CPU):
        assert torch.is_autocast_enabled("cpu")
    assert reference.residual_dtype == torch.bfloat16
    with _reference_precision(make_config(tmp_path / "run2"), reference, CPU):  # auto: fp32 on the CPU
        assert not torch.is_autocast_enabled("cpu")
    assert reference.residual_dtype is None
