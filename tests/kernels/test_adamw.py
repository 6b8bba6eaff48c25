"""The Triton AdamW (`TritonAdamW`, kernels/adamw.py) against torch.optim.AdamW: the same updates
over several steps, the clip coefficient applied in the update, the on-device skip, state dicts
that move between the two, and the errors for what it does not take."""

import math

import pytest
import torch

from kernels.adamw import BLOCK, AdamWTables, adamw_step_
from src.trainer.optimizer import TritonAdamW

from .helpers import DEVICE, needs_triton

pytestmark = needs_triton

# Odd sizes: a single element, a partial block, more than one block.
SHAPES = [(1,), (7, 33), (BLOCK + 5,), (3, 123)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def make_params() -> list[torch.Tensor]:
    return [torch.randn(s, device=DEVICE).requires_grad_(True) for s in SHAPES]


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def twins():
    ours = make_params()
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    return ours, theirs, TritonAdamW(groups(ours), **HYPER), torch.optim.AdamW(groups(theirs), foreach=True, **HYPER)


def set_grads(a: list[torch.Tensor], b: list[torch.Tensor], seed: int, scale_b: float = 1.0) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for p, q in zip(a, b):
        g = torch.randn(p.shape, device=DEVICE, generator=gen)
        p.grad, q.grad = g.clone(), g * scale_b


def step_both(ours, theirs, opt_a, opt_b, seed: int, scale_b: float = 1.0) -> None:
    """Fresh gradients (torch's multiplied by scale_b), then one step of each optimizer."""
    set_grads(ours, theirs, seed, scale_b)
    opt_a.step()
    opt_b.step()


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor], opt_a, opt_b) -> None:
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"param {i}")
        sa, sb = opt_a.state[p], opt_b.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-7, msg=f"{key} {i}")  # torch lerps m
        assert float(sa["step"]) == float(sb["step"]), i


def test_matches_torch_adamw_over_steps():
    ours, theirs, opt_a, opt_b = twins()
    for step in range(4):
        step_both(ours, theirs, opt_a, opt_b, seed=step)
        assert_same(ours, theirs, opt_a, opt_b)
    assert opt_a.state[ours[0]]["step"].dtype == torch.float32


def test_grad_scale_is_the_clip_coefficient_applied_in_the_update():
    ours, theirs, opt_a, opt_b = twins()
    for step in range(3):
        coefficient = 0.25 + 0.25 * step
        opt_a.grad_scale = torch.tensor(coefficient, device=DEVICE)
        # torch gets the gradients clipped beforehand
        step_both(ours, theirs, opt_a, opt_b, seed=step, scale_b=coefficient)
        assert_same(ours, theirs, opt_a, opt_b)
    # the gradients themselves are read, never written
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    torch.testing.assert_close(ours[0].grad, torch.randn(SHAPES[0], device=DEVICE, generator=gen))


def test_found_inf_skips_everything_on_the_device():
    ours, theirs, opt_a, opt_b = twins()
    opt_a.found_inf = torch.zeros((), device=DEVICE)
    step_both(ours, theirs, opt_a, opt_b, seed=0)
    before = [p.detach().clone() for p in ours]
    states = [{k: v.clone() for k, v in opt_a.state[p].items()} for p in ours]
    set_grads(ours, theirs, seed=1)
    ours[1].grad[0, 0] = float("nan")  # what the trainer's non-finite norm reports
    opt_a.found_inf = torch.ones((), device=DEVICE)
    opt_a.step()
    for p, b, s in zip(ours, before, states):
        assert torch.equal(p.detach(), b)
        for key, value in s.items():
            assert torch.equal(opt_a.state[p][key], value), key
    # and the next finite step continues exactly as torch's would from the same point
    opt_a.found_inf = torch.zeros((), device=DEVICE)
    step_both(ours, theirs, opt_a, opt_b, seed=2)
    assert_same(ours, theirs, opt_a, opt_b)


