"""DPO: the loss against an independent implementation of the paper's formulas, sequence
log-probabilities against a brute-force computation, precomputed == live reference, bad input,
and a tiny model that learns a synthetic preference."""

import itertools
import json
import math
import os
import sys

import pytest
import torch

from src.models import AutoModelForCausalLM, KernelConfig
from src.models.components import get_kernel
from src.models.components.dispatch import triton_available
from src.models.components.loss import token_logprobs_ref
from src.models.dpo import (
    METRIC_NAMES,
    DPOConfig,
    DPOModel,
    ReferenceLogpsLoader,
    build_reference_model,
    chunked_token_logps,
    dpo_loss,
    load_reference_logps,
    precompute_reference_logps,
    sequence_logps,
)
from src.trainer.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    TrainerConfig,
)
from src.trainer.trainer import Trainer
from src.utils.config import ConfigError, from_dict
from src.utils.distributed import DistInfo

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
VOCAB = 48
TINY_QWEN2 = dict(
    model_family="qwen2",
    n_layer=2,
    n_head=4,
    num_kv_heads=2,
    n_embd=48,
    intermediate_size=96,
    vocab_size=VOCAB,
    block_size=32,
)
TINY_GPT2 = dict(model_family="gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32)


def tiny_model(family=TINY_QWEN2):
    return AutoModelForCausalLM.from_config(family, kernels=KernelConfig.reference())


# ----------------------------------------------------------------------------------------------
# The loss on random log-probabilities, against the paper's formulas written out per pair


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def paper_loss_and_grads(pc, pr, rc, rr, beta, loss_type, eps):
    """Per-pair loss and dL/dpi_c written from scratch with `math`; returns (mean loss, d mean / d pc, d mean / d pr)."""
    n = len(pc)
    total, grad_c, grad_r = 0.0, [], []
    for i in range(n):
        z = (pc[i] - pr[i]) - (rc[i] - rr[i])
        if loss_type == "sigmoid":
            # L = -(1 - eps) log s(beta z) - eps log s(-beta z); dL/dz = -beta (1 - eps) s(-beta z) + beta eps s(beta z)
            loss = -(1 - eps) * math.log(_sigmoid(beta * z)) - eps * math.log(_sigmoid(-beta * z))
            dz = -beta * (1 - eps) * _sigmoid(-beta * z) + beta * eps * _sigmoid(beta * z)
        elif loss_type == "ipo":
            loss = (z - 1 / (2 * beta)) ** 2
            dz = 2 * (z - 1 / (2 * beta))
        else:  # hinge
            loss = max(0.0, 1 - beta * z)
            dz = -beta if 1 - beta * z > 0 else 0.0
        total += loss
        grad_c.append(dz / n)  # dz/dpc = 1
        grad_r.append(-dz / n)  # dz/dpr = -1
    return total / n, grad_c, grad_r


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_grads_metrics_match_paper(loss_type, eps, beta):
    g = torch.Generator().manual_seed(3)
    n = 16
    pc, pr, rc, rr = (-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    loss.backward()

    want, want_gc, want_gr = paper_loss_and_grads(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, loss_type, eps)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(pc.grad.float(), torch.tensor(want_gc), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pr.grad.float(), torch.tensor(want_gr), rtol=1e-4, atol=1e-6)
    if loss_type == "hinge":  # the random draw must exercise both sides of the hinge
        assert 0 < sum(g != 0 for g in want_gc) < n

    chosen_rewards = [beta * (pc[i].item() - rc[i].item()) for i in range(n)]
    rejected_rewards = [beta * (pr[i].item() - rr[i].item()) for i in range(n)]
    want_metrics = {
        "rewards/chosen": sum(chosen_rewards) / n,
        "rewards/rejected": sum(rejected_rewards) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen_rewards, rejected_rewards)) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen_rewards, rejected_rewards)) / n,
        "logps/chosen": sum(pc.tolist()) / n,
        "logps/rejected": sum(pr.tolist()) / n,
    }
    assert set(metrics) == set(METRIC_NAMES)
    for name, value in want_metrics.items():
        assert metrics[name].dim() == 0 and not metrics[name].requires_grad
        assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert 0 < want_metrics["rewards/accuracies"] < 1  # the draw has both signs


