"""PyTorch's saved-tensor-hook tests, run against ``offload_saved_tensors`` and a real daemon.

Each test ports a case of ``test/test_autograd.py`` in pytorch/pytorch (named in its
first comment) from torch's own ``saved_tensors_hooks`` / ``save_on_cpu`` to STORM's
hooks, which offload every saved tensor to the pool (``min_bytes=0``). What the original
asserts stays asserted: values of unpacked tensors, gradients (``torch.equal`` against the
same computation without hooks, where the original compares approximately), how often
pack ran (``OffloadStats.packed_tensors``) and which errors come out. Where STORM's hooks
nest with the user's own, the innermost hooks win, as torch guarantees. Throughout, the
pool is checked to be empty again once every graph that saved into it is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.autograd.graph import disable_saved_tensors_hooks, saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from client import OffloadStats, PoolFullError, StormError, StormSystem, offload_saved_tensors


@pytest.fixture
def system(daemon):
    with StormSystem(daemon.endpoint) as system:
        yield system


def _offload(system: StormSystem) -> contextlib.AbstractContextManager:
    """STORM's hooks with no size floor: every saved plain tensor goes to the pool."""
    return offload_saved_tensors(system, min_bytes=0)


def _pool_used_bytes(system: StormSystem) -> int:
    """Bytes this session holds in the pool once queued frees are done.

    No ``gc.collect()``: a dropped graph must give its extents back by reference
    counting alone, not when the cyclic collector next happens to run.
    """
    system.flush()
    return system.stats().used_bytes


