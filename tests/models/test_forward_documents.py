"""model(**batch) with packed-document metadata: the loss sees each document alone."""

import pytest
import torch

from src.models import AutoModelForCausalLM, KernelConfig, shift_labels

TINY = {
    "gpt2": dict(model_family="gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=32),
    "qwen2": dict(
        model_family="qwen2", n_layer=2, n_head=4, num_kv_heads=2, n_embd=32, vocab_size=50, block_size=32,
        intermediate_size=64,
    ),
}


@pytest.mark.parametrize("family", sorted(TINY))
def test_forward_with_document_ids_equals_documents_alone(family):
    model = AutoModelForCausalLM.from_config(TINY[family], kernels=KernelConfig(attention="sdpa")).eval()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 9))
    ids = torch.cat([a, b], dim=1)  # (1, 16): two documents packed in one row
    position_ids = torch.cat([torch.arange(7), torch.arange(9)])[None]
    document_ids = torch.cat([torch.zeros(7), torch.ones(9)]).long()[None]
    labels = torch.cat([shift_labels(a), shift_labels(b)], dim=1)  # no target across the boundary
    with torch.no_grad():
        packed = model(ids, labels=labels, position_ids=position_ids, document_ids=document_ids)
        alone_a, alone_b = model(a, labels=shift_labels(a)), model(b, labels=shift_labels(b))
        leaky = model(ids, labels=labels, position_ids=position_ids)
    torch.testing.assert_close(packed.logits, torch.cat([alone_a.logits, alone_b.logits], dim=1), atol=1e-5, rtol=0)
    expected = (alone_a.loss * 6 + alone_b.loss * 8) / 14  # mean over the 14 supervised tokens
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(leaky.logits[:, 7:], alone_b.logits, atol=1e-3)  # without masking, b sees a
