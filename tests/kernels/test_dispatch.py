"""The kernel registry: every `triton` entry resolves to a kernel with the reference's signature,
the Liger-Kernel adapters agree with the references (when liger-kernel is installed), and a
choice that cannot run fails with a message naming the fix."""

import pytest
import torch

from src.models.components.dispatch import _REGISTRY, KernelConfig, check_kernels, get_kernel
from src.models.components.embeddings.rotary import RotaryEmbedding, apply_rotary_ref
from src.models.components.loss import cross_entropy_ref, fused_linear_cross_entropy_ref
from src.models.components.mlp import swiglu_ref
from src.models.components.norms import rms_norm_ref
from src.utils.config import ConfigError

from .helpers import DEVICE, assert_close, leaf, needs_triton


@needs_triton
@pytest.mark.parametrize("op", sorted(_REGISTRY))
def test_every_entry_resolves(op):
    for choice in _REGISTRY[op]:
        if choice != "liger":  # optional; resolved by the Liger tests when installed
            assert callable(get_kernel(op, choice)), choice


def test_unknown_op_and_choice():
    with pytest.raises(KeyError, match="unknown op"):
        get_kernel("softmax", "triton")
    with pytest.raises(ValueError, match="choose one of"):
        get_kernel("layernorm", "liger")


def test_triton_without_gpu_or_interpreter_names_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="kernels.rmsnorm=torch"):
        get_kernel("rmsnorm", "triton")


def test_check_kernels_refuses_what_this_machine_cannot_run_before_anything_is_built(monkeypatch):
    """`check_kernels` (called when a run's config is loaded): each chosen implementation is
    resolved, and an explicit flash_attn needs flash-attn installed; torch everywhere passes."""
    from src.models.components.attention import flash

    check_kernels(KernelConfig.reference())
    monkeypatch.setattr(flash, "fa2_installed", lambda: False)
    monkeypatch.setattr(flash, "fa3_installed", lambda: False)
    with pytest.raises(ConfigError, match="kernels.attention: 'flash_attn' needs flash-attn.*set kernels.attention to auto"):
        check_kernels(KernelConfig(attention="flash_attn"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="kernels.swiglu: 'fused_linear'.*set kernels.swiglu=torch"):
        check_kernels(KernelConfig(swiglu="fused_linear"))
    check_kernels(KernelConfig(gelu="cublaslt", linear="tuned"))  # no Triton: they fall back to torch's GEMMs
    # Only the ops the model family builds: a GPT-2 has no RoPE, a Qwen2 no LayerNorm.
    check_kernels(KernelConfig(rope="triton"), "gpt2")
    check_kernels(KernelConfig(layernorm="triton"), "qwen2")
    with pytest.raises(ConfigError, match="kernels.rope: 'triton'"):
        check_kernels(KernelConfig(rope="triton"), "qwen2")


def test_check_kernels_names_a_missing_liger(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_liger)
    with pytest.raises(ConfigError, match="kernels.rmsnorm: 'liger' cannot be imported.*pip install liger-kernel"):
        check_kernels(KernelConfig(rmsnorm="liger"))


def test_errors_name_the_config_key_and_value_that_chose_the_op(monkeypatch):
    """Ops behind another key's value (the fused loss behind `cross_entropy: fused_linear`, the
    fused SwiGLU projection behind `swiglu: fused_linear`) name that key and value, which a user can
    set, not the registry's op name, which is no config key."""
    from src.models.components.loss import LMLoss
    from src.models.components.mlp import SwiGLU
    from src.trainer.config import TrainConfig
    from src.utils.config import from_dict

    with pytest.raises(ValueError, match=r"kernels.cross_entropy: 'bogus'.*'fused_linear'"):
        LMLoss("bogus")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="kernels.cross_entropy: 'fused_linear'.*set kernels.cross_entropy=torch"):
        LMLoss("fused_linear")
    with pytest.raises(ConfigError, match="kernels.swiglu: 'fused_linear_recompute'.*set kernels.swiglu=torch"):
        SwiGLU(16, 32, impl="fused_linear_recompute")
    # the fix the message gives is a key the config accepts
    from_dict(TrainConfig, {"model_config_path": "m.yaml", "kernels": {"cross_entropy": "torch", "swiglu": "torch"}})
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"model_config_path": "m.yaml", "kernels": {"fused_linear_cross_entropy": "torch"}})