def _grads_without_hooks(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of ``loss_fn`` for fresh leaf copies of ``inputs``, computed with no hooks."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    loss_fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


@contextlib.contextmanager
def _counting_packs() -> Iterator[list[int]]:
    """Torch's own identity hooks that count packs: how often any pack hook runs in the block."""
    packs = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packs[0] += 1
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        yield packs


def _hooks_enabled() -> bool:
    return torch._C._autograd._saved_tensors_hooks_is_enabled()


# -- values, sizes, strides and dtypes of unpacked tensors ------------------------------


def test_saved_inputs_unpack_equal_in_value_size_stride_and_dtype(system):
    # Port of test_graph_save_on_cpu (dense cases) and of
    # test_saved_variable_packing_unpacking_saved_original_with_default_hooks.
    inputs = {
        "float32": torch.randn(5, 8),
        "float64": torch.randn(5, 8, dtype=torch.float64),
        "bfloat16": torch.randn(5, 8, dtype=torch.bfloat16),
        "transposed": torch.randn(8, 5).t(),  # (5, 8), strides (1, 5)
        "sliced": torch.randn(5, 16)[:, 3:11],  # (5, 8), offset 3, strides (16, 1)
    }
    for name, a in inputs.items():
        a.requires_grad_()
        with _offload(system) as moved:
            y = a * a
        for saved in (y.grad_fn._saved_self, y.grad_fn._saved_other):
            assert torch.equal(saved, a), name
            assert (saved.shape, saved.stride(), saved.dtype) == (a.shape, a.stride(), a.dtype), name
        assert moved.packed_tensors == 2, name  # a is saved twice, as self and as other
        y.sum().backward()
        assert torch.equal(a.grad, 2 * a.detach()), name


def test_conjugate_and_negative_views_unpack_to_their_values(system):
    # Extends test_graph_save_on_cpu's dtype checks to complex tensors whose conjugate or
    # negative bit is set: the saved tensor is a lazy view with that bit, not a copy.
    torch.manual_seed(0)
    a = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    v = torch.randn(6, requires_grad=True)

    def loss_fn(a, w, v):
        conj = a.conj()  # (6,) complex, conjugate bit set
        neg = conj.imag  # (6,) real, negative bit set
        return (conj * w).abs().sum() + (neg * v).sum()

    with _offload(system) as moved:
        conj = a.conj()
        neg = conj.imag
        by_conj = conj * w
        by_neg = neg * v
    assert conj.is_conj() and neg.is_neg()
    assert torch.equal(by_conj.grad_fn._saved_self, conj)
    assert torch.equal(by_neg.grad_fn._saved_self, neg)
    assert moved.packed_tensors == 4
    (by_conj.abs().sum() + by_neg.sum()).backward()
    for ours, want in zip((a.grad, w.grad, v.grad), _grads_without_hooks(loss_fn, a, w, v), strict=True):
        assert torch.equal(ours, want)


def test_sparse_saved_tensors_stay_with_autograd(system):
    # Port of test_graph_save_on_cpu (sparse case): a sparse tensor is not a plain strided
    # one, so STORM's pack leaves it where it is; backward still gets its value.
    x = torch.sparse_coo_tensor(
        torch.tensor([[1, 1]]), torch.tensor([1.0, 1.0]), (2,), requires_grad=True, check_invariants=True
    )
    with _offload(system) as moved:
        y = x * x
    assert torch.equal(y.grad_fn._saved_self.to_dense(), x.detach().to_dense())
    assert (moved.packed_tensors, moved.skipped_tensors) == (0, 2)
    y.to_dense().sum().backward()
    assert torch.equal(x.grad.to_dense(), torch.tensor([0.0, 4.0]))  # 2 * x, x = [0, 2] once coalesced
    assert _pool_used_bytes(system) == 0


def test_saved_output_unpacks_equal_with_the_node_that_saved_it(system):
    # Port of test_saved_variable_packing_unpacking_did_not_save_original_with_default_hooks
    # and _with_hooks (exp saves its output), and of
    # test_pack_hook_with_inplace_modification_should_fail: STORM's pack changes nothing
    # in place, so torch has nothing to refuse and no version moves.
    a = torch.randn(5, requires_grad=True)
    a_orig = a.detach().clone()
    with _offload(system) as moved:
        y = torch.exp(a)
    assert (a._version, y._version) == (0, 0) and torch.equal(a, a_orig)
    saved = y.grad_fn._saved_result
    assert torch.equal(saved, y) and saved is not y
    assert saved.grad_fn is y.grad_fn
    assert moved.packed_tensors == 1
    y.sum().backward()
    assert torch.equal(a.grad, y.detach())


def test_views_of_one_storage_unpack_with_their_own_geometry(system):
    # Port of test_graph_save_on_cpu to saved views: slices at different offsets of one
    # storage and a transpose, each compared with the view autograd saved.
    torch.manual_seed(1)
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)

    def loss_fn(x, w):
        y = x * 2  # (32, 64)
        return (y[:, :32] * y[:, 32:]).sum() + (y.t() @ w).sum()

    with _offload(system) as moved:
        y = x * 2  # (32, 64)
        left, right = y[:, :32], y[:, 32:]  # (32, 32) each, offsets 0 and 32
        prod = left * right
        mm = y.t() @ w  # (64, 16)
    saved_views = [
        (prod.grad_fn._saved_self, left),
        (prod.grad_fn._saved_other, right),
        (mm.grad_fn._saved_self, y.t()),
    ]
    for saved, view in saved_views:
        assert torch.equal(saved, view)
        assert (saved.shape, saved.stride()) == (view.shape, view.stride())
    assert moved.packed_tensors == 4  # left, right, y.t() and w
    (prod.sum() + mm.sum()).backward()
    for ours, want in zip((x.grad, w.grad), _grads_without_hooks(loss_fn, x, w), strict=True):
        assert torch.equal(ours, want)


# -- how often pack and unpack run ------------------------------------------------------


def test_pack_runs_once_per_saved_tensor_and_not_after_the_block(system):
    # Port of test_saved_variable_packing_unpacking_saved_original_with_default_hooks
    # (a * a packs twice; "exited hooks correctly") and of test_no_unnecessary_unwrapping
    # (without hooks autograd keeps a leaf itself).
    a = torch.ones(5, requires_grad=True)
    with _offload(system) as moved:
        y = a * a
        assert moved.packed_tensors == 2
    z = a * a
    assert moved.packed_tensors == 2
    assert z.grad_fn._saved_self is a
    (y.sum() + z.sum()).backward()
    assert torch.equal(a.grad, torch.full((5,), 4.0))


