"""The tied-embedding gradient pass (src/trainer/graph_passes.py): it rewrites the compiled
backward's zero-filled embedding gradient into a scatter into the head's gradient, and the
gradients stay those of eager. Runs on the CPU (Inductor's C++ backend sees the same graph)."""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from src.models import AutoModelForCausalLM, KernelConfig
from src.trainer.graph_passes import TiedEmbeddingGradient, install_tied_embedding_pass
from src.trainer.parallelize import apply_compile
from tests.kernels.helpers import needs_triton

TINY_QWEN2 = dict(
    model_family="qwen2", n_layer=1, n_head=2, num_kv_heads=1, n_embd=32, intermediate_size=48,
    vocab_size=101, block_size=16,
)  # fmt: skip


@pytest.fixture
def fresh_inductor():
    """No custom pass installed yet, and no FX graph cache (a cached graph skips the passes, so
    the rewrite count would stay 0); the config is restored afterwards."""
    torch._dynamo.reset()
    with inductor_config.patch(post_grad_custom_post_pass=None, fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def _grads(tied: bool, compile: bool, autocast: bool, cross_entropy: str = "torch"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dict(TINY_QWEN2, tie_word_embeddings=tied),
                                             kernels=KernelConfig(attention="sdpa", cross_entropy=cross_entropy))
    if compile:
        apply_compile(model, scope="model")
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 101, (2, 8), generator=gen)
    labels = torch.randint(0, 101, (2, 8), generator=gen)
    labels[0, :2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids, labels=labels, return_logits=False).loss
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_same(compiled: dict, eager: dict, tol: float) -> None:
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=tol, atol=tol, msg=name)


# Under bf16 autocast (how the trainer runs) the head's weight gradient is cast to fp32 and then
# added to the embedding's: the pattern the pass rewrites, with the PyTorch loss and with the
# fused linear + CE (Qwen2's optimized loss, whose gradient scale is folded into that cast).
@pytest.mark.parametrize("cross_entropy", ["torch", pytest.param("fused_linear", marks=needs_triton)])
def test_tied_embedding_gradient_is_rewritten_and_unchanged(fresh_inductor, cross_entropy):
    eager = _grads(tied=True, compile=False, autocast=True, cross_entropy=cross_entropy)
    compiled = _grads(tied=True, compile=True, autocast=True, cross_entropy=cross_entropy)
    graph_pass = inductor_config.post_grad_custom_post_pass
    assert isinstance(graph_pass, TiedEmbeddingGradient)
    assert graph_pass.rewrites == 1  # the one tied weight, in the one backward graph
    _assert_same(compiled, eager, tol=2e-2)  # bf16 matmuls round differently compiled and eager


def test_fp32_and_untied_gradients_are_unchanged(fresh_inductor):
    # In fp32, Inductor already folds the sum into the head's weight-gradient GEMM (an addmm whose
    # bias is the embedding's gradient), so there is nothing to rewrite; untied, nothing either.
    _assert_same(_grads(tied=True, compile=True, autocast=False), _grads(tied=True, compile=False, autocast=False), 1e-5)
    _assert_same(_grads(tied=False, compile=True, autocast=True), _grads(tied=False, compile=False, autocast=True), 2e-2)
    assert inductor_config.post_grad_custom_post_pass.rewrites == 0


def test_the_rewrite_on_a_small_function(fresh_inductor):
    # The pattern alone: an fp32 weight used by a lookup and, cast to bf16, by a matmul.
    graph_pass = install_tied_embedding_pass()

    def loss_fn(weight, ids, x):
        rows = torch.nn.functional.embedding(ids, weight)  # (N, D)
        logits = (rows + x).bfloat16() @ weight.bfloat16().t()  # (N, V)
        return logits.float().square().sum()

    weight = torch.randn(37, 8, requires_grad=True)
    ids = torch.tensor([3, 5, 3, 36, 0, 5])  # repeated rows accumulate
    x = torch.randn(6, 8)
    loss_fn(weight, ids, x).backward()
    want, weight.grad = weight.grad, None
    torch.compile(loss_fn, fullgraph=True)(weight, ids, x).backward()
    assert graph_pass.rewrites == 1
    torch.testing.assert_close(weight.grad, want, rtol=2e-2, atol=2e-2)


def test_install_keeps_another_pass(fresh_inductor):
    class Other(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return "other"

    other = Other()
    inductor_config.post_grad_custom_post_pass = other
    assert install_tied_embedding_pass() is None
    assert inductor_config.post_grad_custom_post_pass is other
    inductor_config.post_grad_custom_post_pass = None
    first = install_tied_embedding_pass()
    assert install_tied_embedding_pass() is first  # installed once


def test_uuid_is_stable_and_falls_back_without_source(monkeypatch):
    # Inductor's FX graph cache keys on the uuid: the same for every instance, and defined even
    # where the pass's source cannot be read.
    assert TiedEmbeddingGradient().uuid() == TiedEmbeddingGradient().uuid()
    import src.trainer.graph_passes as graph_passes

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(graph_passes.inspect, "getsource", no_source)
    assert TiedEmbeddingGradient().uuid() == "TiedEmbeddingGradient-1"
