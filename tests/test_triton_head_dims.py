"""The triton backend at head dims that are not tile widths, and the device guard of every Triton launch.

Head dims other than 32, 64, 128, 256 are zero-padded on the host to the next tile width (see
``moga.kernels.segment_attention.fwd``); these tests check forward and gradients against float64 references at
such dims, that the padding never leaks (NaN-poisoned outputs, default softmax scale from the real D), that one
autograd call pads each of q, k, v, dout once (bitwise the results of padding inside every launch), and that
every kernel launch runs at a compiled tile width, inside a device guard for q's device. Under the Triton
interpreter (no GPU) inputs stay small: N <= 160, at most 2 query heads.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import moga.functional
from moga import _alloc, _head_dim, group_attention, moga_attention
from moga.backends import _autograd as autograd_wrapper
from moga.layout import SegmentLayout, routed_layout
from moga.reference import group_attention_ref
from tests import utils

triton_backend, pytestmark = utils.backend_and_skip_mark("triton", "triton backend not available")

if triton_backend is not None:
    from moga.kernels.segment_attention import launch, segment_attention_bwd, segment_attention_fwd
    from moga.kernels.segment_attention.configs import HEAD_DIMS, interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD_DIMS = [1, 8, 40, 59, 96, 111, 160, 224]


def _ragged_layout(T: int, sizes: list[int], device: str = DEVICE) -> SegmentLayout:
    """Tokens in shuffled groups of the given sizes (empty and single-token groups allowed), the rest padding."""
    return routed_layout(utils.ragged_group_ids(1, T, sizes, device).view(1, T, 1), len(sizes)).segments


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", ODD_DIMS)
def test_odd_head_dim_vs_naive(D: int, dtype: torch.dtype) -> None:
    """Ragged, empty and single-token segments, padding tokens, GQA 2:1, a segment longer than one block."""
    T = 100
    layout = _ragged_layout(T, [70, 0, 1, 20])
    q = torch.randn(T, 2, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(T, 1, D, dtype=dtype, device=DEVICE) for _ in range(2))
    errors = utils.segment_errors_vs_naive(triton_backend.segment_attention, q, k, v, layout, D**-0.5)
    assert all(e < utils.TOL[dtype] for e in errors.values()), errors


def test_odd_head_dim_with_repeated_tokens() -> None:
    """Non-unique queries and keys (per-position gradient rows summed per token) at an odd head dim."""
    T, D = 40, 59
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEVICE)  # noqa: E731
    layout = SegmentLayout(
        q_index=as_t(list(range(0, 25)) + list(range(10, 30)) + [39]),
        q_offsets=as_t([0, 25, 45, 46]),
        k_index=as_t(list(range(0, 20)) + list(range(5, 40)) + [39]),
        k_offsets=as_t([0, 20, 55, 56]),
        num_tokens=T,
        q_unique=False,
        k_unique=False,
    )
    q, k, v = (torch.randn(T, 2, D, device=DEVICE) for _ in range(3))
    errors = utils.segment_errors_vs_naive(triton_backend.segment_attention, q, k, v, layout, 0.3)
    assert all(e < utils.TOL[torch.float32] for e in errors.values()), errors


@pytest.mark.parametrize("dtype,D", [(torch.float32, 59), (torch.float16, 96)])
def test_group_attention_odd_head_dim_vs_reference(dtype: torch.dtype, D: int) -> None:
    """Public API, default softmax scale (1/sqrt of the real D, not of the padded width), GQA, padding tokens."""
    B, N, Hq, Hkv = 1, 100, 2, 1
    sizes = [50, 0, 1, 30]
    ids = utils.ragged_group_ids(B, N, sizes, DEVICE)
    q, k, v = (t.detach().to(DEVICE).requires_grad_(True) for t in utils.qkv(B, N, Hq, Hkv, D, dtype))
    out = group_attention(q, k, v, ids, num_groups=len(sizes), backend="triton")
    q64, k64, v64 = utils.as_double_leaves(q, k, v)
    ref = group_attention_ref(q64, k64, v64, ids)
    assert out.shape == q.shape
    utils.assert_out_and_grads_close(out, ref, (q, k, v), (q64, k64, v64), ("dq", "dk", "dv"), utils.TOL[dtype])


def test_bfloat16_odd_head_dim_within_twice_a_bf16_torch_implementation() -> None:
    T, H, D = 100, 2, 80
    layout = _ragged_layout(T, [60, 25, 1])
    q, k, v = (torch.randn(T, H, D, dtype=torch.bfloat16, device=DEVICE).requires_grad_(True) for _ in range(3))
    utils.assert_bf16_within_twice_naive(triton_backend.segment_attention, q, k, v, layout, D**-0.5)


# ---------------------------------------------------------------------------------------------------------------
# Padding once per autograd call: the wrapper pads q, k, v in forward and dout in backward, each once, and slices
# out, dq, dk, dv once each; results are bitwise those of the launchers padding inside every call (the old path).


class _CopyCounter:
    """Counts the head-dim pad copies (every torch.nn.functional.pad call) and slice copies (unpad_head_dim
    calls that return a new tensor), wherever the wrapper and the launchers look the helpers up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pads = self.slices = 0
        real_pad, real_unpad = torch.nn.functional.pad, _head_dim.unpad_head_dim

        def pad(*args, **kwargs):
            self.pads += 1
            return real_pad(*args, **kwargs)

        def unpad(t: torch.Tensor, D: int) -> torch.Tensor:
            r = real_unpad(t, D)
            self.slices += r is not t
            return r

        monkeypatch.setattr(torch.nn.functional, "pad", pad)
        for module in (_head_dim, autograd_wrapper, launch):
            monkeypatch.setattr(module, "unpad_head_dim", unpad)

    def take(self) -> tuple[int, int]:
        """(pads, slices) since the last take."""
        counts, self.pads, self.slices = (self.pads, self.slices), 0, 0
        return counts