def test_state_dicts_move_between_torch_and_triton_adamw():
    ours, theirs, opt_a, opt_b = twins()
    for step in range(2):
        step_both(ours, theirs, opt_a, opt_b, seed=step)
    # torch's state into ours (a checkpoint of the other implementation), and ours into torch's
    fresh_a = TritonAdamW(groups(ours), **HYPER)
    fresh_a.load_state_dict(opt_b.state_dict())
    fresh_b = torch.optim.AdamW(groups(theirs), foreach=True, **HYPER)
    fresh_b.load_state_dict(opt_a.state_dict())
    step_both(ours, theirs, fresh_a, fresh_b, seed=5)
    assert_same(ours, theirs, fresh_a, fresh_b)


def test_a_parameter_without_gradient_is_left_alone():
    ours, theirs, opt_a, opt_b = twins()
    for step in range(3):
        set_grads(ours, theirs, seed=step)
        if step == 1:  # e.g. an unused parameter in this step
            ours[2].grad, theirs[2].grad = None, None
        opt_a.step()
        opt_b.step()
        assert_same(ours, theirs, opt_a, opt_b)


def test_tensors_at_odd_offsets_take_the_unvectorised_kernel():
    """Views into flat buffers that do not start on 16 bytes (as FSDP2 can hand out gradients):
    the same updates as torch's, through the kernel without the alignment hint."""
    flat = [torch.randn(sum(math.prod(s) for s in SHAPES) + 1, device=DEVICE) for _ in range(2)]

    def views(buffer):
        out, offset = [], 1  # 4 bytes in: not a multiple of 16
        for shape in SHAPES:
            n = math.prod(shape)
            out.append(buffer[offset:offset + n].view(shape))
            offset += n
        return out

    ours = [v.requires_grad_(True) for v in views(flat[0].clone())]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt_a, opt_b = TritonAdamW(groups(ours), **HYPER), torch.optim.AdamW(groups(theirs), foreach=True, **HYPER)
    for step in range(3):
        set_grads(ours, theirs, seed=step)
        for p, g in zip(ours, views(flat[1])):  # gradients at odd offsets as well
            g.copy_(p.grad)
            p.grad = g
        opt_a.step()
        opt_b.step()
        assert_same(ours, theirs, opt_a, opt_b)
    tables = opt_a._tables[0][3]
    assert not (tables.aligned and tables.grads_aligned)


def test_empty_tensors_count_their_steps_and_move_nothing():
    """An FSDP2 rank can hold no elements of a small parameter: its local shard is empty. The
    update skips it (and its launch when the whole group is empty); the step count advances as
    torch's does."""
    ours = [torch.empty(0, device=DEVICE).requires_grad_(True), torch.randn(5, device=DEVICE).requires_grad_(True),
            torch.empty(0, 3, device=DEVICE).requires_grad_(True)]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt_a = TritonAdamW([{"params": ours[:2]}, {"params": ours[2:]}], **HYPER)  # the second group: all empty
    opt_b = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:]}], foreach=True, **HYPER)
    for step in range(2):
        set_grads(ours, theirs, seed=step)
        opt_a.step()
        opt_b.step()
        assert_same(ours, theirs, opt_a, opt_b)
    assert opt_a._tables[1][3].n_blocks == 0


def test_what_it_does_not_take_is_refused():
    p = torch.randn(8, device=DEVICE, dtype=torch.bfloat16).requires_grad_(True)
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="contiguous fp32"):
        TritonAdamW([p], **HYPER).step()
    q = torch.randn(8, device=DEVICE).requires_grad_(True)
    q.grad = torch.randn(16, device=DEVICE)[::2]  # a strided gradient
    with pytest.raises(ValueError, match="gradients must be contiguous fp32"):
        TritonAdamW([q], **HYPER).step()
    with pytest.raises(ValueError, match="amsgrad"):
        TritonAdamW([{"params": [q], "amsgrad": True}], **HYPER).step()
    with pytest.raises(ValueError, match="closure"):
        TritonAdamW([q], **HYPER).step(lambda: 0.0)


