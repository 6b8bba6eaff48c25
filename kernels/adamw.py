"""AdamW over a list of fp32 tensors in one launch, with the gradient-clipping scale applied on
the fly and the whole update skipped on a device flag.

Math (per element, fp32; g = grad * scale, t = the tensor's step count including this update):
    p  = p * (1 - lr * weight_decay)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
the update of torch.optim.AdamW (decoupled weight decay). Clipping by the global norm is a
multiplication of every gradient by one coefficient. Torch's clip_grad_norm_ does that as a pass
of its own, which reads and writes all the gradients. Here the coefficient is read from the
device and applied when the update loads each gradient, so the gradients are read once, by the
update, and never written. When `found_inf` is nonzero (a non-finite gradient norm) every program
returns before touching memory, and the step counts are not advanced (torch's foreach add of a
device scalar to the counts synchronised with the host on an H100: a kernel of our own does it).

Each program updates one block of one tensor (`AdamWTables.block` elements, BLOCK unless the
tables are built with other launch settings, as benchmarks/optimizer.py --sweep does). A block table (tensor index and start of every
block) and tables of the tensors' addresses let one launch cover all the parameters of a group,
however many tensors and of whatever sizes. Reference: torch.optim.AdamW, whose state (step,
exp_avg, exp_avg_sq) and state_dict `TritonAdamW` (src/trainer/optimizer.py) keeps.

Moments in bf16 (`optimizer.state_dtype: bfloat16`) halve the optimizer state: 4 bytes per
parameter less (1.84 GiB for Qwen2-0.5B). The update then moves 20 bytes per element instead of
28. It still runs in fp32 on the loaded moments; only the stores round. Round to nearest would
lose every change smaller than half a bf16 step (2^-9 to 2^-8 relative): with beta2 = 0.999,
v * beta2 rounds back to v, and the second moment would never decay. So the stores round
stochastically, up with probability equal to the dropped fraction of the step, so the stored
moment is the fp32 one in expectation. The random bits are a hash of (tensor, element, step
count): the same step rounds the same way again, which keeps resumed runs exact, and DDP replicas
round alike. The two moments take the two halves of one 32-bit hash. Parameters stay fp32 (the
master weights).

bf16 copies of the weights (`optimizer.bf16_weight_copy`): for the parameters given a copy, the
update also stores the new fp32 value rounded to bf16 (to nearest even, exactly `p.to(bfloat16)`),
2 bytes more per element. The model's matmuls read those copies under bf16 autocast instead of
casting the fp32 weights again in every forward and backward (src/models/components/linear.py),
which reads 4 bytes and writes 2 per weight and cast.

bf16 gradients (`optimizer.bf16_grads`): a gradient may be bf16 (the weight copies' gradients); the
update loads it and runs in fp32 as for an fp32 one, 2 bytes per element less to read.

Limits: fp32 parameters, fp32 or bf16 gradients, fp32 or bf16 moments (both of one dtype), bf16 copies, contiguous, on
one device (under FSDP2 the caller passes each DTensor's local shard); at most 2^32 - 1 elements
per tensor; lr, betas, eps and weight decay are Python floats (the same for the whole list).
Tensors that all start on 16 bytes get vectorised accesses; any other start (a view into a flat
buffer at an odd offset) takes the same kernel without that hint.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _hash32(x):
    """A bijection of uint32 with full avalanche (Wellons' lowbias32): counter-based random bits."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _round_bf16_stochastic(x, random16):
    """fp32 -> bf16, rounding the magnitude up with probability (dropped low 16 bits) / 2^16.
    Adding a uniform 16-bit number to the bits carries into the kept half exactly that often; the
    sign is a separate bit, so negative numbers round symmetrically. inf stays inf."""
    bits = x.to(tl.uint32, bitcast=True) + random16
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low half is zero


@triton.jit
def _round_bf16_nearest(x):
    """fp32 -> bf16 rounded to nearest, ties to even: bit for bit `Tensor.to(torch.bfloat16)`.
    Written out because Triton's interpreter truncates in `.to(tl.bfloat16)`; the GPU's conversion
    rounds the same way as this. NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded).to(tl.bfloat16)  # exact: the low half is zero


@triton.jit
def _adamw_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    offs,
    mask,  # None for a full block: unmasked, vectorised accesses
    scale,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    bias_correction1,
    bias_correction2_sqrt,
    key,  # uint32 scalar of (tensor, step): the stochastic rounding's stream (MOMENTS_BF16)
    c_ptr,  # the parameter's bf16 copy, or None
    MOMENTS_BF16: tl.constexpr,
):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * scale  # fp32 or bf16 gradients
    p = tl.load(p_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(p_ptr + offs, p, mask=mask)
    if c_ptr is not None:
        tl.store(c_ptr + offs, _round_bf16_nearest(p), mask=mask)
    if MOMENTS_BF16:
        random = _hash32(offs.to(tl.uint32) ^ key)  # element index < 2^32 (checked by the launcher)
        tl.store(m_ptr + offs, _round_bf16_stochastic(m, random >> 16), mask=mask)
        tl.store(v_ptr + offs, _round_bf16_stochastic(v, random & 0xFFFF), mask=mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _adamw_program(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, full, scale, lr, beta1, beta2, eps, weight_decay,
                   bias_correction1, bias_correction2_sqrt, key, c_ptr, MOMENTS_BF16: tl.constexpr):
    """One program's block: unmasked (vectorised) when it is full, masked for the tensor's last."""
    if full:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, scale, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2_sqrt, key, c_ptr, MOMENTS_BF16)
    else:
        _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, scale, lr, beta1, beta2, eps, weight_decay,
                     bias_correction1, bias_correction2_sqrt, key, c_ptr, MOMENTS_BF16)


@triton.jit
def _adamw_tensor(p_ptr, g_ptr, m_ptr, v_ptr, COPY_PTRS, t, offs, n, full, scale, lr, beta1, beta2, eps, weight_decay,
                  bias_correction1, bias_correction2_sqrt, key, HAS_COPIES: tl.constexpr, ALIGNED: tl.constexpr,
                  MOMENTS_BF16: tl.constexpr):
    """The program's block of tensor t, writing its bf16 copy too where it has one."""
    if HAS_COPIES:
        copy_address = tl.load(COPY_PTRS + t)
        if copy_address != 0:  # this tensor has a bf16 copy: the update writes it too
            c_ptr = copy_address.to(tl.pointer_type(tl.bfloat16), bitcast=True)
            if ALIGNED:
                c_ptr = tl.multiple_of(c_ptr, 16)
            _adamw_program(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, full, scale, lr, beta1, beta2, eps, weight_decay,
                           bias_correction1, bias_correction2_sqrt, key, c_ptr, MOMENTS_BF16)
        else:
            _adamw_program(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, full, scale, lr, beta1, beta2, eps, weight_decay,
                           bias_correction1, bias_correction2_sqrt, key, None, MOMENTS_BF16)
    else:
        _adamw_program(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, full, scale, lr, beta1, beta2, eps, weight_decay,
                       bias_correction1, bias_correction2_sqrt, key, None, MOMENTS_BF16)


@triton.jit
def _adamw_kernel(
    PARAM_PTRS,  # (T,) int64 addresses of the fp32 parameters, updated in place
    GRAD_PTRS,  # (T,) int64 addresses of their gradients (fp32, or bf16 where GRAD_BF16 says), read only
    GRAD_BF16,  # (T,) int32, nonzero: the tensor's gradient is bf16; read when HAS_BF16_GRADS
    EXP_AVG_PTRS,  # (T,) int64 addresses of the first moments (fp32, or bf16 when MOMENTS_BF16), updated in place
    EXP_AVG_SQ_PTRS,  # (T,) int64 addresses of the second moments (as the first), updated in place
    STEP_PTRS,  # (T,) int64 addresses of the fp32 step counts before this update
    COPY_PTRS,  # (T,) int64 addresses of the parameters' bf16 copies (0: none); read when HAS_COPIES
    NUMELS,  # (T,) int64 element counts
    BLOCK_TENSOR,  # (n_blocks,) int32: the tensor of each program's block
    BLOCK_START,  # (n_blocks,) int64: the first element of each program's block (a multiple of BLOCK)
    SCALE_ptr,  # () fp32 gradient multiplier (the clip coefficient); read when HAS_SCALE
    FOUND_INF_ptr,  # () fp32, nonzero: skip the update; read when HAS_FOUND_INF
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor starts on 16 bytes (checked by the launcher)
    MOMENTS_BF16: tl.constexpr,  # bf16 moments, stored with stochastic rounding
    HAS_COPIES: tl.constexpr,  # some parameters have a bf16 copy to write (COPY_PTRS)
    HAS_BF16_GRADS: tl.constexpr,  # some gradients are bf16 (GRAD_BF16; optimizer.bf16_grads)
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF_ptr) != 0:  # a non-finite step: leave everything as it is
            return
    # lr, betas, eps and weight decay arrive as fp32 (Triton's launcher types Python floats so; the
    # optimizer step runs eagerly, never inside an Inductor graph that could pass fp64).
    block = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + block)
    start = tl.multiple_of(tl.load(BLOCK_START + block), BLOCK)
    n = tl.load(NUMELS + t)
    p_ptr = tl.load(PARAM_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    g_ptr = tl.load(GRAD_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    moment_type = tl.bfloat16 if MOMENTS_BF16 else tl.float32
    m_ptr = tl.load(EXP_AVG_PTRS + t).to(tl.pointer_type(moment_type), bitcast=True)
    v_ptr = tl.load(EXP_AVG_SQ_PTRS + t).to(tl.pointer_type(moment_type), bitcast=True)
    if ALIGNED:
        # Addresses read from memory carry no alignment the compiler can see; the launcher checked
        # that every tensor starts on 16 bytes, which lets full blocks use 16-byte vector accesses.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    step = tl.load(tl.load(STEP_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)) + 1.0
    scale = tl.load(SCALE_ptr) if HAS_SCALE else 1.0
    bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
    # One stream of random bits per (tensor, step); the element index picks within it.
    key = _hash32(t.to(tl.uint32) * 0x9E3779B9 ^ step.to(tl.uint32))
    offs = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= n  # the same branch for the whole program
    if HAS_BF16_GRADS:
        if tl.load(GRAD_BF16 + t) != 0:  # a bf16 gradient: the same update on its loaded values
            g16_ptr = tl.load(GRAD_PTRS + t).to(tl.pointer_type(tl.bfloat16), bitcast=True)
            if ALIGNED:
                g16_ptr = tl.multiple_of(g16_ptr, 16)
            _adamw_tensor(p_ptr, g16_ptr, m_ptr, v_ptr, COPY_PTRS, t, offs, n, full, scale, lr, beta1, beta2, eps,
                          weight_decay, bias_correction1, bias_correction2_sqrt, key, HAS_COPIES, ALIGNED,
                          MOMENTS_BF16)
            return
    _adamw_tensor(p_ptr, g_ptr, m_ptr, v_ptr, COPY_PTRS, t, offs, n, full, scale, lr, beta1, beta2, eps,
                  weight_decay, bias_correction1, bias_correction2_sqrt, key, HAS_COPIES, ALIGNED, MOMENTS_BF16)


@triton.jit
def _adamw_count_kernel(
    STEP_PTRS,  # (T,) int64 addresses of the fp32 step counts, advanced in place
    FOUND_INF_ptr,  # () fp32, nonzero: a skipped step keeps its counts; read when HAS_FOUND_INF
    HAS_FOUND_INF: tl.constexpr,
):
    """One program per tensor: its step count + 1, after the update read it. (A separate launch:
    inside the update kernel, the programs of one tensor would race on the count.)"""
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF_ptr) != 0:
            return
    step_ptr = tl.load(STEP_PTRS + tl.program_id(0)).to(tl.pointer_type(tl.float32), bitcast=True)
    tl.store(step_ptr, tl.load(step_ptr) + 1.0)


# -- launchers ------------------------------------------------------------------------------------

# Elements per program and warps, from a sweep of one Qwen2-0.5B step's update (494M parameters,
# 13.8 GB moved) on an H200 (benchmarks/optimizer.py --sweep): 1024 x 8 warps (4 elements per
# thread, one 16-byte vector of each stream) ran at 99% of the device copy rate, 4096 x 8 (the H100's
# first choice) at 77%, and 16384 x 4 spilled.
BLOCK = 1024
NUM_WARPS = 8


def check_launch(block: int, num_warps: int) -> None:
    if block < 128 or block & (block - 1) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"adamw: block must be a power of two >= 128 and num_warps one of 1, 2, 4, 8, 16, 32; "
                         f"got block={block}, num_warps={num_warps}")