def test_unpack_runs_in_backward_only_once_per_saved_tensor(system):
    # Port of test_unpack_hooks_exec_count: x * y saves only y (x's gradient needs it, y
    # needs none); nothing is fetched back before backward, once during it.
    x = torch.ones(4, requires_grad=True)
    y = torch.ones(4)
    with _offload(system) as moved:
        out = x * y
        assert moved.packed_tensors == 1
        assert system.stats().fetched_tensors == 0
        out.sum().backward()
    assert moved.packed_tensors == 1
    assert system.stats().fetched_tensors == 1
    assert torch.equal(x.grad, torch.ones(4))


def test_wrapped_numbers_are_never_packed(system):
    # Port of test_wrapped_number_saved_tensors_hooks: the 3 of a * 3 is saved as a wrapped
    # number, which autograd keeps out of the hooks.
    a = torch.randn(5, requires_grad=True)
    with _offload(system) as moved:
        out = (a * 3).sum()
        (grad,) = torch.autograd.grad(out, (a,))
    assert (moved.packed_tensors, moved.skipped_tensors) == (0, 0)
    assert torch.equal(grad, torch.full((5,), 3.0))
    assert _pool_used_bytes(system) == 0


def test_saved_tensors_are_equal_copies_released_after_backward(system):
    # Port of test_no_unnecessary_unwrapping: without hooks autograd hands back a and b
    # themselves; through the pool they come back as equal copies, gone after backward.
    a = torch.randn(5, requires_grad=True)
    a_orig = a.detach().clone()
    with _offload(system):
        b = a * a
        c = a * b
        d = torch.exp(a)
    assert b.grad_fn._saved_self is not a
    assert torch.equal(b.grad_fn._saved_self, a) and torch.equal(b.grad_fn._saved_other, a)
    assert torch.equal(c.grad_fn._saved_self, a)
    assert torch.equal(c.grad_fn._saved_other, b)
    assert torch.equal(d.grad_fn._saved_result, d)
    c.sum().backward()
    with pytest.raises(RuntimeError, match="after they have already been freed"):
        _ = c.grad_fn._saved_self
    assert torch.equal(a, a_orig)
    del b, c, d  # d's graph never ran backward
    assert _pool_used_bytes(system) == 0


# -- nesting: the innermost hooks win ---------------------------------------------------


def test_offload_nested_in_offload_packs_with_the_inner_block(system):
    # Port of test_setting_default_saved_variable_hooks_twice_should_not_fail (and
    # _should_use_inner, with STORM's hooks on both sides).
    a = torch.randn(5, requires_grad=True)
    with _offload(system) as outer:
        with _offload(system) as inner:
            y = a * a
        z = torch.exp(a)
    assert (outer.packed_tensors, inner.packed_tensors) == (1, 2)
    (y.sum() + z.sum()).backward()
    (want,) = _grads_without_hooks(lambda a: (a * a).sum() + torch.exp(a).sum(), a)
    assert torch.equal(a.grad, want)


def test_user_hooks_inside_offload_win_for_their_block(system):
    # Port of test_setting_default_saved_variable_hooks_twice_should_use_inner, with STORM
    # outside and the user's 5x hooks inside.
    with _offload(system) as moved:
        b = torch.randn(5, requires_grad=True)
        with saved_tensors_hooks(lambda x: 5 * x, lambda x: 5 * x):
            a = torch.randn(5, requires_grad=True)
            y = a * a
        z = b * b
    assert moved.packed_tensors == 2  # b twice; a went to the user's hooks
    y.sum().backward()
    z.sum().backward()
    assert torch.equal(a.grad, 2 * (5 * (5 * a.detach())))
    assert torch.equal(b.grad, 2 * b.detach())


