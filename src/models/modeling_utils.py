"""What every causal-LM family shares: the output type, generation with a KV cache, and
Hugging Face checkpoint reading and writing.

A family subclasses `CausalLM` and provides:
    config_class        its config dataclass (with from_hf_config / to_hf_config)
    hf_model_type       the `model_type` of its Hugging Face checkpoints
    from_hf_state_dict  / to_hf_state_dict: the parameter-name mapping (hf_mapping.py)
    hidden_states(input_ids, position_ids=None, attention_mask=None, kv_cache=None, document_ids=None) -> (B, T, C)
and inherits `forward`, which adds the LM head and the loss.
"""

from __future__ import annotations

import glob
import json
import numbers
import operator
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .components import IGNORE_INDEX, KVCache, compute_weight

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


@dataclass
class CausalLMOutput:
    """loss: mean cross-entropy over labels != -100 (None without labels).
    logits: (B, T, V), or None when the fused linear+cross-entropy kernel computed the loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def shift_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for next-token prediction: labels[:, t] = input_ids[:, t + 1], last position ignored.

    Our models take labels already aligned with the logits (no shift inside the model, so no
    (B, T, V) copy); Hugging Face models shift internally. This turns one convention into the other.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


# ----------------------------------------------------------------------------------------------
# Config checks (the families' __post_init__): a bad value fails at load time, naming the key and
# the allowed range, instead of as a shape error or NaN logits deep in the model.


def require_positive(name: str, value: float | int | None, when: str = "") -> None:
    """`value` > 0; None passes (an optional field left unset). `when` says when the key is used."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0{when}, got {value}")


def require_probability(name: str, value: float) -> None:
    """A dropout rate: in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (a dropout probability), got {value}")


def require_token_id(name: str, token: int | None, vocab_size: int) -> None:
    """A special token's id: None (unset) or inside the vocabulary."""
    if token is not None and not 0 <= token < vocab_size:
        raise ValueError(f"{name} {token} is outside the vocabulary (vocab_size {vocab_size})")


def require_hf_size_keys(
    family: str, hf: dict[str, Any], keys: tuple[str, ...], source: str, nullable: tuple[str, ...] = ()
) -> None:
    """The config.json keys that set a model's size must be present (`nullable` ones may be null).
    transformers has defaults for them too, but those describe one model; a file that omits one most
    likely describes another, and the default would surface only later as every weight's shape
    mismatching."""
    missing = [key for key in keys if hf.get(key) is None] + [key for key in nullable if key not in hf]
    if missing:
        raise ValueError(
            f"{family} {source} lacks {', '.join(missing)} (or sets null): they set the model's size and have "
            "no default that fits every checkpoint; add them to config.json with the sizes of the checkpoint's weights"
        )


def tied_head(family: str, stored_head: torch.Tensor | None, embedding: torch.Tensor, embedding_name: str) -> torch.Tensor:
    """The head of a config with tie_word_embeddings: true, the embedding. A stored copy equal to it
    (some exporters write both) is dropped; a different one is an error, since dropping it would
    silently give other logits than the checkpoint's (transformers keeps it untied, and only warns)."""
    if stored_head is not None and not torch.equal(stored_head, embedding):
        raise ValueError(
            f"{family} checkpoint stores an 'lm_head.weight' that differs from '{embedding_name}', but its "
            "config.json sets tie_word_embeddings: true (transformers' default where the key is absent), which "
            "would replace the stored head with the embedding; set tie_word_embeddings: false in config.json to "
            "keep the stored head, or remove lm_head.weight from the checkpoint to tie the head to the embedding"
        )
    return embedding


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoint files


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: '{path}'")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"'{path}' has no {CONFIG_NAME}; a Hugging Face checkpoint directory needs one")
    return _read_json(config_file)


def _read_json(file: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{file}' is not valid JSON ({e}); the checkpoint's file is damaged or was cut short") from e


def load_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"'{index}' has no 'weight_map' object naming each tensor's shard")
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = os.path.join(path, shard)
            if not os.path.isfile(shard_file):
                raise FileNotFoundError(f"{index} names shard '{shard}', which is missing from '{path}'")
            state_dict.update(load_file(shard_file))
        return state_dict
    if os.path.isfile(os.path.join(path, TORCH_WEIGHTS_NAME)):
        return torch.load(os.path.join(path, TORCH_WEIGHTS_NAME), map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"'{path}' holds no weights: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}"
    )