@pytest.mark.parametrize("D", [8, 40, 59, 80, 96, 64])
def test_autograd_pads_per_call_saves_unpadded_bitwise_as_padding_per_launch(
    monkeypatch: pytest.MonkeyPatch, D: int
) -> None:
    """fp32, GQA 2:1, ragged groups with an empty and a single-token one, padding tokens: out, dq, dk, dv of the
    backend equal (bitwise) those of the launchers called on the unpadded tensors. Forward pads q, k, v and slices
    out once each; backward keeps only unpadded tensors (nothing of the tile width lives from forward to backward:
    memory before copies) and pads q, k, v, out, dout and slices dq, dk, dv once each (no copy at D = 64)."""
    T = 70
    layout = _ragged_layout(T, [40, 0, 1, 12])
    q = torch.randn(T, 2, D, device=DEVICE)
    k, v = (torch.randn(T, 1, D, device=DEVICE) for _ in range(2))
    dout = torch.randn(layout.q_index.numel(), 2, D, device=DEVICE)
    scale = D**-0.5
    saved_widths: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:  # q, k, v, out (lse is 2-D)
            saved_widths.append(t.shape[-1])
        return t

    with _alloc.poisoned_outputs():
        ref_out, ref_lse = segment_attention_fwd(q, k, v, layout, scale)  # the launchers pad (and slice) themselves
        ref_grads = segment_attention_bwd(dout, q, k, v, ref_out, ref_lse, layout, scale)
        counter = _CopyCounter(monkeypatch)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = triton_backend.segment_attention(qg, kg, vg, layout, scale)
        fwd_copies = counter.take()
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
        bwd_copies = counter.take()
    padded = D != 64
    assert saved_widths == [D] * 4, saved_widths  # q, k, v, out kept at the caller's width
    assert fwd_copies == ((3, 1) if padded else (0, 0)), fwd_copies  # pads q, k, v; slices out
    assert bwd_copies == ((5, 3) if padded else (0, 0)), bwd_copies  # pads q, k, v, out, dout; slices dq, dk, dv
    assert out.shape == ref_out.shape and out.is_contiguous() and torch.equal(out, ref_out)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.shape == r.shape and g.is_contiguous() and torch.equal(g, r), name


def _padding_per_launch_backend() -> types.SimpleNamespace:
    """The triton backend as it was before padding moved into the wrapper: the launchers pad every call."""

    def segment_attention(q, k, v, layout, scale):
        return autograd_wrapper.segment_attention_autograd(
            q, k, v, layout, scale, segment_attention_fwd, segment_attention_bwd
        )

    return types.SimpleNamespace(segment_attention=segment_attention)


