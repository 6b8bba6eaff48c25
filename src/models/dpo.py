"""Direct Preference Optimization as a model wrapper: the policy, a frozen reference, and the loss.

    policy = AutoModelForCausalLM.from_pretrained("path/to/sft_checkpoint")
    model = DPOModel(policy, config=DPOConfig(beta=0.1, loss_type="sigmoid"))
    out = model(**batch)          # chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels
    out.loss.backward()           # out.metrics: rewards/*, logps/* (0-dim tensors, detached)

The Trainer only calls `model(**batch).loss`; everything DPO needs lives here. Labels follow the
project convention: already aligned with the logits (labels[:, t] is the target of position t),
-100 on the prompt and on padding, so only completion tokens are scored. Rows are right-padded;
causal attention means padding after a row's last token never changes its earlier positions, so no
attention mask is needed.

Sequence log-probabilities are SUMS over the completion tokens (labels != -100):

    log pi(y | x) = sum_t log pi(y_t | x, y_<t)

This is the quantity the DPO derivation is about: the implicit reward beta * log(pi(y|x) / pi_ref(y|x))
is a ratio of whole-sequence probabilities, and the closed-form optimal policy of the KL-constrained
objective is stated over sequences. A mean over tokens would optimise a different, length-normalised
objective (SimPO-like; TRL's `ipo` also averages), and would make the loss depend on how many tokens
a completion has in a way the paper's objective does not. Sums are also independent of padding and of
which other rows share the batch. The known cost is DPO's length bias (longer completions have
larger |log pi|); that is the paper's objective, kept as is, for every loss type including `ipo`.

Loss types (z = (pi_c - pi_r) - (ref_c - ref_r), the difference of policy and reference log-ratios):

    sigmoid  -logsigmoid(beta z) (1 - eps) - logsigmoid(-beta z) eps    DPO (Rafailov et al. 2023);
                                                                        eps > 0 is conservative DPO
    ipo      (z - 1 / (2 beta))^2                                       IPO (Azar et al. 2023)
    hinge    relu(1 - beta z)                                           SLiC-style hinge (Zhao et al. 2023)

The loss is the mean over the pairs of the batch; rewards are beta * (pi - ref), per pair.

Per-token log-probabilities are computed from the final hidden states and the LM head weight on the
supervised positions only (prompt tokens are never projected onto the vocabulary). With
`kernels.cross_entropy: fused_linear` they go through the fused Triton kernel
(`kernels/token_logprobs.py`, op `token_logprobs` in dispatch); otherwise through its pure-PyTorch
reference `token_logprobs_ref`, applied `chunk_size` tokens at a time and recomputed in backward
(activation checkpointing per chunk), so no (tokens, vocab) fp32 tensor ever exists whole, forward
or backward. Finding the supervised positions (and checking that no row lacks one) reads a few
small tensors on the host: a sync per forward, which also lets the trailing padding of loader
batches (padded to seq_len) be cut before the transformer runs.

The policy trains without dropout unless `disable_dropout: false` (`DPOModel.train()` keeps it in
eval mode, which in these models switches dropout only), as the reference runs.

The reference model is either live (a frozen deep copy of the policy, run under no_grad in eval mode)
or precomputed: `precompute_reference_logps` runs it once over the data, the result is stored in the
run directory (`<run_dir>/reference_logps_<split>.safetensors`), and `ReferenceLogpsLoader` adds `ref_chosen_logps` / `ref_rejected_logps` to each batch by
its `example_ids`, so the reference model is not kept in memory during training.

Under FSDP2 the reference must be sharded like the policy. The prepare step should (after activation
checkpointing and compile of `model.policy.layers`) call `fully_shard` on every block of
`model.policy.layers` and of `model.reference.layers` (when `model.reference` is not None), then
`fully_shard(model)` at the root: the root group then holds both models' embeddings, final norms and
LM heads, which are gathered for the whole of `DPOModel.forward`, where `hidden_states` and
`lm_head.weight` are read directly. `model.sharded_blocks()` lists those blocks in that order.
Export with `model.policy.save_pretrained(...)` (`DPOModel.save_pretrained` does that).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .components import IGNORE_INDEX, get_kernel
from .components.loss import token_logprobs_ref
from .modeling_utils import CausalLM

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
TRIM_MULTIPLE = 64  # trailing padding is cut to a multiple of this many positions
METRIC_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class DPOConfig:
    """The `dpo:` block of a DPO train config."""

    beta: float = 0.1  # strength of the KL constraint towards the reference
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed probability that a preference label is flipped
    reference: Literal["live", "precomputed"] = "live"
    chunk_size: int = 1024  # tokens per chunk of the pure-PyTorch log-prob path (the fused kernel picks its own)
    # The policy trains without dropout (TRL's default too): with it, policy and reference differ
    # from the first step (a GPT-2 checkpoint's 0.1 rates moved step 0's loss off log 2), and the
    # implicit rewards measure dropout noise as well as the update.
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta} (typical values: 0.01 to 0.5)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type '{self.loss_type}' is unknown; choose one of {list(LOSS_TYPES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ValueError(
                f"label_smoothing ({self.label_smoothing}) is defined only for loss_type 'sigmoid' "
                f"(conservative DPO); set label_smoothing: 0 for '{self.loss_type}'"
            )
        if self.reference not in ("live", "precomputed"):
            raise ValueError(f"reference '{self.reference}' is unknown; choose 'live' or 'precomputed'")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")


@dataclass
class DPOOutput:
    """loss: mean DPO loss over the pairs of the batch. metrics: 0-dim detached tensors (METRIC_NAMES)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# The loss, on sequence log-probabilities


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over (B,) sequence log-probabilities, and the metrics (module docstring)."""
    policy_chosen_logps = policy_chosen_logps.float()
    policy_rejected_logps = policy_rejected_logps.float()
    ref_chosen_logps = ref_chosen_logps.detach().float()
    ref_rejected_logps = ref_rejected_logps.detach().float()
    z = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"loss_type '{loss_type}' is unknown; choose one of {list(LOSS_TYPES)}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), metrics


# ----------------------------------------------------------------------------------------------
# Per-token and per-sequence log-probabilities


def chunked_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-token log-probabilities (N,) fp32 of labels (N,) under logits = hidden (N, C) @ weight (V, C).T.

    The pure-PyTorch reference `token_logprobs_ref`, applied `chunk_size` tokens at a time; with
    gradients enabled each chunk is recomputed in backward (activation checkpointing), so at most
    one chunk's (chunk_size, V) fp32 logits exist at any time, forward or backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if recompute:
            pieces.append(checkpoint(token_logprobs_ref, h, weight, y, use_reentrant=False))
        else:
            pieces.append(token_logprobs_ref(h, weight, y))
    return torch.cat(pieces)


def token_logps_fn(model: CausalLM, chunk_size: int = 1024) -> Callable:
    """(hidden (N, C), weight (V, C), labels (N,)) -> (N,) fp32 log-probs, for this model's kernels:
    the fused Triton kernel under `kernels.cross_entropy: fused_linear`, else the chunked reference."""
    kernels = getattr(model, "kernels", None)
    if kernels is not None and kernels.cross_entropy == "fused_linear":
        return get_kernel("token_logprobs", "triton", setting="fused_linear")
    return functools.partial(chunked_token_logps, chunk_size=chunk_size)


def sequence_logps(
    model: CausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    row_names: list[str] | None = None,
) -> torch.Tensor:
    """Sum of log pi(label_t | input_<=t) over the positions with labels != -100, per row: (B,) fp32.

    input_ids, labels: (B, T), labels aligned with the positions (no shift here). A row without a
    single supervised token is an error naming it (`row_names[i]` describes row i).
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have the same shape")
    B, T = labels.shape
    supervised = labels != IGNORE_INDEX  # (B, T)
    counts = supervised.sum(dim=1)  # (B,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        names = [row_names[i] if row_names else f"row {i}" for i in empty]
        raise ValueError(
            f"{', '.join(names)}: no supervised token (every label is -100), so the sequence log-probability "
            "is undefined; the dataset must skip such rows (empty completion, or a prompt that fills the context)"
        )
    # Right padding after the last supervised position of every row changes nothing (causal
    # attention), so it is not run; the kept length is rounded up to limit distinct shapes.
    last = int(supervised.any(dim=0).nonzero().max()) + 1
    T = min(T, -(-last // TRIM_MULTIPLE) * TRIM_MULTIPLE)
    input_ids, supervised, labels = input_ids[:, :T], supervised[:, :T], labels[:, :T]
    hidden = model.hidden_states(input_ids)  # (B, T, C)
    flat = supervised.reshape(-1).nonzero().squeeze(1)  # (M,) positions with a target
    rows = flat // T  # (M,) the row each position belongs to
    hidden_sel = hidden.reshape(B * T, -1).index_select(0, flat)  # (M, C)
    labels_sel = labels.reshape(-1).index_select(0, flat)  # (M,)
    token_logps = token_logps_fn(model, chunk_size)(hidden_sel, model.lm_head.weight, labels_sel).float()  # (M,)
    return torch.zeros(B, dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def concat_pairs(
    chosen_input_ids: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_input_ids: torch.Tensor,
    rejected_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack chosen over rejected along the batch, right-padded to a common length: (2B, T) each.

    Padding tokens are 0 with label -100; causal attention keeps them from changing earlier positions.
    """
    for name, ids, lab in (("chosen", chosen_input_ids, chosen_labels), ("rejected", rejected_input_ids, rejected_labels)):
        if ids.dim() != 2 or ids.shape != lab.shape:
            raise ValueError(
                f"{name}_input_ids {tuple(ids.shape)} and {name}_labels {tuple(lab.shape)} must both be (batch, seq_len)"
            )
    if chosen_input_ids.shape[0] != rejected_input_ids.shape[0]:
        raise ValueError(
            f"{chosen_input_ids.shape[0]} chosen rows but {rejected_input_ids.shape[0]} rejected rows; "
            "every preference pair needs one of each"
        )
    T = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
    input_ids = torch.cat([_pad_right(chosen_input_ids, T, 0), _pad_right(rejected_input_ids, T, 0)])  # (2B, T)
    labels = torch.cat([_pad_right(chosen_labels, T, IGNORE_INDEX), _pad_right(rejected_labels, T, IGNORE_INDEX)])
    return input_ids, labels


def _row_names(batch_size: int, example_ids: torch.Tensor | None) -> list[str]:
    names = []
    for side in ("chosen", "rejected"):
        for i in range(batch_size):
            example = f" (example {int(example_ids[i])})" if example_ids is not None else ""
            names.append(f"row {i}{example}, {side} completion")
    return names


# ----------------------------------------------------------------------------------------------
# Reference model


def _is_parallel_wrapped(model: nn.Module) -> bool:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def build_reference_model(policy: CausalLM) -> CausalLM:
    """A frozen copy of the policy: deep-copied (call before any DDP / FSDP2 wrapping), eval mode,
    requires_grad False. Under FSDP2 shard it like the policy (module docstring)."""
    if _is_parallel_wrapped(policy):
        raise ValueError(
            "the policy is already wrapped for data parallelism (DDP or FSDP2); build the reference model "
            "(DPOModel or build_reference_model) from the plain policy, then prepare the DPOModel for the hardware"
        )
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    return reference.eval()


def check_reference_matches(policy: nn.Module, reference: nn.Module) -> None:
    """Same class and the same parameters (names and shapes), or an error naming the first mismatch."""
    if type(policy) is not type(reference):
        raise ValueError(
            f"the reference model is a {type(reference).__name__} but the policy is a {type(policy).__name__}; "
            "load the reference from the same checkpoint as the policy"
        )
    ours = {name: tuple(p.shape) for name, p in policy.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    for name, shape in ours.items():
        if name not in theirs:
            raise ValueError(f"the reference model has no parameter '{name}' (policy: {shape}); load the reference from the same checkpoint as the policy")
        if theirs[name] != shape:
            raise ValueError(
                f"parameter '{name}' has shape {theirs[name]} in the reference model but {shape} in the policy; "
                "load the reference from the same checkpoint as the policy"
            )
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise ValueError(f"the reference model has parameters the policy lacks: {extra[:5]}; load the reference from the same checkpoint as the policy")


# ----------------------------------------------------------------------------------------------
# The wrapper


class DPOModel(nn.Module):
    """Policy + frozen reference; `forward` returns the DPO loss and its metrics.

    reference: None builds a frozen deep copy of the policy (config.reference == "live"); must stay
    None with config.reference == "precomputed", where each batch brings ref_chosen_logps /
    ref_rejected_logps instead.
    """

    def __init__(self, policy: CausalLM, reference: CausalLM | None = None, config: DPOConfig | None = None):
        super().__init__()
        self.dpo_config = config or DPOConfig()
        self.policy = policy
        if self.dpo_config.reference == "precomputed":
            if reference is not None:
                raise ValueError(
                    "config.reference is 'precomputed' but a reference model was given; either drop the reference "
                    "model (batches bring ref_chosen_logps / ref_rejected_logps) or set reference: live"
                )
            self.reference = None
        else:
            if reference is None:
                reference = build_reference_model(policy)
            else:
                check_reference_matches(policy, reference)
                reference.requires_grad_(False)
                reference.eval()
            self.reference = reference

    # -- what the trainer reads from a model --------------------------------------------------

    @property
    def config(self) -> Any:
        """The policy's model config (block_size, vocab_size, ...)."""
        return self.policy.config

    def num_parameters(self, exclude_position_embeddings: bool = True) -> int:
        """Trainable parameters: the policy's."""
        return self.policy.num_parameters(exclude_position_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Policy training FLOPs plus, when live, a reference forward (a third of a training step)."""
        policy = self.policy.flops_per_token(seq_len)
        return policy * (4 / 3) if self.reference is not None else policy

    def sharded_blocks(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one before the root: policy layers, then reference layers."""
        blocks = list(self.policy.layers)
        if self.reference is not None:
            blocks += list(self.reference.layers)
        return blocks

    def train(self, mode: bool = True) -> "DPOModel":
        """The reference stays in eval mode whatever the trainer asks (no dropout in the reference),
        and so does the policy under `disable_dropout`: in our models the mode switches dropout only
        (attention-probability, embedding and residual dropout alike), and gradients flow either way."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        if self.dpo_config.disable_dropout:
            self.policy.eval()
        return self

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Export the policy (the reference is the unchanged starting point)."""
        self.policy.save_pretrained(path, **kwargs)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        chosen_input_ids: torch.Tensor,
        chosen_labels: torch.Tensor,
        rejected_input_ids: torch.Tensor,
        rejected_labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        example_ids: torch.Tensor | None = None,
    ) -> DPOOutput:
        """(B, T) chosen and rejected tokens / labels (-100 on prompt and padding; T may differ between
        the two). ref_*_logps (B,): precomputed reference log-probs (reference: precomputed only).
        example_ids (B,): dataset row ids, used to name a bad row in errors."""
        cfg = self.dpo_config
        B = chosen_input_ids.shape[0]
        input_ids, labels = concat_pairs(chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels)
        names = _row_names(B, example_ids)
        policy_logps = sequence_logps(self.policy, input_ids, labels, cfg.chunk_size, names)  # (2B,)

        given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
        if self.reference is None:
            if not all(given):
                raise ValueError(
                    "config.reference is 'precomputed' but the batch lacks ref_chosen_logps / ref_rejected_logps; "
                    "wrap the loader in ReferenceLogpsLoader (after precompute_reference_logps), or set reference: live"
                )
            for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
                if ref.shape != (B,):
                    raise ValueError(f"{name} must have shape ({B},), one value per pair, got {tuple(ref.shape)}")
            ref_chosen, ref_rejected = ref_chosen_logps, ref_rejected_logps
        else:
            if any(given):
                raise ValueError(
                    "the batch brings precomputed ref_*_logps but config.reference is 'live'; "
                    "set reference: precomputed (and build DPOModel without a reference model) to use them"
                )
            with torch.no_grad():
                ref_logps = sequence_logps(self.reference, input_ids, labels, cfg.chunk_size, names)  # (2B,)
            ref_chosen, ref_rejected = ref_logps[:B], ref_logps[B:]

        loss, metrics = dpo_loss(
            policy_logps[:B], policy_logps[B:], ref_chosen, ref_rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing
        )
        return DPOOutput(loss=loss, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# Precomputed reference log-probabilities


@torch.no_grad()
def precompute_reference_logps(
    reference_model: CausalLM,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    path: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Run the reference once over DPO batches; returns (and, with `path`, saves as safetensors)
    {"chosen": (N,), "rejected": (N,), "example_ids": (N,)} on the CPU, fp32 log-probs.

    `batches` must end (a val-style single pass, or give `max_batches`). Batches without
    `example_ids` get ids 0..N-1 in iteration order. Train on the same rows with
    `ReferenceLogpsLoader(loader, table)`, which matches rows by `example_ids`.
    """
    was_training = reference_model.training
    reference_model.eval()
    device = torch.device(device) if device is not None else reference_model.lm_head.weight.device
    chosen, rejected, ids = [], [], []
    seen = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        B = batch["chosen_input_ids"].shape[0]
        example_ids = batch.get("example_ids")
        if example_ids is None:
            example_ids = torch.arange(seen, seen + B)
        seen += B
        input_ids, labels = concat_pairs(
            batch["chosen_input_ids"], batch["chosen_labels"], batch["rejected_input_ids"], batch["rejected_labels"]
        )
        logps = sequence_logps(
            reference_model, input_ids.to(device), labels.to(device), chunk_size, _row_names(B, example_ids)
        ).cpu()  # (2B,)
        chosen.append(logps[:B])
        rejected.append(logps[B:])
        ids.append(example_ids.to("cpu", torch.long))
    reference_model.train(was_training)
    if not ids:
        raise ValueError("precompute_reference_logps got no batches; pass the DPO data loader (a finite pass)")
    table = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "example_ids": torch.cat(ids)}
    if path is not None:
        save_reference_logps(table, path)
    return table


def save_reference_logps(table: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    save_file({k: v.contiguous() for k, v in table.items()}, os.fspath(path), metadata={"format": "dpo_reference_logps"})


def load_reference_logps(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no precomputed reference log-probs at '{path}'; run precompute_reference_logps first")
    table = load_file(path)
    missing = {"chosen", "rejected", "example_ids"} - set(table)
    if missing:
        raise ValueError(f"'{path}' lacks {sorted(missing)}; it was not written by precompute_reference_logps")
    return table


class ReferenceLogpsLoader:
    """Wraps a DPO loader: adds ref_chosen_logps / ref_rejected_logps (B,) to each batch, looked up by
    the batch's `example_ids` in a table from `precompute_reference_logps`. Resumable like the loader."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], table: dict[str, torch.Tensor]):
        self.loader = loader
        ids = table["example_ids"].long()
        if ids.numel() == 0:
            raise ValueError("the reference log-prob table is empty")
        if ids.min() < 0:
            raise ValueError("example_ids must be non-negative")
        size = int(ids.max()) + 1
        self._chosen = torch.full((size,), float("nan"))
        self._rejected = torch.full((size,), float("nan"))
        self._chosen[ids] = table["chosen"].float()
        self._rejected[ids] = table["rejected"].float()

    def _lookup(self, example_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = example_ids.to("cpu", torch.long)
        out_of_range = ids >= self._chosen.numel()
        safe = ids.clamp(max=self._chosen.numel() - 1)
        chosen, rejected = self._chosen[safe], self._rejected[safe]
        missing = out_of_range | chosen.isnan()
        if missing.any():
            raise KeyError(
                f"examples {ids[missing].tolist()[:8]} have no precomputed reference log-probs; "
                "rerun precompute_reference_logps over the same dataset"
            )
        return chosen, rejected

    def __iter__(self):
        for batch in self.loader:
            if "example_ids" not in batch:
                raise KeyError(
                    "the DPO loader yields no 'example_ids'; precomputed reference log-probs are matched to rows by id"
                )
            chosen, rejected = self._lookup(batch["example_ids"])
            yield {**batch, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
