"""One AdamW step over a model's parameters, side by side on one GPU: our Triton AdamW
(`TritonAdamW`, kernels/adamw.py, the clip coefficient folded into its read of the gradients)
against torch.optim.AdamW fused and foreach, alone and with the clipping pass the trainer runs
before them (`clip_grads_`).

The parameters have the model config's shapes, in fp32, grouped as the trainer groups them
(decayed matrices, the rest undecayed), with random gradients. Each row is the median GPU time of
one `step()` (`triton.testing.do_bench`, launches included: ours is two, torch's fused one per
group and dtype). The rate counts the 28 bytes per parameter an AdamW update must move at least
(gradient, parameter and both moments read; the last three written) and is set against a
device-to-device copy measured in the same run, the ceiling for this memory-bound op. The row
`triton bf16 moments` (`optimizer.state_dtype: bfloat16`) moves 20 bytes per parameter, and its
rate counts those.

    python benchmarks/optimizer.py                                          # Qwen2-0.5B's parameters
    python benchmarks/optimizer.py --model configs/model/gpt_125m.yaml
    python benchmarks/optimizer.py --sweep 1024x8 2048x8 4096x8 8192x16      # our kernel's launch settings

Writes benchmarks/results/optimizer_<model>_<device>.json and a PNG beside it; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repository root on the path

from kernels.adamw import BLOCK, NUM_WARPS, check_launch  # noqa: E402
from src.models import AutoModelForCausalLM, load_model_config  # noqa: E402
from src.trainer.optimizer import TritonAdamW, clip_grads_, param_groups  # noqa: E402

BYTES_PER_PARAM = 28  # fp32: gradient, parameter, exp_avg, exp_avg_sq read; the last three written
# Our AdamW's rows and the dtype of their moments
TRITON_STATE_DTYPE = {"triton": torch.float32, "triton bf16 moments": torch.bfloat16}


def bytes_per_param(provider: str) -> int:
    """What one parameter's update moves: fp32 gradient read, fp32 parameter read and written,
    both moments read and written in their dtype (fp32 for torch's AdamW)."""
    moment_bytes = TRITON_STATE_DTYPE.get(provider, torch.float32).itemsize
    return 4 + 2 * 4 + 2 * 2 * moment_bytes
HYPER = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1


def parse_launch(text: str) -> tuple[int, int]:
    """'1024x8' -> (block, num_warps), checked as the kernel checks them."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a launch setting is BLOCKxWARPS, e.g. 1024x8; got {text!r}")
    block, num_warps = int(match[1]), int(match[2])
    try:
        check_launch(block, num_warps)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return block, num_warps


def parameter_shapes(model_path: str) -> list[list[tuple[int, ...]]]:
    """The shapes of the model's parameters in the trainer's two groups (decayed, undecayed), tied
    weights once. The model is built on the meta device: nothing is allocated."""
    config = load_model_config(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [[tuple(p.shape) for p in group["params"]] for group in param_groups(model, WEIGHT_DECAY)]


def make_groups(shapes: list[list[tuple[int, ...]]], device: torch.device, seed: int = 0) -> list[dict]:
    """fp32 parameters with random gradients, in the trainer's groups."""
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for shapes_of_group, decay in zip(shapes, (WEIGHT_DECAY, 0.0)):
        params = []
        for shape in shapes_of_group:
            p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
            params.append(p)
        groups.append({"params": params, "weight_decay": decay})
    return groups


def build(provider: str, groups: list[dict], launch: tuple[int, int] = (BLOCK, NUM_WARPS)) -> torch.optim.Optimizer:
    # Fresh group dicts: an optimizer writes its defaults into the dicts it is given (TritonAdamW's
    # foreach=False and fused=None would then turn the next one's fused=True off).
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
    if provider in TRITON_STATE_DTYPE:
        opt = TritonAdamW(groups, block=launch[0], num_warps=launch[1], state_dtype=TRITON_STATE_DTYPE[provider],
                          **HYPER)
        device = groups[0]["params"][0].device
        opt.grad_scale = torch.ones((), device=device)  # the clip coefficient, as the trainer passes it
        opt.found_inf = torch.zeros((), device=device)
        return opt
    if provider in ("torch fused", "torch foreach"):
        return torch.optim.AdamW(groups, fused=provider == "torch fused", foreach=provider == "torch foreach", **HYPER)
    raise ValueError(f"unknown provider {provider!r}")


def step_fn(opt: torch.optim.Optimizer, groups: list[dict], clip: bool):
    """One optimizer step; with `clip`, torch's the way the trainer runs it: the gradients scaled
    in place by the clip coefficient first (a coefficient of 1: the pass, not a shrinking gradient)."""
    grads = [p.grad for g in groups for p in g["params"]]
    coefficient = torch.ones((), device=grads[0].device)

    def step():
        if clip:
            clip_grads_(grads, max_norm=float("inf"), total_norm=coefficient)
        opt.step()

    return step


def max_update_error(shapes: list[list[tuple[int, ...]]], device: torch.device, launch: tuple[int, int],
                     provider: str = "triton") -> float:
    """Largest difference between our update and torch's foreach AdamW after two steps, on the
    model's smallest tensors of each group and its first matrix (the same math must hold whatever
    the launch setting; with bf16 moments, to their rounding)."""
    picked = [sorted(set(g), key=lambda s: torch.Size(s).numel())[:3] for g in shapes]
    picked[0] = picked[0] + [shapes[0][0]]
    ours, theirs = make_groups(picked, device, seed=1), make_groups(picked, device, seed=1)
    opt_a, opt_b = build(provider, ours, launch), build("torch foreach", theirs)
    for _ in range(2):
        opt_a.step()
        opt_b.step()
    return max((p - q).abs().max().item() for ga, gb in zip(ours, theirs) for p, q in zip(ga["params"], gb["params"]))


def copy_tbps(device: torch.device) -> float:
    """Device-to-device copy rate of 2 GiB buffers, TB/s counting bytes read and written."""
    import triton.testing

    src = torch.empty(2**29, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e9


def format_table(rows: list[dict], copy_rate: float) -> str:
    header = f"{'provider':<30} {'launch':>8} {'step ms':>8} {'TB/s (bytes moved)':>18} {'of copy':>8} {'max err':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        err = f"{r['max_err']:.1e}" if r.get("max_err") is not None else "-"
        lines.append(f"{r['provider']:<30} {r['launch']:>8} {r['step_ms']:>8.3f} {r['tbps']:>18.2f} "
                     f"{100 * r['tbps'] / copy_rate:>7.1f}% {err:>8}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['provider']} {r['launch']}".strip() for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    ax.barh(labels, [r["step_ms"] for r in rows])
    for i, r in enumerate(rows):
        ax.text(r["step_ms"], i, f" {r['step_ms']:.2f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GPU ms per optimizer step (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="configs/model/qwen2_0.5b.yaml", help="a model YAML (its parameter shapes)")
    parser.add_argument("--sweep", nargs="*", type=parse_launch, default=[], metavar="BLOCKxWARPS",
                        help=f"our kernel again at these launch settings (default {BLOCK}x{NUM_WARPS})")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/optimizer_<model>_<device>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("benchmarks/optimizer.py needs a CUDA GPU; the CPU interpreter is for tests only")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times compiled kernels")
    import triton
    import triton.testing

    device = torch.device("cuda")
    shapes = parameter_shapes(args.model)
    numel = sum(torch.Size(s).numel() for g in shapes for s in g)
    copy_rate = copy_tbps(device)
    print(f"{numel / 1e6:.1f}M parameters, {BYTES_PER_PARAM * numel / 1e9:.2f} GB per update; copy {copy_rate:.2f} TB/s",
          flush=True)
    runs = [("triton", (BLOCK, NUM_WARPS), False), ("triton bf16 moments", (BLOCK, NUM_WARPS), False),
            ("torch fused", None, False), ("torch fused", None, True),
            ("torch foreach", None, False), ("torch foreach", None, True)]
    runs += [("triton", launch, False) for launch in args.sweep if launch != (BLOCK, NUM_WARPS)]
    groups = make_groups(shapes, device)
    rows = []
    for provider, launch, clip in runs:
        opt = build(provider, groups, launch or (BLOCK, NUM_WARPS))  # the launch setting is ours alone
        step = step_fn(opt, groups, clip)
        ms = triton.testing.do_bench(step, return_mode="median")
        moved = bytes_per_param(provider)
        row = {"provider": provider + (" + clip pass" if clip else ""), "launch": "x".join(map(str, launch or ())),
               "step_ms": ms, "tbps": moved * numel / ms / 1e9, "bytes_per_param": moved,
               "max_err": max_update_error(shapes, device, launch, provider) if launch else None}
        rows.append(row)
        print(f"  {row['provider']} {row['launch']}: {ms:.3f} ms", flush=True)
        del opt, step
        torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name()
    meta = {
        "device": device_name, "torch": torch.__version__, "triton": triton.__version__, "model": args.model,
        "parameters": numel, "bytes_per_update": BYTES_PER_PARAM * numel, "copy_tbps": copy_rate,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or REPO / "benchmarks" / "results" / f"optimizer_{Path(args.model).stem}_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    title = f"AdamW over {Path(args.model).stem}'s {numel / 1e6:.0f}M fp32 parameters, {device_name}, torch {torch.__version__}"
    plot(rows, out.with_suffix(".png"), title)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    print(title)
    print(format_table(rows, copy_rate))


if __name__ == "__main__":
    main()