@pytest.mark.parametrize("D", [40, 59])
def test_moga_attention_router_grads_bitwise_as_padding_per_launch(monkeypatch: pytest.MonkeyPatch, D: int) -> None:
    """moga_attention (top-2, padding tokens) through the triton backend: output and the gradients of q, k, v and
    the router logits equal (bitwise) those with the launchers padding inside every call."""
    B, N, M = 1, 48, 4
    q, k, v = (torch.randn(B, N, 2, D, device=DEVICE) for _ in range(3))
    logits = torch.randn(B, N, M, device=DEVICE)
    valid = torch.rand(B, N, device=DEVICE) > 0.1
    dout = torch.randn(B, N, 2, D, device=DEVICE)

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, logits)]
        out = moga_attention(*leaves[:3], leaves[3], top_k=2, backend="triton", valid=valid)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    new = run()
    with monkeypatch.context() as m:
        m.setattr(moga.functional, "select_backend", lambda *args: _padding_per_launch_backend())
        old = run()
    for name, a, b in zip(("out", "dq", "dk", "dv", "d_logits"), new, old, strict=True):
        assert torch.equal(a, b), name
    assert new[4].abs().sum() > 0  # the router does learn through the gate


# ---------------------------------------------------------------------------------------------------------------
# Launches: compiled tile widths only, each inside a device guard for q's device


@pytest.mark.skipif(DEVICE != "cpu", reason="records launches through the Triton interpreter")
@pytest.mark.parametrize("D", [40, 64])
def test_every_launch_is_guarded_and_at_a_tile_width(monkeypatch: pytest.MonkeyPatch, D: int) -> None:
    """Forward and backward with repeated keys launch fwd, preprocess, dk/dv, dq and the per-token reduction; each
    must run inside ``launch.device_guard(q.device)`` and with a head dim the compile check covers."""
    from triton.runtime.interpreter import InterpretedFunction

    assert interpreting()
    guards: list[torch.device] = []  # the devices of the guards currently entered
    launches: list[tuple[str, list[torch.device], object]] = []

    @contextlib.contextmanager
    def recording_guard(device: torch.device):
        guards.append(device)
        try:
            yield
        finally:
            guards.pop()

    real_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, list(guards), kwargs.get("D")))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(launch, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    T = 60
    layout = SegmentLayout(
        q_index=torch.arange(T),
        q_offsets=torch.tensor([0, 30, T]),
        k_index=torch.cat([torch.arange(30), torch.arange(20, T)]),  # tokens 20..29 are keys of both segments
        k_offsets=torch.tensor([0, 30, 70]),
        num_tokens=T,
        q_unique=True,
        k_unique=False,
    )
    q, k, v = (torch.randn(T, 2, D, requires_grad=True) for _ in range(3))
    out = triton_backend.segment_attention(q, k, v, layout, D**-0.5)
    torch.autograd.grad(out.sum(), (q, k, v))
    names = {name for name, _, _ in launches}
    assert names == {
        "segment_attn_fwd_kernel",
        "segment_attn_bwd_preprocess_kernel",
        "segment_attn_bwd_dkdv_kernel",
        "segment_attn_bwd_dq_kernel",
        "segment_attn_bwd_reduce_kernel",
    }, names
    for name, active, width in launches:
        assert active == [q.device], (name, active)
        assert width is None or width in HEAD_DIMS, (name, width)  # None: the reduction takes flat rows


def test_device_guard_targets_the_tensor_device() -> None:
    """CUDA devices get torch.cuda.device of that index (made current around the launch); CPU needs no guard."""
    guard = launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("D", [64, 40])
def test_inputs_on_a_device_that_is_not_current(D: int) -> None:
    """Tensors on cuda:1 while cuda:0 is current: results on cuda:1 match the reference, cuda:0 stays current."""
    device = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    T = 300
    layout = _ragged_layout(T, [150, 0, 1, 100], device=str(device))
    q, k, v = (torch.randn(T, 2, D, dtype=torch.float16, device=device) for _ in range(3))
    errors = utils.segment_errors_vs_naive(triton_backend.segment_attention, q, k, v, layout, D**-0.5)
    torch.cuda.synchronize(device)
    assert torch.cuda.current_device() == 0
    assert all(e < utils.TOL[torch.float16] for e in errors.values()), errors