@pytest.mark.parametrize("block, num_warps", [(128, 1), (4096, 8), (2048, 16)])
def test_other_launch_settings_give_the_same_update(block, num_warps):
    """The block table is cut for the tables' own block size (what benchmarks/optimizer.py sweeps)."""
    params = make_params()
    theirs = [p.detach().clone().requires_grad_(True) for p in params]
    set_grads(params, theirs, seed=3)
    opt_b = torch.optim.AdamW([{"params": theirs, "weight_decay": 0.1}], foreach=True, **HYPER)
    opt_b.step()
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    tables = AdamWTables([p.detach() for p in params], [m for m, _ in moments], [v for _, v in moments], steps,
                         block=block, num_warps=num_warps)
    assert tables.n_blocks == sum(-(-p.numel() // block) for p in params)
    adamw_step_(tables, [p.grad for p in params], lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=HYPER["eps"],
                weight_decay=0.1)
    for p, q, (m, v), step in zip(params, theirs, moments, steps):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, opt_b.state[q]["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v, opt_b.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-7)
        assert float(step) == 1.0


@pytest.mark.parametrize("block, num_warps", [(1000, 8), (64, 1), (1024, 3)])
def test_bad_launch_settings_are_refused(block, num_warps):
    p = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="power of two >= 128"):
        AdamWTables([p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros((), device=DEVICE)],
                    block=block, num_warps=num_warps)


def test_triton_adamw_refuses_bad_launch_settings_when_built():
    with pytest.raises(ValueError, match="power of two >= 128"):
        TritonAdamW(make_params(), block=3000, **HYPER)
    opt = TritonAdamW(groups(make_params()), block=256, num_warps=2, **HYPER)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt._tables[0][3].block == 256 and opt._tables[0][3].num_warps == 2


# -- bf16 moments (optimizer.state_dtype: bfloat16) ------------------------------------------------


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values at or below and at or above each fp32 value of x (by magnitude: truncation
    of the low 16 bits, and the next bf16 away from zero)."""
    bits = x.float().view(torch.int32)
    low = (bits & ~0xFFFF).view(torch.float32)
    high = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    return low, torch.where(bits & 0xFFFF == 0, low, high)


def bf16_tables(params, moments, steps):
    return AdamWTables(params, [m for m, _ in moments], [v for _, v in moments], steps)


def test_bf16_moments_store_a_bf16_neighbour_of_the_fp32_update():
    """One update from bf16 moments: the weights are the fp32 update from those moments, and each
    stored moment is one of the two bf16 values around the fp32 moment it computed."""
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE) for s in SHAPES]
    grads = [torch.randn_like(p) for p in params]
    moments = [(torch.randn_like(p).to(torch.bfloat16), torch.rand_like(p).to(torch.bfloat16)) for p in params]
    steps = [torch.full((), 4.0, device=DEVICE) for _ in params]
    expected_p, expected_m, expected_v = [], [], []
    for p, g, (m, v) in zip(params, grads, moments):  # the update in fp32, as the kernel's docstring writes it
        m1, v1 = 0.9 * m.float() + 0.1 * g, 0.95 * v.float() + 0.05 * g * g
        p1 = p * (1 - HYPER["lr"] * 0.1) - HYPER["lr"] / (1 - 0.9**5) * m1 / (v1.sqrt() / math.sqrt(1 - 0.95**5) + 1e-8)
        expected_p.append(p1), expected_m.append(m1), expected_v.append(v1)
    adamw_step_(bf16_tables(params, moments, steps), grads, lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.1)
    for i, (p, (m, v)) in enumerate(zip(params, moments)):
        torch.testing.assert_close(p, expected_p[i], rtol=1e-5, atol=1e-6, msg=f"param {i}")
        for stored, fp32 in ((m, expected_m[i]), (v, expected_v[i])):
            assert stored.dtype == torch.bfloat16
            low, high = bf16_neighbours(fp32)
            # by magnitude: the low neighbour is the truncation towards zero
            lo, hi = torch.minimum(low, high), torch.maximum(low, high)
            assert ((stored.float() >= lo) & (stored.float() <= hi)).all(), i
        assert float(steps[i]) == 5.0


def test_bf16_moments_decay_where_round_to_nearest_would_stick():
    """With beta = 0.999 each step changes a moment by 0.1%, under half a bf16 step: rounded to
    nearest, m * 0.999 is m again and the moments never decay. Stochastic rounding keeps their
    mean on the fp32 value: 0.999^300 = 0.7407."""
    n, steps_run = 4096, 300
    p = torch.zeros(n, device=DEVICE)
    m = torch.ones(n, device=DEVICE, dtype=torch.bfloat16)
    v = torch.ones(n, device=DEVICE, dtype=torch.bfloat16)
    step = torch.zeros((), device=DEVICE)  # kept alive: the tables hold its address only
    tables = bf16_tables([p], [(m, v)], [step])
    zero = torch.zeros(n, device=DEVICE)
    assert torch.equal((m * 0.999).to(torch.bfloat16), m)  # what round to nearest would store
    for _ in range(steps_run):
        adamw_step_(tables, [zero], lr=1e-3, beta1=0.999, beta2=0.999, eps=1e-8, weight_decay=0.0)
    for moment in (m, v):
        # the mean of 4096 draws, each off the fp32 value by at most one bf16 step (0.4%): well within 0.3%
        assert float(moment.float().mean()) == pytest.approx(0.999**steps_run, rel=3e-3)
        assert moment.unique().numel() > 1  # rounded both ways


def test_bf16_moments_round_the_same_way_for_the_same_step_and_otherwise_differently():
    """The random bits come from (tensor, element, step count): a replayed step (a resumed run)
    stores the same moments, another step count other roundings."""
    torch.manual_seed(1)
    p0, g = torch.randn(3000, device=DEVICE), torch.randn(3000, device=DEVICE)
    m0 = torch.randn(3000, device=DEVICE).to(torch.bfloat16)
    v0 = torch.rand(3000, device=DEVICE).to(torch.bfloat16)
    results = []
    for count in (7.0, 7.0, 8.0):
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        step = torch.full((), count, device=DEVICE)  # kept alive: the tables hold its address only
        adamw_step_(bf16_tables([p], [(m, v)], [step]), [g], lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                    weight_decay=0.0)
        results.append((m, v))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


def test_bf16_state_trains_like_fp32_state_and_its_state_dict_loads_into_either():
    """TritonAdamW(state_dtype=bfloat16) over steps follows the fp32-state optimizer closely; its
    state dict (bf16 moments) loads into an fp32-state optimizer and the other way round, each
    cast to the loading optimizer's dtype."""
    ours = make_params()
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    opt_bf16 = TritonAdamW(groups(ours), state_dtype=torch.bfloat16, **HYPER)
    opt_fp32 = TritonAdamW(groups(theirs), **HYPER)
    for step in range(5):
        step_both(ours, theirs, opt_bf16, opt_fp32, seed=step)
    for p, q in zip(ours, theirs):
        assert opt_bf16.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=2e-4)  # 5 steps of lr 3e-3
    to_fp32 = TritonAdamW(groups(ours), **HYPER)
    to_fp32.load_state_dict(opt_bf16.state_dict())
    to_bf16 = TritonAdamW(groups(theirs), state_dtype=torch.bfloat16, **HYPER)
    to_bf16.load_state_dict(opt_fp32.state_dict())
    for p, q in zip(ours, theirs):
        assert to_fp32.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(to_fp32.state[p]["exp_avg"], opt_bf16.state[p]["exp_avg"].float())  # exact: a widening
        assert to_bf16.state[q]["exp_avg_sq"].dtype == torch.bfloat16
    step_both(ours, theirs, to_fp32, to_bf16, seed=9)  # both step from the loaded state


def test_bf16_state_errors_name_the_problem():
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16"):
        TritonAdamW(make_params(), state_dtype=torch.float16, **HYPER)
    p = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="moments must be fp32 or bf16"):
        AdamWTables([p], [p.half()], [p.half()], [torch.zeros((), device=DEVICE)])
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous bf16"):  # mixed moment dtypes
        AdamWTables([p], [p.bfloat16()], [p.clone()], [torch.zeros((), device=DEVICE)])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_weight_copies_are_the_updated_weights_rounded_to_bf16(state_dtype):
    """optimizer.bf16_weight_copy: the update writes the listed parameters' bf16 copies, bit for
    bit `p.to(bfloat16)` (round to nearest, ties to even), on full and partial blocks; the
    parameters themselves update exactly as without copies, and unlisted ones get none."""
    plain = make_params()
    ours = [p.detach().clone().requires_grad_(True) for p in plain]
    copies = {p: torch.zeros(p.shape, dtype=torch.bfloat16, device=DEVICE) for p in ours[1:]}  # not the first
    opt_plain = TritonAdamW(groups(plain), state_dtype=state_dtype, **HYPER)
    opt_ours = TritonAdamW(groups(ours), state_dtype=state_dtype, weight_copies=copies, **HYPER)
    for step in range(3):
        set_grads(plain, ours, seed=step)
        opt_plain.step()
        opt_ours.step()
        for i, (p, q) in enumerate(zip(plain, ours)):
            assert torch.equal(p, q), i
        for p, copy in copies.items():
            assert torch.equal(copy, p.detach().to(torch.bfloat16))