def _addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(T,) int64 device tensor of the tensors' addresses, copied from pinned memory without a
    host sync (a plain .to(device) of CPU memory would wait for the GPU)."""
    host = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _check(tensors: list[torch.Tensor], numels: list[int], device: torch.device, what: str,
           dtype: torch.dtype = torch.float32) -> bool:
    """Raises unless every tensor is a contiguous `dtype` tensor of its parameter's size on `device`;
    returns whether all of them start on 16 bytes (the vectorised kernel)."""
    for t, n in zip(tensors, numels):
        if t.dtype != dtype or not t.is_contiguous() or t.device != device or t.numel() != n:
            short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
            raise ValueError(f"adamw_step_: {what} must be contiguous {short} tensors of their parameter's size ({n}) "
                             f"on {device}, got {t.dtype} {tuple(t.shape)} on {t.device} "
                             f"(contiguous={t.is_contiguous()}); use optimizer.implementation: torch for "
                             "other parameters (e.g. bf16 ones)")
    return all(t.data_ptr() % 16 == 0 for t in tensors)


class AdamWTables:
    """The device tables of one list of tensors: addresses of parameters, moments and step counts
    and the block table, built once; the gradients' addresses, checked and re-sent only when they
    change (the caching allocator usually hands every step's gradients the same memory)."""

    def __init__(self, params: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 steps: list[torch.Tensor], *, copies: list[torch.Tensor | None] | None = None, block: int = BLOCK,
                 num_warps: int = NUM_WARPS):
        check_launch(block, num_warps)
        device = params[0].device
        self.block, self.num_warps = block, num_warps  # the launch settings the block table is cut for
        numels = [t.numel() for t in params]
        if max(numels, default=0) >= 2**32:  # the stochastic rounding hashes 32-bit element indices
            raise ValueError(f"adamw_step_: a tensor of {max(numels)} elements; at most 2^32 - 1 per tensor")
        moment_dtype = exp_avgs[0].dtype if exp_avgs else torch.float32
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"adamw_step_: moments must be fp32 or bf16, got {moment_dtype}")
        self.moments_bf16 = moment_dtype == torch.bfloat16
        aligned = [_check(params, numels, device, "parameters"),
                   _check(exp_avgs, numels, device, "exp_avg", moment_dtype),
                   _check(exp_avg_sqs, numels, device, "exp_avg_sq", moment_dtype)]
        # bf16 copies of some parameters (`optimizer.bf16_weight_copy`), written by the update
        copies = copies if copies is not None and any(c is not None for c in copies) else None
        if copies is not None:
            if len(copies) != len(params):
                raise ValueError(f"adamw_step_: {len(copies)} weight copies for {len(params)} parameters (None: no copy)")
            present = [(c, n) for c, n in zip(copies, numels) if c is not None]
            aligned.append(_check([c for c, _ in present], [n for _, n in present], device, "weight copies",
                                  torch.bfloat16))
        self.aligned = all(aligned)  # and the gradients' (grads_aligned)
        self.copies = None
        if copies is not None:  # 0 for a parameter without one
            host = torch.tensor([c.data_ptr() if c is not None else 0 for c in copies], dtype=torch.int64)
            self.copies = host.to(device)
        self.device = device
        self.numel_list = numels
        self.params = _addresses(params, device)
        self.exp_avgs = _addresses(exp_avgs, device)
        self.exp_avg_sqs = _addresses(exp_avg_sqs, device)
        self.steps = _addresses(steps, device)
        self.numels = torch.tensor(numels, dtype=torch.int64).to(device)
        # (n_blocks,) each: every tensor cut into blocks of `block` elements, the last one partial
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        self.block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts).to(device)
        self.block_start = torch.cat([torch.arange(0, n, block, dtype=torch.int64) for n in numels]).to(device)
        self.n_blocks = int(counts.sum())
        self._grad_key: list[tuple[int, torch.dtype]] | None = None
        self.grads: torch.Tensor | None = None
        self.grad_bf16: torch.Tensor | None = None  # (T,) int32 flags; None: every gradient is fp32
        self.grads_aligned = False

    def grad_addresses(self, grads: list[torch.Tensor]) -> torch.Tensor:
        key = [(g.data_ptr(), g.dtype) for g in grads]
        if key != self._grad_key:
            if len(grads) != len(self.numel_list):
                raise ValueError(f"adamw_step_: {len(grads)} gradients for {len(self.numel_list)} parameters")
            bf16 = [g.dtype == torch.bfloat16 for g in grads]
            aligned = [_check([g for g, b in zip(grads, bf16) if b == is_bf16],
                              [n for n, b in zip(self.numel_list, bf16) if b == is_bf16], self.device, "gradients",
                              torch.bfloat16 if is_bf16 else torch.float32) for is_bf16 in (False, True)]
            self.grads_aligned = all(aligned)
            self.grad_bf16 = None
            if any(bf16):
                self.grad_bf16 = torch.tensor(bf16, dtype=torch.int32).to(self.device)
            self.grads, self._grad_key = _addresses(grads, self.device), key
        return self.grads


def adamw_step_(
    tables: AdamWTables,
    grads: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW update of the tensors in `tables`, their step counts included, in place and
    without a host sync."""
    grad_table = tables.grad_addresses(grads)
    dummy = tables.numels  # any device tensor: an unread pointer argument
    if tables.n_blocks:  # none when every tensor is empty (an FSDP2 rank can hold no elements of a small one)
        _adamw_kernel[(tables.n_blocks,)](
            tables.params, grad_table, tables.grad_bf16 if tables.grad_bf16 is not None else dummy,
            tables.exp_avgs, tables.exp_avg_sqs, tables.steps,
            tables.copies if tables.copies is not None else dummy,
            tables.numels, tables.block_tensor, tables.block_start,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ALIGNED=tables.aligned and tables.grads_aligned, MOMENTS_BF16=tables.moments_bf16,
            HAS_COPIES=tables.copies is not None, HAS_BF16_GRADS=tables.grad_bf16 is not None, BLOCK=tables.block,
            num_warps=tables.num_warps,
        )  # fmt: skip
    _adamw_count_kernel[(len(tables.numel_list),)](
        tables.steps, found_inf if found_inf is not None else dummy, HAS_FOUND_INF=found_inf is not None, num_warps=1
    )