# -- Liger adapters -----------------------------------------------------------------------------
# Liger's cross-entropy, fused linear cross-entropy and RoPE kernels run in Triton's interpreter;
# its RMSNorm and SwiGLU kernels do not (they call .to() on Python floats), so those two are
# checked on the GPU only.


def _liger():
    pytest.importorskip("liger_kernel")


@needs_triton
def test_liger_cross_entropy_adapter():
    logits, labels = torch.randn(6, 100, device=DEVICE), torch.randint(0, 100, (6,), device=DEVICE)
    labels[1] = -100
    _liger()
    fn = get_kernel("cross_entropy", "liger")
    a, b = leaf(logits), leaf(logits)
    loss, loss_ref = fn(a, labels, -100, 0.1), cross_entropy_ref(b, labels, -100, 0.1)
    (loss * 0.5).backward()
    (loss_ref * 0.5).backward()
    assert_close(loss, loss_ref, torch.float32)
    assert_close(a.grad, b.grad, torch.float32)


@needs_triton
def test_liger_fused_linear_cross_entropy_adapter():
    _liger()
    h, weight = torch.randn(6, 32, device=DEVICE), torch.randn(100, 32, device=DEVICE)
    labels = torch.randint(0, 100, (6,), device=DEVICE)
    labels[2] = -100
    fn = get_kernel("fused_linear_cross_entropy", "liger")
    results = []
    for f in (fn, fused_linear_cross_entropy_ref):
        hs, ws = leaf(h), leaf(weight)
        loss = f(hs, ws, labels, -100, 0.1)
        (loss * 0.5).backward()
        results.append((loss, hs.grad, ws.grad))
    for got, want in zip(*results):
        assert_close(got, want, torch.float32)


@needs_triton
def test_liger_rope_adapter():
    _liger()
    fn = get_kernel("rope", "liger")
    cos, sin = RotaryEmbedding(16, 10000.0, 32).to(DEVICE)(seq_len=5)
    q, k = torch.randn(2, 5, 4, 16, device=DEVICE), torch.randn(2, 5, 2, 16, device=DEVICE)
    results = []
    for f in (fn, apply_rotary_ref):
        qs, ks = leaf(q), leaf(k)
        # Liger rotates contiguous inputs in place: give it copies, as the model's views are.
        q_out, k_out = f(qs * 1.0, ks * 1.0, cos, sin)
        (q_out.square().sum() + k_out.sum()).backward()
        results.append((q_out, k_out, qs.grad, ks.grad))
    for got, want in zip(*results):
        assert_close(got, want, torch.float32)


@pytest.mark.gpu
def test_liger_rmsnorm_and_swiglu_adapters_gpu():
    _liger()
    x, weight = torch.randn(8, 96, device="cuda"), torch.rand(96, device="cuda")
    for f_name, ref, inputs in (
        ("rmsnorm", rms_norm_ref, lambda a, b: (a, b, 1e-6)),
        ("swiglu", swiglu_ref, lambda a, b: (a, b)),
    ):
        fn = get_kernel(f_name, "liger")
        results = []
        for f in (fn, ref):
            xs, ws = leaf(x), leaf(weight if f_name == "rmsnorm" else x.flip(0))
            f(*inputs(xs, ws)).square().sum().backward()
            results.append((xs.grad, ws.grad))
        for got, want in zip(*results):
            assert_close(got, want, torch.float32, f_name)