def test_label_smoothing_changes_sigmoid_loss():
    z = torch.tensor([2.0, -1.0])
    zeros = torch.zeros(2)
    plain, _ = dpo_loss(z, zeros, zeros, zeros, beta=1.0)
    smoothed, _ = dpo_loss(z, zeros, zeros, zeros, beta=1.0, label_smoothing=0.2)
    assert smoothed.item() != pytest.approx(plain.item())


# ----------------------------------------------------------------------------------------------
# Sequence log-probabilities


def brute_force_logps(model, input_ids, labels):
    logits = model(input_ids, return_logits=True).logits.float()  # (B, T, V)
    logp = logits.log_softmax(-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return (picked * mask).sum(1)


@pytest.mark.parametrize("family", [TINY_QWEN2, TINY_GPT2], ids=["qwen2", "gpt2"])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_sequence_logps_match_brute_force(family, chunk_size):
    model = tiny_model(family)
    input_ids = torch.randint(0, VOCAB, (3, 11))
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[:, :4] = -100  # prompt
    labels[1, 8:] = -100  # a shorter row (padding)
    ours = sequence_logps(model, input_ids, labels, chunk_size=chunk_size)
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = brute_force_logps(model, input_ids, labels)
    want.sum().backward()
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(ours_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_chunked_token_logps_keep_no_full_logits_for_backward():
    """With recomputation per chunk, what autograd saves is O(tokens * hidden), not O(tokens * vocab)."""
    n, hidden_dim, vocab = 256, 8, 512
    hidden = torch.randn(n, hidden_dim, requires_grad=True)
    weight = torch.randn(vocab, hidden_dim, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_token_logps(hidden, weight, labels, chunk_size=32)
    assert max(saved) < n * vocab / 4
    torch.testing.assert_close(out, torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels[:, None]).squeeze(1))


def test_padding_between_chosen_and_rejected_changes_nothing():
    """One concatenated forward (right-padded to a common length) == each side on its own."""
    policy = tiny_model()
    model = DPOModel(policy, config=DPOConfig(reference="precomputed"))
    chosen_ids, rejected_ids = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 12))
    chosen_labels, rejected_labels = chosen_ids.clone(), rejected_ids.clone()
    chosen_labels[:, :3] = -100
    rejected_labels[:, :3] = -100
    zeros = torch.zeros(2)
    out = model(chosen_ids, chosen_labels, rejected_ids, rejected_labels, ref_chosen_logps=zeros, ref_rejected_logps=zeros)
    with torch.no_grad():
        alone_chosen = sequence_logps(policy, chosen_ids, chosen_labels).mean()
        alone_rejected = sequence_logps(policy, rejected_ids, rejected_labels).mean()
    torch.testing.assert_close(out.metrics["logps/chosen"], alone_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["logps/rejected"], alone_rejected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The wrapper: live and precomputed reference


def make_pairs(n, generator, prompt_len=4):
    """Prompt, SEP (2), completion, EOS (1). Chosen copies the prompt, rejected reverses it.

    Labels are aligned with positions: the targets of positions prompt_len.. are the completion and EOS."""
    prompt = torch.randint(4, VOCAB, (n, prompt_len), generator=generator)
    palindromes = (prompt == prompt.flip(1)).all(1)
    prompt[palindromes, 0] = (prompt[palindromes, -1] + 1 - 4) % (VOCAB - 4) + 4

    def sequences(completion):
        ids = torch.cat([prompt, torch.full((n, 1), 2), completion, torch.ones(n, 1, dtype=torch.long)], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, prompt_len:-1] = ids[:, prompt_len + 1 :]
        return ids, labels

    chosen_ids, chosen_labels = sequences(prompt.clone())
    rejected_ids, rejected_labels = sequences(prompt.flip(1))
    return dict(
        chosen_input_ids=chosen_ids,
        chosen_labels=chosen_labels,
        rejected_input_ids=rejected_ids,
        rejected_labels=rejected_labels,
    )


def perturb_(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_precomputed_reference_equals_live(tmp_path, loss_type, eps):
    policy = tiny_model()
    live = DPOModel(policy, config=DPOConfig(beta=0.2, loss_type=loss_type, label_smoothing=eps))
    perturb_(policy)  # the policy moved away from the reference, so the reference terms matter
    g = torch.Generator().manual_seed(5)
    batches = []
    for start in (0, 3):
        batch = make_pairs(3, g)
        batch["example_ids"] = torch.arange(start, start + 3)
        batches.append(batch)

    table = precompute_reference_logps(live.reference, batches, path=tmp_path / "ref_logps.safetensors")
    table = load_reference_logps(tmp_path / "ref_logps.safetensors")
    assert table["chosen"].shape == (6,) and table["example_ids"].tolist() == list(range(6))

    precomputed = DPOModel(policy, config=DPOConfig(beta=0.2, loss_type=loss_type, label_smoothing=eps, reference="precomputed"))
    assert precomputed.reference is None
    shuffled = [batches[1], batches[0]]  # ids, not order, match rows to the table
    for batch in ReferenceLogpsLoader(shuffled, table):
        policy.zero_grad()
        out_pre = precomputed(**batch)
        out_pre.loss.backward()
        grads_pre = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad()
        plain = {k: v for k, v in batch.items() if not k.startswith("ref_")}
        out_live = live(**plain)
        out_live.loss.backward()
        torch.testing.assert_close(out_pre.loss, out_live.loss, atol=1e-6, rtol=1e-6)
        assert out_live.loss.item() != pytest.approx(math.log(2) if loss_type == "sigmoid" else 0.0, abs=1e-4)
        for name in METRIC_NAMES:
            torch.testing.assert_close(out_pre.metrics[name], out_live.metrics[name], atol=1e-6, rtol=1e-6)
        for got, want in zip(grads_pre, (p.grad for p in policy.parameters())):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_reference_is_frozen_copy():
    policy = tiny_model()
    model = DPOModel(policy)
    assert model.reference is not policy
    assert all(not p.requires_grad for p in model.reference.parameters())
    assert all(p.requires_grad for p in model.policy.parameters())
    model.train()
    assert not model.reference.training
    before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(**make_pairs(4, torch.Generator().manual_seed(0)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for k, v in model.reference.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not torch.equal(model.policy.lm_head.weight, model.reference.lm_head.weight)
    # Initially policy == reference: the loss is log 2 and every reward is exactly 0.
    fresh = DPOModel(tiny_model())
    out = fresh(**make_pairs(4, torch.Generator().manual_seed(0)))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/margins"].item() == 0.0


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_policy_dropout_is_off_unless_asked_for(disable_dropout):
    """A policy with dropout (GPT-2 checkpoints carry 0.1 rates): by default it trains without, so
    that at step 0, policy == reference, the loss is exactly log 2 in training mode as well."""
    policy = tiny_model({**TINY_GPT2, "dropout": 0.3})
    model = DPOModel(policy, config=DPOConfig(disable_dropout=disable_dropout)).train()
    assert model.policy.training == (not disable_dropout) and not model.reference.training
    torch.manual_seed(0)
    loss = model(**make_pairs(4, torch.Generator().manual_seed(0))).loss.item()
    if disable_dropout:
        assert loss == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert abs(loss - math.log(2)) > 1e-4  # dropout noise in the policy alone


# ----------------------------------------------------------------------------------------------
# Bad input


def test_reference_of_another_shape_is_an_error():
    policy = tiny_model()
    wider = tiny_model({**TINY_QWEN2, "intermediate_size": 128})
    with pytest.raises(ValueError, match=r"layers\.0\.mlp.*shape"):
        DPOModel(policy, reference=wider)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        DPOModel(policy, reference=tiny_model(TINY_GPT2))


def test_empty_completion_names_the_row():
    model = DPOModel(tiny_model())
    batch = make_pairs(3, torch.Generator().manual_seed(0))
    batch["rejected_labels"][2] = -100
    batch["example_ids"] = torch.tensor([10, 11, 12])
    with pytest.raises(ValueError, match=r"row 2 \(example 12\), rejected completion: no supervised token"):
        model(**batch)


def test_config_errors():
    with pytest.raises(ValueError, match="label_smoothing.*only for loss_type 'sigmoid'"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="Did you mean 'loss_type'"):
        from_dict(DPOConfig, {"loss_typ": "ipo"}, where="dpo.yaml")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(DPOConfig, {"loss_type": "kto"}, where="dpo.yaml")
    assert from_dict(DPOConfig, {"beta": 0.05, "loss_type": "hinge"}).loss_type == "hinge"


def test_reference_mode_mismatches_are_errors():
    batch = make_pairs(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="reference is 'precomputed' but a reference model was given"):
        DPOModel(tiny_model(), reference=tiny_model(), config=DPOConfig(reference="precomputed"))
    precomputed = DPOModel(tiny_model(), config=DPOConfig(reference="precomputed"))
    with pytest.raises(ValueError, match="lacks ref_chosen_logps"):
        precomputed(**batch)
    live = DPOModel(tiny_model())
    with pytest.raises(ValueError, match="set reference: precomputed"):
        live(**batch, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    table = {"chosen": torch.zeros(2), "rejected": torch.zeros(2), "example_ids": torch.tensor([0, 1])}
    with pytest.raises(KeyError, match="no 'example_ids'"):
        next(iter(ReferenceLogpsLoader([batch], table)))
    with pytest.raises(KeyError, match=r"examples \[7\] have no precomputed"):
        next(iter(ReferenceLogpsLoader([{**batch, "example_ids": torch.tensor([1, 7])}], table)))


def test_reference_built_after_parallel_wrapping_is_an_error():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self):  # skip process-group setup; only the type matters
            torch.nn.Module.__init__(self)

    with pytest.raises(ValueError, match="before|from the plain policy"):
        build_reference_model(FakeDDP())


# ----------------------------------------------------------------------------------------------
# Training


class PreferenceStream:
    """An endless DPO train loader (the data loader protocol: dict batches of CPU LongTensors)."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            yield make_pairs(self.batch_size, self.generator)


def test_dpo_training_learns_held_out_preferences(tmp_path):
    """Chosen copies the prompt, rejected reverses it; DPO through the Trainer must rank held-out
    pairs correctly, log the DPO metrics, and export the policy."""
    torch.manual_seed(0)
    model = DPOModel(tiny_model(), config=DPOConfig(beta=0.5))
    held_out = make_pairs(256, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(**held_out).metrics
    assert before["rewards/accuracies"].item() == 0.0  # policy == reference: every reward is exactly 0

    cfg = TrainConfig(
        run_name="dpo",
        output_dir=str(tmp_path),
        trainer=TrainerConfig(micro_batch_size=32, seq_len=10, max_steps=150, device="cpu"),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0, grad_clip=1.0),
        schedule=ScheduleConfig(type="constant", warmup_steps=5),
        checkpoint=CheckpointConfig(every=0, save_final=False, export_hf=True),
        logging=LoggingConfig(log_every=50),
    )
    Trainer(cfg, model, PreferenceStream(32, seed=1), None, CPU).fit()
    with torch.no_grad():
        after = model(**held_out).metrics
    assert after["rewards/accuracies"].item() > 0.9
    assert after["rewards/margins"].item() > 0.5

    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in logged if any(k.endswith("rewards/accuracies") for k in row)]
    assert len(train_rows) == 3, logged[:2]
    assert all(any(name in k for k in train_rows[-1]) for name in METRIC_NAMES)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "hf", kernels=KernelConfig.reference())
    for name, p in model.policy.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], p, atol=0, rtol=0)


class RankSlicedPairs:
    """Global batch b (pairs of seed + b) split between ranks: one process with batch B*W sees
    exactly the union of what W ranks of batch B see."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed

    def __iter__(self):
        for b in itertools.count():
            full = make_pairs(self.batch_size * self.world_size, torch.Generator().manual_seed(self.seed + b))
            start = self.rank * self.batch_size
            yield {k: v[start : start + self.batch_size] for k, v in full.items()}


def _dpo_run(run_dir, strategy: str, batch_size: int, info) -> list[dict]:
    cfg = TrainConfig(
        run_name=os.path.basename(run_dir),
        output_dir=os.path.dirname(run_dir),
        trainer=TrainerConfig(micro_batch_size=batch_size, seq_len=10, max_steps=3, device="cpu"),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0, grad_clip=1.0),
        schedule=ScheduleConfig(type="constant", warmup_steps=0),
        checkpoint=CheckpointConfig(every=0, save_final=False, export_hf=True),
        logging=LoggingConfig(log_every=1),
        parallel=ParallelConfig(strategy=strategy),
    )
    torch.manual_seed(0)
    model = DPOModel(tiny_model(), config=DPOConfig(beta=0.5))
    trainer = Trainer(cfg, model, RankSlicedPairs(batch_size, info.rank, info.world_size), None, info)
    trainer.fit()
    return [row for row in trainer.history if row["split"] == "train"]


def _fsdp2_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the FSDP2 DPO run (started by torch.multiprocessing.spawn)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from src.utils.distributed import init_distributed, shutdown_distributed

    info = init_distributed("cpu")
    try:
        history = _dpo_run(os.path.join(out_dir, "fsdp2"), "fsdp2", 2, info)
        if rank == 0:
            with open(os.path.join(out_dir, "history.json"), "w") as f:
                json.dump(history, f)
    finally:
        shutdown_distributed(info)
    sys.stdout.flush()
    # gloo occasionally aborts in its own thread teardown at interpreter exit, after all the work
    # is done and the group destroyed (seen once in CI here, as in tests/trainer's workers); leave
    # without running it. An exception above still fails the test: it skips this line.
    os._exit(0)


def test_fsdp2_two_ranks_match_one_process(tmp_path):
    """DPOModel under FSDP2 (policy and reference blocks sharded, both models' embeddings and heads
    in the root group) on 2 CPU ranks: the losses and DPO metrics of one process, and the
    gathered export of the policy."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fsdp2_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    with open(tmp_path / "history.json") as f:
        sharded = json.load(f)
    single = _dpo_run(str(tmp_path / "single"), "none", 4, CPU)
    assert len(sharded) == len(single) == 3
    for got, want in zip(sharded, single):
        for name in ("loss", *METRIC_NAMES):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name
    assert single[-1]["rewards/margins"] != 0.0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2" / "hf", kernels=KernelConfig.reference())
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "hf", kernels=KernelConfig.reference())
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], p, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not triton_available(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_fused_kernel_path_matches_reference_path():
    """`cross_entropy: fused_linear` routes DPO log-probs through kernels/token_logprobs.py; same values and grads."""
    reference_path = tiny_model()
    fused_path = AutoModelForCausalLM.from_config(TINY_QWEN2, kernels=KernelConfig.reference().replace(cross_entropy="fused_linear"))
    fused_path.load_state_dict(reference_path.state_dict())
    batch = make_pairs(2, torch.Generator().manual_seed(0))
    results = []
    for policy in (reference_path, fused_path):
        model = DPOModel(policy)
        torch.manual_seed(123)  # the same perturbation for both
        perturb_(policy)
        out = model(**batch)
        out.loss.backward()
        results.append((out, [p.grad for p in policy.parameters()]))
    (ref_out, ref_grads), (fused_out, fused_grads) = results
    torch.testing.assert_close(fused_out.loss, ref_out.loss, atol=1e-5, rtol=1e-5)
    for name in METRIC_NAMES:
        torch.testing.assert_close(fused_out.metrics[name], ref_out.metrics[name], atol=1e-4, rtol=1e-5)
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_trailing_padding_is_trimmed_without_changing_logps():
    """Loader batches are padded to seq_len; the padding after the last completion token is not run."""
    model = tiny_model({**TINY_QWEN2, "block_size": 256})
    input_ids = torch.randint(0, VOCAB, (2, 200))
    labels = torch.full_like(input_ids, -100)
    labels[0, 5:20] = input_ids[0, 6:21]
    labels[1, 5:70] = input_ids[1, 6:71]
    seen = []
    hook = model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    got = sequence_logps(model, input_ids, labels)
    hook.remove()
    assert seen == [128]  # 70 supervised positions, rounded up to a multiple of 64
    torch.testing.assert_close(got, brute_force_logps(model, input_ids, labels), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# GPU: the fused kernel in bf16 at realistic sizes, and memory of the per-token log-prob paths


def _peak_extra_bytes(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@pytest.mark.gpu
def test_gpu_token_logps_memory_and_agreement():
    """8192 completion tokens, Qwen2-0.5B head (896 x 151936), bf16: forward + backward peak memory
    of the chunked reference and of the fused kernel, against the unchunked reference."""
    device = torch.device("cuda")
    n, hidden_dim, vocab = 8192, 896, 151936
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(n, hidden_dim, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_dim, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    upstream = torch.randn(n, device=device, generator=g)
    fused = get_kernel("token_logprobs", "triton")
    paths = {
        "unchunked reference": lambda: token_logprobs_ref(hidden, weight, labels),
        "chunked reference (1024)": lambda: chunked_token_logps(hidden, weight, labels, chunk_size=1024),
        "fused kernel": lambda: fused(hidden, weight, labels),
    }
    results, peaks = {}, {}
    for name, path in paths.items():
        hidden.grad = weight.grad = None

        def run():
            out = path()
            (out * upstream).sum().backward()
            results[name] = (out.detach().float(), hidden.grad.float(), weight.grad.float())

        peaks[name] = _peak_extra_bytes(run, device)
    print(f"\n{'per-token log-probs, N=8192 H=896 V=151936 bf16':<50} peak extra memory (fwd+bwd)")
    for name, peak in peaks.items():
        print(f"{name:<50} {peak / 2**30:8.2f} GiB")
    full_fp32_logits = n * vocab * 4
    assert peaks["chunked reference (1024)"] < 0.35 * peaks["unchunked reference"]
    assert peaks["chunked reference (1024)"] < full_fp32_logits
    assert peaks["fused kernel"] < full_fp32_logits / 2
    want = results["unchunked reference"]
    for name in ("chunked reference (1024)", "fused kernel"):
        for got, ref in zip(results[name], want):
            scale = ref.abs().max().item()
            assert (got - ref).abs().max().item() <= 3e-2 * scale + 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("cross_entropy", ["torch", "fused_linear"])
def test_gpu_dpo_bf16_autocast_matches_fp32(cross_entropy):
    """DPOModel on the GPU under bf16 autocast (live reference), torch and fused log-prob paths:
    loss and metrics close to fp32, the reference untouched by a training step."""
    device = torch.device("cuda")
    family = {**TINY_QWEN2, "n_embd": 256, "intermediate_size": 512, "n_head": 8, "num_kv_heads": 2,
              "vocab_size": 32000, "block_size": 512}
    kernels = KernelConfig.reference().replace(cross_entropy=cross_entropy)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(family, kernels=kernels).to(device)
    model = DPOModel(policy, config=DPOConfig(beta=0.1))
    perturb_(policy, scale=0.01)
    g = torch.Generator().manual_seed(0)
    batch = {k: v.to(device) for k, v in make_pairs(8, g, prompt_len=100).items()}
    with torch.no_grad():
        exact = model(**batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(**batch)
    assert abs(low.loss.item() - exact.loss.item()) < 0.05
    assert abs(low.metrics["logps/chosen"].item() - exact.metrics["logps/chosen"].item()) < 0.02 * abs(exact.metrics["logps/chosen"].item())
    before = {k: v.clone() for k, v in model.reference.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    assert all(torch.equal(v, before[k]) for k, v in model.reference.state_dict().items())