def test_offload_inside_user_hooks_wins_for_its_block(system):
    # Port of test_setting_default_saved_variable_hooks_twice_should_use_inner, with the
    # user's 3x hooks outside and STORM inside; the user's hooks are back once STORM's exit.
    with saved_tensors_hooks(lambda x: 3 * x, lambda x: 3 * x):
        b = torch.randn(5, requires_grad=True)
        with _offload(system) as moved:
            a = torch.randn(5, requires_grad=True)
            y = a * a
        z = b * b
    assert moved.packed_tensors == 2
    y.sum().backward()
    z.sum().backward()
    assert torch.equal(a.grad, 2 * a.detach())
    assert torch.equal(b.grad, 2 * (3 * (3 * b.detach())))


def test_register_hooks_on_an_offloaded_saved_tensor_is_refused(system):
    # "Hooks set twice": port of the register_hooks checks of
    # test_saved_variable_packing_unpacking_saved_original_with_hooks. A saved tensor that
    # STORM packed already has its pair of hooks; torch allows one pair.
    a = torch.randn(5, requires_grad=True)
    with _offload(system):
        y = a * a
    with pytest.raises(RuntimeError, match="hooks have already been set"):
        y.grad_fn._raw_saved_self.register_hooks(lambda x: x, lambda x: x)
    y.sum().backward()
    assert torch.equal(a.grad, 2 * a.detach())


def test_offload_around_and_inside_checkpoint_gives_the_same_gradients(system):
    # Port of test_save_on_cpu_and_checkpoint: non-reentrant checkpoint is itself a pair of
    # saved-tensor hooks; inside its region its hooks win, inside STORM's block STORM's do,
    # and checkpoint's recomputation enters STORM's block again in backward.
    a = torch.randn(2, 2, requires_grad=True)
    a.pow(2).pow(2).pow(2).pow(2).sum().backward()
    want = a.grad
    a.grad = None

    with _offload(system) as around:
        h = a.pow(2)
        h = checkpoint(lambda x: x.pow(2).pow(2), h, use_reentrant=False)
        c = h.pow(2)
    c.sum().backward()
    assert around.packed_tensors > 0
    assert torch.equal(a.grad, want)
    a.grad = None

    inside: list[OffloadStats] = []

    def f(a):
        h = a.pow(2)
        with _offload(system) as moved:
            h = h.pow(2).pow(2)
        inside.append(moved)
        return h.pow(2)

    d = checkpoint(f, a, use_reentrant=False)
    d.sum().backward()
    assert len(inside) == 2 and all(moved.packed_tensors == 2 for moved in inside)  # forward, then recomputation
    assert torch.equal(a.grad, want)
    del c, d
    assert _pool_used_bytes(system) == 0


# -- double backward and retain_graph -----------------------------------------------------


def test_double_backward_through_offloaded_tensors_equals_no_offload(system):
    # Port of test_default_saved_tensors_hooks_double_backward: its factors 2, 4 and 8 count
    # one pack in forward (a ** 3 saves a) and two in the create_graph backward (pow's
    # backward saves grad and a).
    torch.manual_seed(2)
    base = torch.randn(5)
    ref = base.clone().requires_grad_()
    (ref_g,) = torch.autograd.grad(torch.sum(ref**3), (ref,), create_graph=True)
    ref_g.sum().backward()

    def offload_if(on: bool) -> contextlib.AbstractContextManager:
        return _offload(system) if on else contextlib.nullcontext()

    cases = {"forward": (True, False, 1), "create-graph backward": (False, True, 2), "both": (True, True, 3)}
    for name, (forward_offloaded, backward_offloaded, packs) in cases.items():
        a = base.clone().requires_grad_()
        with offload_if(forward_offloaded) as forward_moved:
            s = torch.sum(a**3)
        with offload_if(backward_offloaded) as backward_moved:
            (g,) = torch.autograd.grad(s, (a,), create_graph=True)
            g.sum().backward()
        moved = [m for m in (forward_moved, backward_moved) if m is not None]
        assert sum(m.packed_tensors for m in moved) == packs, name
        assert torch.equal(g.detach(), ref_g.detach()), name
        assert torch.equal(a.grad, ref.grad), name
        del s, g
        assert _pool_used_bytes(system) == 0, name


