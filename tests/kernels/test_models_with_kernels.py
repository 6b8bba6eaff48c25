"""A tiny GPT-2 and a tiny Qwen2 with every Triton kernel on give the loss and gradients of the
same model with every kernel off; on the GPU also under torch.compile(fullgraph=True)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from src.models import AutoModelForCausalLM, KernelConfig
from src.utils.config import ConfigError, from_dict

from .helpers import DEVICE, INTERPRET, assert_close, needs_triton

pytestmark = needs_triton

TINY_GPT2 = dict(model_family="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=16)
TINY_QWEN2 = dict(
    model_family="qwen2", n_layer=2, n_head=4, num_kv_heads=2, n_embd=32, intermediate_size=48,
    vocab_size=101, block_size=16, tie_word_embeddings=True,
)  # fmt: skip
# `gelu: cublaslt` is GPT-2's (its cuBLASLt epilogues run on a GPU; the CPU takes the op's unfused math).
ALL_ON = dict(rmsnorm="triton", layernorm="triton", rope="triton", swiglu="triton", gelu="cublaslt")


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] = self.calls.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))


def _loss_and_grads(family, kernels, input_ids, labels, position_ids=None, dtype=torch.float32, compile=False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family, kernels=kernels).to(device=input_ids.device, dtype=dtype)
    forward = torch.compile(model, fullgraph=True) if compile else model
    loss = forward(input_ids, labels=labels, position_ids=position_ids, return_logits=False).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def _batch(vocab, B=2, T=8, device=DEVICE):
    input_ids = torch.randint(0, vocab, (B, T), device=device)
    labels = torch.randint(0, vocab, (B, T), device=device)
    labels[0, :3] = -100
    return input_ids, labels


def _compare(family, cross_entropy, dtype=torch.float32, device=DEVICE, compile=False, tol_dtype=None, swiglu="triton",
             **batch_kw):
    input_ids, labels = _batch(family["vocab_size"], device=device, **batch_kw)
    position_ids = None
    if family["model_family"] == "qwen2":  # two packed documents in row 1
        T = input_ids.shape[1]
        position_ids = torch.arange(T, device=device).repeat(input_ids.shape[0], 1)
        position_ids[1, T // 2 :] -= T // 2
    off = KernelConfig(attention="sdpa")
    on = KernelConfig(attention="sdpa", cross_entropy=cross_entropy, **dict(ALL_ON, swiglu=swiglu))
    loss_ref, grads_ref = _loss_and_grads(family, off, input_ids, labels, position_ids, dtype)
    loss, grads = _loss_and_grads(family, on, input_ids, labels, position_ids, dtype, compile=compile)
    tol_dtype = tol_dtype or dtype
    assert_close(loss, loss_ref, tol_dtype, "loss")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name], tol_dtype, name)


@pytest.mark.parametrize("cross_entropy", ["fused_linear", "triton"])
@pytest.mark.parametrize("family", [TINY_GPT2, TINY_QWEN2], ids=["gpt2", "qwen2"])
def test_tiny_model_all_kernels_match_reference(family, cross_entropy):
    _compare(family, cross_entropy)


@pytest.mark.gpu
@pytest.mark.parametrize("cross_entropy", ["fused_linear", "triton"])
@pytest.mark.parametrize("family", [TINY_GPT2, TINY_QWEN2], ids=["gpt2", "qwen2"])
def test_small_model_bf16_all_kernels_match_reference_gpu(family, cross_entropy):
    family = dict(family, n_embd=256, vocab_size=50304, block_size=512)
    if family["model_family"] == "qwen2":
        family.update(intermediate_size=704, n_head=8, num_kv_heads=2)
    _compare(family, cross_entropy, dtype=torch.bfloat16, device="cuda", B=4, T=512)


@pytest.mark.gpu
@pytest.mark.parametrize("cross_entropy", ["fused_linear", "triton"])
@pytest.mark.parametrize("family", [TINY_GPT2, TINY_QWEN2], ids=["gpt2", "qwen2"])
def test_compiled_model_all_kernels_fullgraph_gpu(family, cross_entropy):
    """torch.compile(fullgraph=True) traces every kernel (a graph break would raise here)."""
    torch._dynamo.reset()
    # Inductor fuses the surrounding fp32 ops in another order: compare at fp16's tolerance.
    _compare(family, cross_entropy, device="cuda", compile=True, tol_dtype=torch.float16)


@pytest.mark.parametrize("swiglu", ["fused_linear", "fused_linear_recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16 if INTERPRET else torch.bfloat16])
def test_tiny_qwen2_swiglu_fused_linear_matches_reference(dtype, swiglu):
    """`swiglu: fused_linear` (the SwiGLU backward inside the down projection's GEMM; the fused
    kernel runs in half precision, fp32 takes the unfused backward) and `fused_linear_recompute`
    (the product not kept, written again by the SwiGLU backward's row pass)."""
    family = dict(TINY_QWEN2, intermediate_size=64)  # widths of 8k: the fused kernel's TMA rows
    _compare(family, "fused_linear", dtype=dtype, swiglu=swiglu)


@pytest.mark.gpu
@pytest.mark.parametrize("swiglu", ["fused_linear", "fused_linear_recompute"])
def test_compiled_qwen2_swiglu_fused_linear_fullgraph_gpu(swiglu):
    torch._dynamo.reset()
    family = dict(TINY_QWEN2, n_embd=64, intermediate_size=128)
    _compare(family, "fused_linear", dtype=torch.bfloat16, device="cuda", compile=True, swiglu=swiglu)


def test_compiled_tiny_qwen2_swiglu_linear_recompute_fullgraph():
    """`swiglu: fused_linear_recompute` is one opaque custom op (its product computed inside it), so
    torch.compile(fullgraph=True) traces it through its fake implementation, on the CPU too (a
    `triton_op` cannot be traced there): the same loss and gradients as eager."""
    family = dict(TINY_QWEN2, intermediate_size=64)
    ids = torch.randint(0, family["vocab_size"], (2, 8), device=DEVICE)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        kernels = KernelConfig(attention="sdpa", swiglu="fused_linear_recompute")
        model = AutoModelForCausalLM.from_config(family, kernels=kernels).to(DEVICE)
        forward = torch.compile(model, fullgraph=True) if compiled else model
        loss = forward(ids, labels=ids, return_logits=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    assert_close(loss_compiled, loss_eager, torch.float32, "loss")
    for name in grads_eager:
        assert_close(grads_compiled[name], grads_eager[name], torch.float32, name)


@pytest.mark.gpu
def test_compiled_qwen2_swiglu_linear_recompute_fullgraph_gpu():
    torch._dynamo.reset()
    family = dict(TINY_QWEN2, n_embd=64, intermediate_size=128)
    _compare(family, "fused_linear", dtype=torch.bfloat16, device="cuda", compile=True, swiglu="fused_linear_recompute")


def _selective_against_plain(family, kernels: KernelConfig) -> tuple[dict, dict]:
    """One forward + backward of `family` without and with selective checkpointing, from the same
    weights: the ops each dispatched (by name), after checking that the gradients agree."""
    from src.trainer.parallelize import apply_activation_checkpointing

    ids = torch.randint(0, family["vocab_size"], (2, 8), device=DEVICE)
    grads, counts = [], []
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(family, kernels=kernels).to(DEVICE)
        apply_activation_checkpointing(model, mode)
        with CountOps() as ops:
            model(ids, labels=ids, return_logits=False).loss.backward()
        counts.append(ops.calls)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], torch.float32, name)
    return counts[0], counts[1]


