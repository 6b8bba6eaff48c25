"""benchmarks/throughput.py on the CPU: the variant list, the loss-check data, and a smoke run of
the loss check through the Trainer (the numbers themselves are measured on a GPU)."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import throughput  # noqa: E402


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_variants_flip_each_op_of_the_optimized_default(family):
    names = [v.name for v in throughput.our_variants(family, "none")]
    assert names[:3] == ["reference", "reference+compile", "optimized"]
    optimized = throughput.OPTIMIZED[family]
    for op, value in optimized.items():
        others = [o for o in throughput.ALTERNATIVES[op] if o != value]
        assert others, op
        for other in others:
            assert f"optimized {op}={other}" in names
    assert "optimized optimizer=torch" in names
    best = "optimized +whole-model +CUDA graphs"
    # + the residual stream in fp32, + selective AC, + selective AC with each of SELECTIVE_FLIPS
    selective_flips = [op for op in throughput.SELECTIVE_FLIPS if op in optimized]
    n_best_ablations = sum(len(throughput.ALTERNATIVES[op]) - 1 for op in optimized) + 2 + len(selective_flips)
    n_lean = 2 + (family == "qwen2")  # the bf16-moment rows
    n_copy = 1 + (family == "qwen2")  # the bf16 weight-copy rows
    n_grads = 2 + (family == "qwen2")  # and with bf16 gradients in the copies
    n_best_ablations += n_lean + n_copy + n_grads
    # last, the memory-lean rows again with every GEMM of the blocks on its timed pick (linear=tuned)
    n_tuned = 3 + 2 * (family == "qwen2")
    all_variants = {v.name: v for v in throughput.our_variants(family, "none")}
    for name in names[-n_tuned:]:
        variant = all_variants[name]
        assert name.endswith(" linear=tuned") and variant.kernels["linear"] == "tuned", name
        assert variant.optimizer_state == "bfloat16" and variant.compile_mode == "reduce-overhead", name
        untuned = all_variants.get(name.removesuffix(" linear=tuned"))
        if untuned is not None:  # the same row but for the GEMMs
            assert dict(untuned.kernels, linear="tuned") == variant.kernels and untuned.weight_copy == variant.weight_copy
    names = names[:-n_tuned]
    assert names[-6 - n_best_ablations:-n_best_ablations] == [
        "optimized +selective AC", "optimized +CUDA graphs", "reference+compile whole model",
        "optimized +whole-model compile", best, f"{best} optimizer=torch"]
    # the same ablations on the fastest configuration, whose step the host does not slow down
    by_name = {v.name: v for v in throughput.our_variants(family, "none")}
    for op, value in optimized.items():
        for other in [o for o in throughput.ALTERNATIVES[op] if o != value]:
            variant = by_name[f"{best} {op}={other}"]
            assert variant.kernels == dict(optimized, **{op: other})
            assert (variant.compile_scope, variant.compile_mode) == ("model", "reduce-overhead")
    assert by_name[f"{best} +selective AC"].activation_checkpointing == "selective"
    assert optimized["cross_entropy"] == "fused_linear"  # both families' loss head: no (N, V) logits
    assert by_name[f"{best} cross_entropy=triton"].kernels == dict(optimized, cross_entropy="triton")
    for op in selective_flips:  # Qwen2's SwiGLU product recomputed inside its op's backward
        flip = by_name[f"{best} +selective AC {op}={throughput.SELECTIVE_FLIPS[op]}"]
        assert flip.activation_checkpointing == "selective" and flip.kernels[op] == throughput.SELECTIVE_FLIPS[op]
    assert bool(selective_flips) == (family == "qwen2")
    lean = [by_name[name] for name in names[-n_lean - n_copy - n_grads:-n_copy - n_grads]]
    assert [v.name for v in lean[:2]] == [f"{best} +bf16 moments", f"{best} +selective AC +bf16 moments"]
    assert all(v.optimizer_state == "bfloat16" and v.compile_mode == "reduce-overhead" for v in lean)
    if family == "qwen2":  # and without h kept, the 12 GiB configuration without checkpointing
        assert lean[2].kernels == dict(optimized, swiglu="fused_linear_recompute")
        assert lean[2].activation_checkpointing == "none"
    cfg = throughput.train_config(throughput.parse_args([]), lean[0], 10, "unused")
    assert cfg.optimizer.state_dtype == "bfloat16" and not cfg.optimizer.bf16_weight_copy
    copies = [by_name[name] for name in names[-n_copy - n_grads:-n_grads]]
    assert copies[0].name == f"{best} +bf16 weight copy" and copies[0].kernels == optimized
    assert all(v.weight_copy and v.compile_mode == "reduce-overhead" for v in copies)
    if family == "qwen2":  # the 12 GiB configuration with copies
        assert copies[1].kernels == lean[2].kernels and copies[1].optimizer_state == "bfloat16"
    cfg = throughput.train_config(throughput.parse_args([]), copies[-1], 10, "unused")
    assert cfg.optimizer.bf16_weight_copy and not cfg.optimizer.bf16_grads
    grads = [by_name[name] for name in names[-n_grads:]]
    assert [v.name for v in grads[:2]] == [f"{best} +bf16 weight copy +bf16 grads",
                                           f"{best} +bf16 moments +bf16 weight copy +bf16 grads"]
    assert all(v.weight_copy and v.bf16_grads and v.compile_mode == "reduce-overhead" for v in grads)
    if family == "qwen2":  # the 12 GiB configuration with copies and bf16 gradients
        assert grads[2].kernels == copies[1].kernels and grads[2].optimizer_state == "bfloat16"
    cfg = throughput.train_config(throughput.parse_args([]), grads[-1], 10, "unused")
    assert cfg.optimizer.bf16_weight_copy and cfg.optimizer.bf16_grads
    accumulating = [v.name for v in throughput.our_variants(family, "none", grad_accum=2)]
    assert not any("+bf16 grads" in name for name in accumulating)  # refused with accumulation
    with_layers = {v.name: v for v in throughput.our_variants(family, "none", ac_layers=(3,))}
    if family == "qwen2":
        partial = with_layers[f"{best} +bf16 moments swiglu=fused_linear_recompute +selective AC on 3 blocks"]
        assert (partial.ac_layers, partial.activation_checkpointing) == (3, "selective")
    # the optimized rows carry the residual stream in bf16, the references and the ablation in fp32
    for v in by_name.values():
        expected = "fp32" if v.name.startswith("reference") or v.name.endswith("residual=fp32") else "bf16"
        assert v.residual_dtype == expected, v.name
    assert {"optimized residual=fp32", f"{best} residual=fp32"} <= set(names)
    cfg = throughput.train_config(throughput.parse_args([]), by_name["optimized"], 10, "unused")
    assert cfg.trainer.residual_dtype == "bf16"
    assert len(set(names)) == len(names)
    sharded = [v.name for v in throughput.our_variants(family, "none", sharded=True)]
    assert not {"optimized +CUDA graphs", "optimized +whole-model compile"} & set(sharded)  # not with FSDP2
    assert "optimized optimizer=torch" in sharded  # our AdamW updates FSDP2's local shards too
    keep_gathered = {v.name: v for v in throughput.our_variants(family, "none", sharded=True)}[
        "optimized reshard_after_forward=false"]
    assert not keep_gathered.reshard_after_forward
    cfg = throughput.train_config(throughput.parse_args(["--strategy", "fsdp2"]), keep_gathered, 10, "unused")
    assert (cfg.parallel.strategy, cfg.parallel.reshard_after_forward) == ("fsdp2", False)
    assert "optimized reshard_after_forward=false" not in names  # an FSDP2 choice only
    sharded_lean = {v.name: v for v in throughput.our_variants(family, "none", sharded=True, fsdp_units=(4,))}
    grouped = sharded_lean["optimized +FSDP units of 4 blocks"]
    cfg = throughput.train_config(throughput.parse_args(["--strategy", "fsdp2"]), grouped, 10, "unused")
    assert (cfg.parallel.strategy, cfg.parallel.fsdp_blocks_per_unit) == ("fsdp2", 4)
    assert sharded_lean["optimized +bf16 moments"].optimizer_state == "bfloat16"  # moments on the shards
    assert sharded_lean["optimized +bf16 moments"].compile_scope == "blocks"
    assert ("optimized +bf16 moments swiglu=fused_linear_recompute" in sharded_lean) == (family == "qwen2")
    accumulating = [v.name for v in throughput.our_variants(family, "none", grad_accum=2)]
    assert "optimized +whole-model compile" in accumulating
    assert "optimized +whole-model +CUDA graphs" in accumulating  # the trainer keeps persistent .grad buffers
    # with checkpointing chosen for every variant there is no separate +selective AC row
    assert "optimized +selective AC" not in [v.name for v in throughput.our_variants(family, "full")]
    # --ac-layers: selective checkpointing on the first N blocks only, one row per N
    partial = {v.name: v for v in throughput.our_variants(family, "none", ac_layers=(20, 22))}
    row = partial[f"{best} +selective AC on 20 blocks"]
    assert (row.activation_checkpointing, row.ac_layers) == ("selective", 20)
    assert f"{best} +selective AC on 22 blocks" in partial and f"{best} +selective AC on 20 blocks" not in names
    cfg = throughput.train_config(throughput.parse_args(["--ac-layers", "20"]), row, 10, "unused")
    assert (cfg.trainer.activation_checkpointing, cfg.trainer.activation_checkpointing_layers) == ("selective", 20)


def test_markov_batches_are_deterministic_shifted_and_learnable():
    a = throughput.markov_batches(3, 2, 64, vocab=1000, seed=5)
    b = throughput.markov_batches(3, 2, 64, vocab=1000, seed=5)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    batch = a[0]
    assert batch["input_ids"].shape == (2, 64)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels are the next tokens
    tokens = torch.cat([x["input_ids"].flatten() for x in a])
    assert tokens.max() < throughput.MARKOV_STATES
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])  # fresh batches, nothing to memorise
    # each token is followed by at most MARKOV_BRANCHES distinct tokens (the chain's structure)
    pairs = torch.stack([torch.cat([x["input_ids"].flatten() for x in a]), torch.cat([x["labels"].flatten() for x in a])])
    for prev in pairs[0].unique()[:20]:
        assert pairs[1][pairs[0] == prev].unique().numel() <= throughput.MARKOV_BRANCHES


def test_loss_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "loss.json"
    throughput.main(["--model", "configs/model/gpt2_tiny.yaml", "--batch", "2", "--seq-len", "32",
                     "--loss-check", "4", "--warmup", "1", "--variants", "reference", "--out", str(out)])
    written = json.loads(out.read_text())
    rows = written["rows"]
    assert written["meta"]["strategy"] == "none" and written["meta"]["host_cpu"]  # host speed moves host-bound rows
    assert [r["variant"] for r in rows] == ["reference"]
    assert len(rows[0]["losses"]) == 4 and all(l == l for l in rows[0]["losses"])
    assert rows[0]["losses"][0] > rows[0]["losses"][-1]  # the loss falls on the chain


def test_the_compiled_reference_runs_without_our_graph_pass(tmp_path, monkeypatch):
    # Preparing a compiled model installs the tied-embedding pass (src/trainer/graph_passes.py);
    # the pure-PyTorch reference must compile as plain torch.compile does, so its variant clears it
    # before the first step, when the graph compiles.
    import torch._inductor.config as inductor_config

    seen = []
    time_steps = throughput.time_steps

    def recording(*args, **kwargs):
        seen.append(inductor_config.post_grad_custom_post_pass)
        return time_steps(*args, **kwargs)

    monkeypatch.setattr(throughput, "time_steps", recording)
    with inductor_config.patch(post_grad_custom_post_pass=None):
        throughput.main(["--model", "configs/model/gpt2_tiny.yaml", "--batch", "2", "--seq-len", "32", "--loss-check", "2",
                         "--warmup", "1", "--variants", "reference+compile", "--out", str(tmp_path / "ref.json")])
    assert seen == [None]


@pytest.mark.parametrize("name, category", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<", "optimizer"),
    ("_cross_entropy_bwd_kernel", "loss"),
    ("triton_red_fused__log_softmax__to_copy__unsafe_view", "loss"),
    ("triton_poi_fused_gelu_gelu_backward_view_4", "elementwise/other"),
])
def test_profile_kernel_categories(name, category):
    assert throughput.kernel_category(name) == category


def test_gradient_accumulation_counts_every_micro_batch(tmp_path):
    """--grad-accum 2: each timed step is one Trainer step over two micro-batches, counted as
    twice the tokens; the loss check's steps see fresh micro-batches."""
    out = tmp_path / "accum.json"
    throughput.main(["--model", "configs/model/gpt2_tiny.yaml", "--batch", "2", "--seq-len", "32", "--grad-accum", "2",
                     "--loss-check", "3", "--warmup", "1", "--variants", "reference", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["grad_accum"] == 2
    row = result["rows"][0]
    assert len(row["losses"]) == 3
    assert row["tokens_per_s"] == pytest.approx(2 * 32 * 2 / (row["step_ms"] / 1e3), rel=1e-6)
    with pytest.raises(SystemExit, match="--grad-accum must be at least 1"):
        throughput.main(["--grad-accum", "0"])


def test_gpu_idle_sums_the_uncovered_time_between_kernels_by_the_pair_around_it():
    class Event:
        def __init__(self, name, start, end, device=torch.autograd.DeviceType.CUDA):
            self._args = name, start, end, device

        def name(self):
            return self._args[0]

        def start_ns(self):
            return self._args[1]

        def end_ns(self):
            return self._args[2]

        def duration_ns(self):
            return self._args[2] - self._args[1]

        def device_type(self):
            return self._args[3]

    events = [
        Event("fwd", 0, 1_000_000), Event("bwd", 3_000_000, 6_000_000),  # 2 ms after fwd
        Event("copy", 4_000_000, 5_000_000),  # inside bwd (another stream): no gap
        Event("host", 0, 9_000_000, torch.autograd.DeviceType.CPU),  # not GPU activity
        Event("cudaStreamSynchronize", 1_000_000, 3_000_000, torch.autograd.DeviceType.CPU),  # a host wait
        Event("cudaLaunchKernel", 3_000_000, 3_010_000, torch.autograd.DeviceType.CPU),  # a launch: microseconds
        Event("adam", 6_500_000, 7_000_000),  # 0.5 ms after bwd, which ended last
        Event("fwd", 8_000_000, 9_000_000), Event("bwd", 11_000_000, 12_000_000),  # 1 ms, then 2 ms again
    ]
    prof = type("Prof", (), {"profiler": type("P", (), {"kineto_results": type("K", (), {"events": lambda self: events})()})()})()
    idle = throughput.gpu_idle(prof, steps=2)
    assert idle["idle_ms_per_step"] == pytest.approx((2 + 0.5 + 1 + 2) / 2)
    assert idle["gaps"][0] == {"after": "fwd", "before": "bwd", "ms_per_step": 2.0, "calls_per_step": 1.0, "max_ms": 2.0}
    assert [(g["after"], g["before"]) for g in idle["gaps"][1:]] == [("adam", "fwd"), ("bwd", "adam")]
    assert idle["host_syncs_per_step"] == {"cudaStreamSynchronize": 0.5}
    # the runtime call's host time, per step: the blocking one is ranked first
    assert idle["host_api"][0] == {"call": "cudaStreamSynchronize", "ms_per_step": 1.0, "calls_per_step": 0.5, "max_ms": 2.0}
    assert idle["host_api"][1]["call"] == "cudaLaunchKernel"


def test_kernel_launchers_name_the_op_chain_behind_each_kernel_costliest_first():
    from collections import namedtuple

    Kernel = namedtuple("Kernel", "name device duration")  # as the profiler's: duration in us

    class Op:
        def __init__(self, name, parent=None, kernels=(), device=torch.autograd.DeviceType.CPU):
            self.name, self.cpu_parent, self.kernels, self.device_type = name, parent, list(kernels), device

    step = Op("Optimizer.step")
    norm = Op("aten::linalg_vector_norm", step)
    graph = Op("CompiledFunctionBackward")
    events = [
        step, norm, graph,
        Op("aten::sum", norm, [Kernel("reduce_kernel", 0, 30.0), Kernel("Memset (Device)", 0, 2.0)]),
        Op("aten::sum", Op("aten::sum_grad", graph), [Kernel("reduce_kernel", 0, 50.0)] * 2),
        Op("aten::mm", graph, [Kernel("nvjet_gemm", 0, 400.0)]),
        Op("reduce_kernel", None, [Kernel("reduce_kernel", 0, 99.0)], device=torch.autograd.DeviceType.CUDA),
    ]
    launchers = throughput.kernel_launchers(events, steps=2)
    assert launchers["reduce_kernel"] == [  # the GPU-side event is not a launcher
        {"op": "aten::sum < aten::sum_grad < CompiledFunctionBackward", "ms_per_step": 0.05, "calls_per_step": 1.0},
        {"op": "aten::sum < aten::linalg_vector_norm < Optimizer.step", "ms_per_step": 0.015, "calls_per_step": 0.5},
    ]
    assert launchers["Memset (Device)"][0]["op"].startswith("aten::sum < aten::linalg_vector_norm")
    assert launchers["nvjet_gemm"] == [{"op": "aten::mm < CompiledFunctionBackward", "ms_per_step": 0.2,
                                        "calls_per_step": 0.5}]
    with pytest.raises(SystemExit, match="add --profile"):
        throughput.main(["--profile-ops"])


def test_profile_steps_runs_one_untraced_step_first_and_syncs_around_the_traced_ones(monkeypatch):
    calls = []  # ("step", i) and ("sync",) in order

    def step_fn(group, i):
        calls.append(("step", i))
        torch.zeros(3).mean() if i == 0 else torch.ones(4).sum()

    traced = []  # the profiler gpu_idle reads
    real_gpu_idle = throughput.gpu_idle
    monkeypatch.setattr(throughput, "gpu_idle", lambda prof, steps: traced.append(prof) or real_gpu_idle(prof, steps))
    profile = throughput.profile_steps(step_fn, [[{}]], "cpu", steps=2, sync=lambda: calls.append(("sync",)),
                                       activities=[torch.profiler.ProfilerActivity.CPU])
    # 1 warm-up step inside the schedule, synced before the trace starts (its kernels must not run
    # inside the trace), then the 2 traced ones, synced while the trace still records
    assert calls == [("step", 0), ("sync",), ("step", 1), ("step", 2), ("sync",)]
    names = [e.name() for e in traced[0].profiler.kineto_results.events()]
    assert names.count("aten::ones") == 2 and "aten::zeros" not in names  # the warm-up step is not traced
    assert set(profile) >= {"gpu_ms_per_step", "categories_ms", "top_kernels", "idle_ms_per_step", "host_api", "gaps"}


def test_strategy_flags_need_their_strategy():
    """--fsdp-units adds FSDP2 rows and --ddp-bucket-cap-mb sizes DDP's buckets: without their
    strategy each is refused up front, not ignored."""
    with pytest.raises(SystemExit, match="--fsdp-units groups FSDP2's units"):
        throughput.main(["--fsdp-units", "4"])
    with pytest.raises(SystemExit, match="--ddp-bucket-cap-mb sizes DDP's gradient buckets"):
        throughput.main(["--ddp-bucket-cap-mb", "100"])


def test_repeat_runs_the_variants_in_turn_and_summarises_each(tmp_path, monkeypatch, capsys):
    """--repeat 3: A B A B A B in one process, each row knowing its round; the JSON and the table
    add each variant's median, min, max and spread, and its median against the compiled reference's."""
    order = []
    speeds = {"reference+compile": iter([100.0, 104.0, 98.0]), "reference": iter([50.0, 55.0, 51.0])}

    def fake_run(args, variant, groups, steps, info):
        order.append(variant.name)
        return {"tokens_per_s": next(speeds[variant.name]), "flops_per_token": 1, "step_ms": 1.0, "host_ms": 1.0,
                "peak_gib": 0.1, "peak_reserved_gib": 0.2, "compile_s": 0.0, "losses": [1.0]}

    monkeypatch.setattr(throughput, "run_ours", fake_run)
    out = tmp_path / "repeat.json"
    throughput.main(["--model", "configs/model/gpt2_tiny.yaml", "--repeat", "3", "--out", str(out),
                     "--variants", "reference+compile", "reference"])
    assert order == ["reference", "reference+compile"] * 3  # in the list's order, round after round
    written = json.loads(out.read_text())
    assert written["meta"]["repeat"] == 3
    assert [(r["variant"], r["round"]) for r in written["rows"]][:3] == [("reference", 0), ("reference+compile", 0),
                                                                        ("reference", 1)]
    summary = {s["variant"]: s for s in written["summary"]}
    assert summary["reference+compile"]["median_tokens_per_s"] == 100.0 and summary["reference+compile"]["runs"] == 3
    assert summary["reference"]["min_tokens_per_s"] == 50.0 and summary["reference"]["max_tokens_per_s"] == 55.0
    assert summary["reference"]["spread"] == pytest.approx(5 / 51)
    assert summary["reference"]["vs_baseline"] == pytest.approx(0.51)
    table = capsys.readouterr().out
    assert "reference [3]" in table and "0.510x" in table and "9.80%" in table


def test_repeat_is_refused_where_it_means_nothing():
    with pytest.raises(SystemExit, match="--repeat must be at least 1, got 0"):
        throughput.main(["--repeat", "0"])
    with pytest.raises(SystemExit, match="--repeat compares speeds over rounds; a --loss-check run"):
        throughput.main(["--repeat", "2", "--loss-check", "10"])


def test_steps_must_exceed_the_warmup():
    """Timing needs steps after the untimed warm-up: too few were an IndexError or a
    ZeroDivisionError inside every variant's row, now one message up front."""
    with pytest.raises(SystemExit, match="--steps 8 must exceed --warmup 8"):
        throughput.main(["--steps", "8"])
    with pytest.raises(SystemExit, match="--loss-check 5 must exceed --warmup 8"):
        throughput.main(["--loss-check", "5"])
    with pytest.raises(SystemExit, match="--warmup be >= 0"):
        throughput.main(["--warmup", "-1"])


@pytest.mark.gpu
def test_clocks_read_during_the_timed_steps_gpu():
    import shutil
    import types

    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi not on the PATH")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def step(group, i):
        for _ in range(20):
            a @ a
        return torch.zeros((), device="cuda")

    args = types.SimpleNamespace(warmup=20, batch=1, seq_len=1, grad_accum=1, clocks=True)
    info = types.SimpleNamespace(device=torch.device("cuda", torch.cuda.current_device()), world_size=1)
    result = throughput.time_steps(step, [[{}]], 120, args, info)
    assert 100 < result["sm_mhz"] < 5000 and result["power_w"] > 0