def test_gradient_penalty_on_tanh_mlp_equals_no_offload(system):
    # Double backward on a real model: the loss adds a gradient penalty on the input, so
    # backward runs through the graph of a create_graph backward, both offloaded.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(16, 12)

    def penalised_loss(x: torch.Tensor) -> torch.Tensor:
        out = model(x)  # (16, 1)
        (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)  # (16, 12)
        return out.mean() + ((dx.norm(2, dim=1) - 1) ** 2).mean()

    x_ref = x.clone().requires_grad_()
    with _counting_packs() as packs:
        loss_ref = penalised_loss(x_ref)
    loss_ref.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    x_ours = x.clone().requires_grad_()
    with _offload(system) as moved:
        loss = penalised_loss(x_ours)
    assert moved.packed_tensors > 0
    assert moved.packed_tensors + moved.skipped_tensors == packs[0]  # the parameters are skipped
    assert _pool_used_bytes(system) > 0
    loss.backward()
    for (name, p), w in zip(model.named_parameters(), want, strict=True):
        assert torch.equal(p.grad, w), name
    assert torch.equal(x_ours.grad, x_ref.grad)
    del loss
    assert _pool_used_bytes(system) == 0


def test_retain_graph_backward_twice_gives_identical_gradients_then_frees_the_pool(system):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    x = torch.randn(32, 16)
    model(x).pow(2).mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with _offload(system):
        loss = model(x).pow(2).mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert _pool_used_bytes(system) > 0  # the retained graph still reads its saved tensors
    loss.backward()
    second = [p.grad.clone() for p in model.parameters()]
    for name, f, s, w in zip((n for n, _ in model.named_parameters()), first, second, want, strict=True):
        assert torch.equal(f, w) and torch.equal(s, w), name
    assert _pool_used_bytes(system) == 0  # a backward without retain_graph releases what it read
    del loss
    assert _pool_used_bytes(system) == 0


@pytest.mark.parametrize("unpacked_before", [False, True], ids=["untouched", "saved-tensors-read"])
def test_graph_dropped_without_backward_frees_the_pool(system, unpacked_before):
    x = torch.randn(64, 64, requires_grad=True)
    with _offload(system) as moved:
        h = x.exp()  # exp saves its output h
        out = torch.tanh(h * h.t())  # mul saves h and h.t(); tanh saves its output
    assert moved.packed_tensors == 4
    assert _pool_used_bytes(system) > 0
    if unpacked_before:
        assert torch.equal(out.grad_fn._saved_result, out)
        assert torch.equal(h.grad_fn._saved_result, h)
    del h, out
    assert _pool_used_bytes(system) == 0


# -- custom autograd.Function -------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_custom_function_with_python_scalar_gives_gradients_with_a_graph(system):
    # Port of test_function (_function_test): save_for_backward of two tensors, a Python
    # scalar kept on ctx, and a create_graph backward through the unpacked tensors.
    class MyFunction(Function):
        @staticmethod
        def forward(ctx, tensor1, pyscalar, tensor2):
            ctx.pyscalar = pyscalar
            ctx.save_for_backward(tensor1, tensor2)
            return tensor1 + pyscalar * tensor2 + tensor1 * tensor2

        @staticmethod
        def backward(ctx, grad_output):
            var1, var2 = ctx.saved_tensors
            assert isinstance(var1, torch.Tensor) and isinstance(var2, torch.Tensor)
            return grad_output + grad_output * var2, None, grad_output * ctx.pyscalar + grad_output * var1

    x = torch.randn(5, 5, requires_grad=True)
    y = torch.randn(5, 5, requires_grad=True)
    with _offload(system) as moved:
        result = MyFunction.apply(x, 2, y)
    assert moved.packed_tensors == 2
    go = torch.ones((), requires_grad=True)
    result.sum().backward(go, create_graph=True)
    assert torch.equal(x.grad, y.detach() + torch.ones(5, 5))
    assert torch.equal(y.grad, x.detach() + torch.ones(5, 5) * 2)
    assert x.grad.grad_fn is not None and y.grad.grad_fn is not None
    x.grad = y.grad = None  # their graphs hold the unpacked tensors
    del result
    assert _pool_used_bytes(system) == 0