def save_hf_checkpoint(
    path: str | os.PathLike,
    hf_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Write config.json and safetensors (sharded with an index when larger than max_shard_bytes)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    # Weight files of an earlier save in this directory go first: a loader (ours, and transformers')
    # prefers model.safetensors over a sharded index, so an old single file beside new shards would
    # be what loads. Only the names this function writes are removed; other files stay.
    stale = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, TORCH_WEIGHTS_NAME]
    stale += [os.path.basename(f) for f in glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]
    for name in stale:
        if os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata=metadata)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Sampling


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (at least one kept)."""
    if top_k is not None and top_k > 0:
        top_k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class CausalLM(nn.Module):
    """Base of the model families: generation and Hugging Face interop."""

    config_class: ClassVar[type]
    hf_model_type: ClassVar[str]

    # Filled by each family.
    config: Any
    layers: nn.ModuleList
    lm_head: nn.Linear
    loss_fn: Any  # components.LMLoss
    head_dim: int
    n_kv_heads: int
    uses_learned_positions: ClassVar[bool] = False
    # The residual stream's dtype under autocast; None keeps the embeddings' dtype. Set by the
    # trainer (`parallelize.apply_residual_dtype`, from trainer.residual_dtype).
    residual_dtype: torch.dtype | None = None

    def residual_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings' output (B, T, C) as the residual stream: cast to `residual_dtype` under
        autocast, unchanged otherwise (without autocast the fp32 weights need fp32 activations)."""
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            return x.to(self.residual_dtype)
        return x

    # -- sizes ---------------------------------------------------------------------------------

    def num_parameters(self, exclude_position_embeddings: bool = True) -> int:
        """Distinct parameters (tied weights counted once), optionally without position tables."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_position_embeddings and name.startswith("wpe."):
                continue
            total += p.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 L H Q T, N the parameters without position tables
        (the PaLM / nanoGPT estimate: 6N for the matmuls' forward and backward, 12 L H Q T for
        attention's scores and weighted sums)."""
        cfg = self.config
        return 6 * self.num_parameters() + 12 * cfg.n_layer * cfg.n_head * self.head_dim * seq_len

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids (B, T); labels (B, T) aligned with the logits (see `shift_labels`), -100 ignored.

        position_ids (B, T): positions for RoPE / learned tables (packed documents, left padding).
        attention_mask (B, T_past + T): 1 for real tokens, 0 for padding (generation).
        document_ids (B, T): packed documents (runs of equal ids); no token attends across them.
        """
        self._check_inputs(input_ids, labels, position_ids, attention_mask, kv_cache, document_ids)
        hidden = self.hidden_states(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            kv_cache=kv_cache,
            document_ids=document_ids,
        )
        return self.lm_output(hidden, labels, return_logits)

    def _check_inputs(self, input_ids, labels, position_ids, attention_mask, kv_cache, document_ids) -> None:
        """Shapes and dtypes against input_ids (B, T), so that a wrong argument is named here rather
        than failing deep in attention, or passing with a silently wrong loss (labels of another
        shape with as many elements). Token ids and labels are range-checked where that costs no
        device sync: on the CPU, outside a compiled graph (on a GPU an id past the vocabulary stops
        the embedding with a device-side assert)."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids of shape (batch, seq_len), got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        expected = {"labels": (B, T), "position_ids": (B, T), "document_ids": (B, T), "attention_mask": (B, past + T)}
        given = {"labels": labels, "position_ids": position_ids, "document_ids": document_ids,
                 "attention_mask": attention_mask}  # fmt: skip
        for name, tensor in given.items():
            if tensor is None:
                continue
            shape = expected[name]
            # position ids may be shared by the batch: (1, T)
            ok = tuple(tensor.shape) == shape or (name == "position_ids" and tuple(tensor.shape) == (1, T))
            if not ok:
                cache = f" (the cache holds {past} tokens)" if name == "attention_mask" and past else ""
                raise ValueError(f"{name} must have shape {shape} for input_ids of shape {(B, T)}{cache}, got "
                                 f"{tuple(tensor.shape)}" + (" (labels align with input_ids: see shift_labels)"
                                                              if name == "labels" else ""))
        if input_ids.device.type != "cpu" or torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        vocab = self.config.vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must be in [0, vocab_size={vocab}), got ids from {low} to {high}")
        if labels is not None:
            kept = labels[labels != IGNORE_INDEX]
            if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
                raise ValueError(f"labels must be in [0, vocab_size={vocab}) or {IGNORE_INDEX} (ignored), "
                                 f"got labels from {int(kept.min())} to {int(kept.max())}")

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define hidden_states()")

    # -- loss head ----------------------------------------------------------------------------

    def lm_output(
        self, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool | None
    ) -> CausalLMOutput:
        """Logits and/or loss from the final hidden states (B, T, C).

        With `kernels.cross_entropy: fused_linear` and labels, the loss never materialises the
        logits and `logits` is None unless `return_logits=True` asks for them.
        """
        if labels is not None and self.loss_fn.fused:
            weight = compute_weight(self.lm_head.weight, self.lm_head.weight_copy)  # its bf16 copy, if kept
            loss = self.loss_fn(hidden, weight, labels, logits=None)
            return CausalLMOutput(loss=loss, logits=self.lm_head(hidden) if return_logits else None)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = self.loss_fn(hidden, self.lm_head.weight, labels, logits) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits if return_logits is not False else None)

    # -- cache ---------------------------------------------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache in the dtype the keys and values are computed in: the autocast dtype when autocast
        is on (fp32 weights, bf16 projections), else the weights'. An fp32 cache under bf16 autocast
        held twice the memory and handed attention fp32 keys beside bf16 queries."""
        param = self.lm_head.weight
        device_type = param.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype
        return KVCache(self.config.n_layer, batch_size, max_len, self.n_kv_heads, self.head_dim, dtype, param.device)

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue a batch of prompts; returns (B, T + new) token ids.

        Prompts of different lengths are left-padded with `attention_mask` marking real tokens
        (1) and padding (0). Greedy unless `do_sample`; sampling applies temperature, then
        top-k, then top-p. A row stops at an EOS token and is filled with `pad_token_id` after it;
        generation ends when every row has stopped or after `max_new_tokens`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token per row (input_ids has seq_len 0)")
        try:  # an int, a numpy integer or a 0-d integer tensor; not a bool or a float
            steps = operator.index(max_new_tokens) if not isinstance(max_new_tokens, bool) else -1
        except TypeError:
            steps = -1
        if steps < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        max_new_tokens = steps
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
        if top_p is not None and not 0.0 < top_p <= 1.0:  # (NaN fails too)
            raise ValueError(f"top_p must be in (0, 1], got {top_p}; use None for no nucleus filtering")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}; 0 or None filter nothing")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if not bool(attention_mask[:, -1].all()):
                # Right padding would predict the next token from a pad position and write the
                # continuation after the pads: different tokens, silently.
                raise ValueError("generate takes left-padded prompts: attention_mask has padding (0) in the last "
                                 "position; pad on the left (tokenizer.padding_side = 'left')")
        B, T = input_ids.shape
        max_len = T + max_new_tokens
        limit = getattr(self.config, "block_size", max_len)
        if self.uses_learned_positions and max_len > limit:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size={limit}")
        if eos_token_id is None:
            eos_ids = []
        elif isinstance(eos_token_id, numbers.Integral) or (torch.is_tensor(eos_token_id) and eos_token_id.dim() == 0):
            eos_ids = [int(eos_token_id)]  # an int, a numpy integer or a 0-d tensor
        else:  # any collection of ids: a list, tuple, set, array or 1-d tensor
            eos_ids = [int(i) for i in eos_token_id]
        if eos_ids and pad_token_id is None:
            pad_token_id = eos_ids[0]
        eos = torch.tensor(eos_ids, device=input_ids.device)

        was_training = self.training
        self.eval()
        cache = self.new_kv_cache(B, max_len)
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.long)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding skipped
        else:
            position_ids = None
        tokens = input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        next_input = input_ids
        for _ in range(max_new_tokens):
            hidden = self.hidden_states(
                next_input, position_ids=position_ids, attention_mask=attention_mask, kv_cache=cache
            )
            # Only the last position's logits are needed: the prompt's (B, T, V) logits never exist.
            logits = self.lm_head(hidden[:, -1, :]).float()  # (B, V)
            if do_sample:
                logits = filter_logits(logits / temperature, top_k, top_p)
                next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                next_token = logits.argmax(dim=-1)
            if eos_ids:
                next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
                finished = finished | torch.isin(next_token, eos)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            next_input = next_token[:, None]  # (B, 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
            if eos_ids and bool(finished.all()):
                break
        self.train(was_training)
        return tokens

    # -- Hugging Face interop ------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, kernels=None, dtype: torch.dtype | None = None, device: str | None = None
    ) -> "CausalLM":
        """Load a Hugging Face checkpoint directory of this family."""
        hf_config = read_hf_config(path)
        model_type = hf_config.get("model_type")
        if model_type != cls.hf_model_type:
            raise ValueError(
                f"'{path}' holds a '{model_type}' checkpoint, but {cls.__name__} loads '{cls.hf_model_type}'; "
                "use AutoModelForCausalLM.from_pretrained to pick the family from the checkpoint"
            )
        config = cls.config_class.from_hf_config(hf_config, source=os.path.join(os.fspath(path), CONFIG_NAME))
        model = cls(config, kernels=kernels)
        state_dict = cls.from_hf_state_dict(load_hf_state_dict(path), config)
        model.load_state_dict_strict(state_dict, source=os.fspath(path))
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model

    def load_state_dict_strict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """load_state_dict that reports missing/unexpected/mis-shaped tensors by name."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong_shape = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state_dict and state_dict[k].shape != own[k].shape
        ]
        if missing or unexpected or wrong_shape:
            raise ValueError(
                f"checkpoint '{source}' does not match the model config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                f"wrong shape {wrong_shape[:5]}"
            )
        self.load_state_dict(state_dict, strict=True)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
        state_dict = self.to_hf_state_dict(self.state_dict(), self.config)
        hf_config = self.config.to_hf_config()
        hf_config["torch_dtype"] = str(self.lm_head.weight.dtype).replace("torch.", "")
        save_hf_checkpoint(path, hf_config, state_dict, max_shard_bytes)