def test_selective_checkpointing_saves_swiglu_fused_linear_and_recomputes_the_product():
    """Under `activation_checkpointing: selective` the `swiglu: fused_linear` op (it runs the down
    projection's matmul) is saved like aten's matmuls, while the SwiGLU product before it is
    recomputed, as the reference's silu * up is; the gradients are those without checkpointing."""
    family = dict(TINY_QWEN2, intermediate_size=64)
    kernels, fused_op, product_op = dict(swiglu="fused_linear"), "kernels::swiglu_linear_fwd", "kernels::swiglu_packed_fwd"
    plain, selective = _selective_against_plain(family, KernelConfig(attention="sdpa", **kernels))
    assert plain[fused_op] == selective[fused_op] == 2  # once per block
    assert selective[product_op] == 2 * plain[product_op] == 4  # recomputed


def test_selective_checkpointing_saves_swiglu_linear_recompute():
    """`swiglu: fused_linear_recompute` is saved like a matmul under selective checkpointing (its
    output; its inputs are gate_up and the weight), so nothing recomputes the product but its own
    backward; the gradients are those without checkpointing."""
    family = dict(TINY_QWEN2, intermediate_size=64)
    plain, selective = _selective_against_plain(family, KernelConfig(attention="sdpa", swiglu="fused_linear_recompute"))
    op = "kernels::swiglu_linear_recompute_fwd"
    assert plain[op] == selective[op] == 2  # once per block
    assert "kernels::swiglu_packed_fwd" not in plain  # the product runs inside the op only


def test_selective_checkpointing_saves_gelu_mlp():
    """Under `activation_checkpointing: selective` GPT-2's `gelu: cublaslt` op (it runs the fc
    and projection matmuls) is saved like aten's matmuls: it runs once per block with or without
    checkpointing, and the gradients are those without checkpointing."""
    plain, selective = _selective_against_plain(TINY_GPT2, KernelConfig(attention="sdpa", gelu="cublaslt"))
    assert plain["kernels::gelu_mlp_fwd"] == selective["kernels::gelu_mlp_fwd"] == 2  # once per block


@pytest.mark.parametrize("family", [TINY_GPT2, TINY_QWEN2], ids=["gpt2", "qwen2"])
def test_loss_chunk_tokens_reaches_the_fused_loss(family):
    # kernels.loss_chunk_tokens: the model's fused loss runs in chunks of that many tokens (16 tokens
    # in chunks of 5: three full chunks and a partial one) and gives the reference's loss and gradients.
    input_ids, labels = _batch(family["vocab_size"])
    off = KernelConfig(attention="sdpa")
    on = KernelConfig(attention="sdpa", cross_entropy="fused_linear", loss_chunk_tokens=5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dict(family), kernels=on).to(DEVICE)
    chunks, fused = [], model.loss_fn._fn

    def recording(*args, chunk_size, **kwargs):
        chunks.append(chunk_size)
        return fused(*args, chunk_size=chunk_size, **kwargs)

    model.loss_fn._fn = recording
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    assert chunks == [5]
    loss_ref, grads_ref = _loss_and_grads(family, off, input_ids, labels)
    assert_close(loss, loss_ref, torch.float32, "loss")
    for name, p in model.named_parameters():
        assert_close(p.grad, grads_ref[name], torch.float32, name)


def test_loss_chunk_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="kernels.loss_chunk_tokens must be >= 0"):
        KernelConfig(loss_chunk_tokens=-1)
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        from_dict(KernelConfig, {"cross_entropy": "fused_linear", "loss_chunk_tokens": -8}, prefix="kernels.")