def test_custom_function_with_non_tensor_inputs_and_outputs(system):
    # Port of test_custom_function_non_tensor_inputs_outputs: non-tensor values pass through
    # forward and ctx untouched; t3 is saved though it needs no gradient.
    class MyFunction(Function):
        @staticmethod
        def forward(ctx, t1, t2, scale, t3):
            t4 = t1 + t2 * t3
            t5 = t1 * t2 + t3
            t4 *= scale
            t5 *= scale
            ctx.scale = scale
            ctx.save_for_backward(t1, t2, t3)
            return scale, t4, None, True, t5, "bar", t1

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            assert len(grads) == 7
            assert grads[0] is None and grads[2] is None and grads[3] is None and grads[5] is None
            scale = ctx.scale
            var1, var2, var3 = ctx.saved_tensors
            return (
                grads[1] * scale + grads[4] * var2 * scale + grads[6],
                grads[1] * var3 * scale + grads[4] * var1 * scale,
                None,
                grads[1] * var2 * scale + grads[4] * scale,
            )

    torch.manual_seed(5)
    t1 = torch.rand(10, dtype=torch.double, requires_grad=True)
    t2 = torch.rand(10, dtype=torch.double, requires_grad=True)
    t3 = torch.rand(10, dtype=torch.double)
    with _offload(system) as moved:
        res = MyFunction.apply(t1, t2, 7, t3)
    assert moved.packed_tensors == 3
    assert (res[0], res[2], res[3], res[5]) == (7, None, True, "bar")
    assert torch.equal(res[1], (t1 + t2 * t3) * 7)
    assert torch.equal(res[4], (t1 * t2 + t3) * 7)
    assert torch.equal(res[6], t1)
    torch.autograd.backward([res[1].sum(), res[4].sum(), res[6].sum()])

    def loss_fn(t1, t2, t3):
        res = MyFunction.apply(t1, t2, 7, t3)
        return res[1].sum() + res[4].sum() + res[6].sum()

    want_t1, want_t2, _ = _grads_without_hooks(loss_fn, t1, t2, t3)
    assert torch.equal(t1.grad, want_t1) and torch.equal(t2.grad, want_t2)
    assert t3.grad is None


@pytest.mark.parametrize("save", [True, False], ids=["saves-x-and-none", "saves-nothing"])
def test_custom_function_saved_tensors_keep_none_and_are_freed_after_backward(system, save):
    # Port of test_custom_function_saved_tensors: None among saved tensors is no tensor to
    # pack and comes back as None.
    class MyFn(Function):
        @staticmethod
        def forward(ctx, x):
            if save:
                ctx.save_for_backward(x, None)
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    a = torch.randn(5, requires_grad=True)
    with _offload(system) as moved:
        y = MyFn.apply(a)
    saved = y.grad_fn.saved_tensors
    if save:
        assert len(saved) == 2 and torch.equal(saved[0], a) and saved[1] is None
        assert moved.packed_tensors == 1
    else:
        assert saved == () and moved.packed_tensors == 0
    del saved
    y.sum().backward()
    assert torch.equal(a.grad, torch.ones(5))
    if save:
        with pytest.raises(RuntimeError, match="after they have already been freed"):
            _ = y.grad_fn.saved_tensors
    del y
    assert _pool_used_bytes(system) == 0