def test_weight_copies_round_ties_to_even_and_keep_specials():
    """Values exactly between two bf16 numbers, and inf / NaN, through a zero-learning-rate update
    (p unchanged)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0xBF818001, 0x7F800000, 0x7FC00000, 0x7F7FFFFF],
                        dtype=torch.int64).to(torch.int32)
    p = bits.view(torch.float32).to(DEVICE).requires_grad_(True)
    p.grad = torch.zeros_like(p)
    copy = torch.zeros(p.shape, dtype=torch.bfloat16, device=DEVICE)
    TritonAdamW([p], lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_copies={p: copy}).step()
    expected = p.detach().to(torch.bfloat16)
    assert torch.equal(copy[:5], expected[:5]) and torch.isnan(copy[5]) and torch.equal(copy[6:], expected[6:])


def test_weight_copies_that_do_not_fit_are_refused():
    p = torch.randn(8, device=DEVICE).requires_grad_(True)
    p.grad = torch.randn_like(p)
    for bad in (torch.zeros(8, device=DEVICE), torch.zeros(9, dtype=torch.bfloat16, device=DEVICE)):
        with pytest.raises(ValueError, match="weight copies must be contiguous bf16"):
            TritonAdamW([p], weight_copies={p: bad}, **HYPER).step()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gradients_update_as_their_fp32_values(state_dtype):
    """optimizer.bf16_grads: the gradients of some parameters are bf16, read from their copies'
    `.grad` (`gradient_copies`), in the same launch as the fp32 ones. The update is the one of the
    same values in fp32, bit for bit, with the clip coefficient and the weight copies written; the
    parameters' own `.grad` is not read."""
    plain = make_params()
    ours = [p.detach().clone().requires_grad_(True) for p in plain]
    copies = {p: p.detach().to(torch.bfloat16).requires_grad_(True) for p in ours[1:]}  # not the first
    opt_plain = TritonAdamW(groups(plain), state_dtype=state_dtype, **HYPER)
    opt_ours = TritonAdamW(groups(ours), state_dtype=state_dtype, weight_copies=copies, gradient_copies=copies,
                           **HYPER)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for step in range(3):
        for p, q in zip(plain, ours):
            g = torch.randn(p.shape, device=DEVICE, generator=gen).to(torch.bfloat16)
            p.grad = g.float()
            if q in copies:
                copies[q].grad = g
                q.grad = torch.full_like(q, float("nan"))  # must not be read
            else:
                q.grad = g.float()
        scale = torch.tensor(0.5 + step, device=DEVICE).clamp(max=1.0)
        opt_plain.grad_scale = opt_ours.grad_scale = scale
        opt_plain.step()
        opt_ours.step()
        for i, (p, q) in enumerate(zip(plain, ours)):
            if DEVICE == "cpu":
                assert torch.equal(p, q), i
            else:  # the GPU compiler may contract the update's multiply-adds differently per load type
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=str(i))
        for p, copy in copies.items():
            assert torch.equal(copy.detach(), p.detach().to(torch.bfloat16))
    opt_ours.zero_grad()
    assert all(copy.grad is None for copy in copies.values())


def test_bf16_gradients_that_do_not_fit_are_refused():
    p = torch.randn(8, device=DEVICE).requires_grad_(True)
    copy = torch.zeros(8, dtype=torch.bfloat16, device=DEVICE).requires_grad_(True)
    copy.grad = torch.zeros(16, dtype=torch.bfloat16, device=DEVICE)[::2]  # not contiguous
    with pytest.raises(ValueError, match="gradients must be contiguous bf16"):
        TritonAdamW([p], weight_copies={p: copy}, gradient_copies={p: copy}, **HYPER).step()