def test_custom_function_saving_a_detached_intermediate(system):
    # Port of test_saved_tensor_hooks_custom_function_intermediates.
    class Func(Function):
        @staticmethod
        def forward(ctx, x):
            intermediate = x.exp()
            ctx.save_for_backward(intermediate.clone().detach_().requires_grad_(True))
            return x.exp()

        @staticmethod
        def backward(ctx, grad_out):
            (intermediate,) = ctx.saved_tensors
            return grad_out * intermediate

    a = torch.tensor(1.0, requires_grad=True)
    with _offload(system) as moved:
        out = Func.apply(a)
    assert moved.packed_tensors == 1
    out.backward()
    assert torch.equal(a.grad, torch.exp(a.detach()))


def test_inplace_change_to_an_unpacked_tensor_in_backward_leaves_the_input_alone(system):
    # Port of test_saved_tensors_hook_version_counter_not_shared: what backward unpacks is
    # the pool's copy, which shares neither memory nor version counter with the input.
    versions = []

    class Test(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            versions.append(a._version)
            x.add_(1)
            versions.append(a._version)
            return grad_output

    a = torch.tensor(1.0, requires_grad=True)
    with _offload(system) as moved:
        b = Test.apply(a)
    assert moved.packed_tensors == 1
    b.backward()
    assert versions[0] == versions[1]
    assert torch.equal(a, torch.tensor(1.0)) and torch.equal(a.grad, torch.tensor(1.0))


# -- in-place changes after a save ----------------------------------------------------------


def test_saved_input_detached_in_place_after_save_still_backpropagates(system):
    # Port of test_saved_variable_saved_original_inplace_detach. Without hooks backward
    # refuses a saved input that was detach_()-ed; under saved-tensor hooks (torch's own as
    # well as STORM's) the node that made it was recorded at pack time, so backward runs.
    leaf = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    a = leaf.clone()
    with _offload(system):
        b = a.sin()
    a.detach_()
    b.sum().backward()
    assert torch.equal(leaf.grad, torch.cos(leaf.detach()))


def test_inplace_ops_that_save_their_output_match_no_offload(system):
    # In-place ops in forward save their (in-place) output, once on a whole tensor and once
    # on a view (the base gets a CopySlices node); later ops save the changed tensors.
    torch.manual_seed(6)
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)

    def loss_fn(x, w):
        h = x * 1.5
        h.tanh_()  # saves its output: h after tanh
        g = h * 2
        g[:, :4].exp_()  # saves its output: the view, after exp
        return (g @ w).sum()

    with _counting_packs() as packs:
        loss_fn(x, w)
    with _offload(system) as moved:
        loss = loss_fn(x, w)
    assert moved.packed_tensors == packs[0] > 0
    loss.backward()
    for ours, want in zip((x.grad, w.grad), _grads_without_hooks(loss_fn, x, w), strict=True):
        assert torch.equal(ours, want)


@pytest.mark.parametrize("saved", ["output", "input"])
def test_inplace_change_before_the_copy_never_reaches_backward(daemon, system, saved):
    # Without hooks, backward refuses a saved tensor changed in place since it was saved
    # ("modified by an inplace operation", test_saved_variable_version_counter and its
    # kin); under hooks torch leaves that to them. STORM's contract is save_on_cpu's:
    # backward sees the bytes the tensor held when it was packed. Its copy into the pool
    # runs behind forward, so a change that lands before the copy is done must be refused
    # loudly, never handed to backward.
    torch.manual_seed(7)
    a = torch.randn(256, 256, requires_grad=True)
    b = torch.randn(256, 256)
    want = a.detach().exp() if saved == "output" else b.clone()  # a's gradient, from the bytes as saved
    os.kill(daemon.proc.pid, signal.SIGSTOP)  # the transfer thread now waits on the daemon before copying
    try:
        with _offload(system):
            y = a.exp() if saved == "output" else a * b  # exp saves y; a * b saves b for a's gradient
        with torch.no_grad():
            (y if saved == "output" else b).mul_(2)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    try:
        y.sum().backward()
    except (StormError, RuntimeError) as error:
        assert re.search(r"in ?place", str(error)), error
    else:
        assert torch.equal(a.grad, want)
    del y
    assert _pool_used_bytes(system) == 0


# -- errors and disabled hooks ----------------------------------------------------------------


def test_errors_of_user_hooks_inside_offload_propagate_and_outside_never_run(system):
    # Port of test_saved_tensor_hooks_custom_error_propagation, with STORM's hooks around
    # the failing ones (their errors come out unchanged) and inside them (they never run).
    class CustomError(Exception):
        pass

    def raise_on_pack(x):
        raise CustomError("pack")

    def raise_on_unpack(x):
        raise CustomError("unpack")

    a = torch.tensor(1.0, requires_grad=True)
    with _offload(system) as moved:
        with saved_tensors_hooks(raise_on_pack, lambda x: x), pytest.raises(CustomError, match="pack"):
            torch.sin(a)
        with saved_tensors_hooks(lambda x: x, raise_on_unpack):
            out = torch.sin(a)
            with pytest.raises(CustomError, match="unpack"):
                out.backward()
    assert moved.packed_tensors == 0

    with saved_tensors_hooks(raise_on_pack, raise_on_unpack):
        with _offload(system) as moved:
            out = torch.sin(a)
        out.backward()  # saves nothing, so the user's hooks still never run
    assert moved.packed_tensors == 1
    assert torch.equal(a.grad, torch.cos(a.detach()))


def test_pool_full_error_comes_out_of_the_hooks_with_the_numbers(daemon_factory):
    # STORM's own errors under its hooks, as test_saved_tensor_hooks_custom_error_propagation
    # asks of any hook: the error class and message come out unchanged.
    daemon = daemon_factory(pool_size="1MiB")
    with StormSystem(daemon.endpoint, policy="error") as system:
        a = torch.randn(512, 1024, requires_grad=True)  # 2 MiB: cannot fit
        y = None
        with pytest.raises(PoolFullError, match=r"offload: 2097152 bytes requested, \d+ free"):
            with _offload(system):
                y = a.exp()
            y.sum().backward()
        y = None  # drops the graph, if forward got as far as making one
        assert _pool_used_bytes(system) == 0


def test_offload_where_hooks_are_disabled_raises_the_disabling_message(system):
    # Port of test_disabling_saved_tensor_hooks.
    a = torch.randn(5, requires_grad=True)
    with (
        disable_saved_tensors_hooks("error message"),
        pytest.raises(RuntimeError, match="error message"),
        _offload(system),
    ):
        pass
    assert _hooks_enabled()

    with _offload(system) as moved:
        with pytest.raises(RuntimeError, match="error message"), disable_saved_tensors_hooks("error message"):
            pass
        y = a * a  # STORM's hooks are still the ones in place
    assert _hooks_enabled()
    assert moved.packed_tensors == 2
    y.sum().backward()
    assert torch.equal(a.grad, 2 * a.detach())


def test_offload_under_nested_disables_raises_the_innermost_message(system):
    # Port of test_disabling_saved_tensor_hooks_nested.
    with disable_saved_tensors_hooks("outer"):
        with disable_saved_tensors_hooks("inner"), pytest.raises(RuntimeError, match="inner"), _offload(system):
            pass
        assert not _hooks_enabled()
        with pytest.raises(RuntimeError, match="outer"), _offload(system):
            pass
    assert _hooks_enabled()
    a = torch.randn(5, requires_grad=True)
    with _offload(system) as moved:  # a refused block left nothing behind
        y = a * a
    assert moved.packed_tensors == 2
    z = a * a
    assert z.grad_fn._saved_self is a
    del y, z
    assert _pool_used_bytes(system) == 0
