"""MoGAAttention and paper_config: equivalence with dense attention, branch mean vs float64 references."""

from __future__ import annotations

import datetime
import math
import os
import pickle
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import moga.distributed
from moga.modules import MoGAAttention, WindowSplit, apply_rotary_interleaved, paper_config
from moga.reference import moga_attention_ref
from moga.router import group_balance_loss
from moga.window import window_attention_ref
from tests.utils import cpu_backends, rel_err


def _rotary(N: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random interleaved (cos, sin) tables of shape (1, N, 1, D) in Wan's float64 format."""
    angle = torch.rand(N, D // 2, dtype=torch.float64) * 6.3
    return angle.cos().repeat_interleave(2, -1).view(1, N, 1, D), angle.sin().repeat_interleave(2, -1).view(1, N, 1, D)


def _projections(layer: MoGAAttention, x: torch.Tensor, rotary) -> tuple[torch.Tensor, ...]:
    """q, k, v in float64 from the layer's own weights, written out independently of forward()."""
    B, N, _ = x.shape
    x64 = x.double()

    def lin(m, t):
        return F.linear(t, m.weight.double(), None if m.bias is None else m.bias.double())

    def rms(m, t):
        if isinstance(m, torch.nn.Identity):
            return t
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight.double()

    q = rms(layer.norm_q, lin(layer.to_q, x64)).view(B, N, layer.num_heads, -1)
    k = rms(layer.norm_k, lin(layer.to_k, x64)).view(B, N, layer.num_kv_heads, -1)
    v = lin(layer.to_v, x64).view(B, N, layer.num_kv_heads, -1)
    if rotary is not None:
        q, k = apply_rotary_interleaved(q, *rotary), apply_rotary_interleaved(k, *rotary)
    return q, k, v, lin(layer.router.proj, x64)


@pytest.mark.parametrize("qk_norm,kv_heads,use_rotary", [(False, None, False), (True, 2, True)])
def test_one_group_no_static_branch_is_plain_attention(qk_norm, kv_heads, use_rotary):
    B, N, dim, heads = 2, 37, 128, 4
    layer = MoGAAttention(dim, heads, 1, num_kv_heads=kv_heads, qk_norm=qk_norm)
    x = torch.randn(B, N, dim)
    rotary = _rotary(N, dim // heads) if use_rotary else None
    got = layer(x, rotary_emb=rotary)

    q, k, v, _ = _projections(layer, x, rotary)
    rep = heads // layer.num_kv_heads
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    want = F.linear(attn.reshape(B, N, dim), layer.to_out.weight.double(), layer.to_out.bias.double())
    assert rel_err(got, want) < 1e-5
    assert layer.last_balance_loss is not None and torch.isfinite(layer.last_balance_loss)


@pytest.mark.parametrize("top_k,kv_heads", [(1, None), (2, 1)])
@pytest.mark.parametrize("backend", cpu_backends())
def test_three_branch_mean_matches_reference(backend, top_k, kv_heads):
    B, grid, dim, heads, M = 2, (4, 3, 4), 64, 2, 3
    N, shots, context = math.prod(grid), [1], 1
    window = WindowSplit(frames=2, rows=2, cols=2)
    layer = MoGAAttention(
        dim, heads, M, window=window, frame_attention=True, context_frames=context, qk_norm=True, backend=backend,
        top_k=top_k, num_kv_heads=kv_heads,
    )
    x = torch.randn(B, N, dim, requires_grad=True)
    rotary = _rotary(N, dim // heads)
    got = layer(x, grid=grid, shot_starts=shots, rotary_emb=rotary)

    q, k, v, logits = _projections(layer, x, rotary)
    stga = window_attention_ref(q, k, v, grid, (2, 2, 2), shots, context)
    frame = window_attention_ref(q, k, v, grid, (1, 3, 4), shots, 0)
    mean = (moga_attention_ref(q, k, v, logits, top_k=top_k) + stga + frame) / 3
    want = F.linear(mean.reshape(B, N, dim), layer.to_out.weight.double(), layer.to_out.bias.double())
    assert rel_err(got, want) < 1e-5

    # Gradients of the input and the router weight (through the gates and the balance loss) vs float64.
    dout = torch.randn(got.shape, dtype=torch.float64)
    w_router = layer.router.proj.weight
    got_grads = torch.autograd.grad((got * dout.float()).sum() + layer.last_balance_loss, (x, w_router))
    want_loss = (want * dout).sum() + group_balance_loss(logits, top_k)
    want_grads = torch.autograd.grad(want_loss, (x, w_router))
    for name, g, w in zip(("dx", "drouter"), got_grads, want_grads, strict=True):
        assert w.abs().sum() > 0 and rel_err(g, w) < 1e-5, (name, rel_err(g, w))


def test_window_split_resolves_against_the_grid():
    assert WindowSplit(40, 2, 2).resolve((120, 30, 52)) == (40, 15, 26)
    assert WindowSplit(3, 2, 2).resolve((5, 7, 9)) == (3, 4, 5)  # odd sizes: edge windows are smaller
    with pytest.raises(ValueError, match="window"):
        WindowSplit(0, 2, 2)


def test_paper_config():
    wan = paper_config("wan")
    assert wan == paper_config()  # "wan" is the default
    assert (wan.num_groups, wan.window.rows, wan.window.cols, wan.frame_attention, wan.balance_loss_weight) == (
        5, 2, 2, True, 0.1,
    )
    big = paper_config("mmdit")
    assert (big.num_groups, big.window.rows, big.window.cols) == (20, 4, 4)
    with pytest.raises(ValueError, match="model"):
        paper_config("sd3")


def test_sequence_parallel_group_goes_through_ulysses(monkeypatch):
    calls = {}

    def spy(q, k, v, router_logits, *, top_k, softmax_scale, group, backend):
        calls.update(group=group, top_k=top_k, shape=tuple(q.shape), logits=tuple(router_logits.shape))
        return torch.zeros_like(q)

    monkeypatch.setattr(moga.distributed, "ulysses_moga_attention", spy)
    marker = object()
    layer = MoGAAttention(64, 2, 4, top_k=2, sequence_parallel_group=marker)
    out = layer(torch.randn(1, 10, 64))
    assert calls == dict(group=marker, top_k=2, shape=(1, 10, 2, 32), logits=(1, 10, 4))
    assert out.shape == (1, 10, 64)


def _sequence_parallel_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank: the layer on this rank's shard vs the same layer on the whole sequence (same seed, weights)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        torch.manual_seed(0)
        grid, dim, n = (4, 3, 4), 64, 48 // world
        kwargs = dict(window=WindowSplit(2, 2, 2), frame_attention=True, context_frames=1, backend="torch")
        full_layer = MoGAAttention(dim, 2, 3, **kwargs)
        sp_layer = MoGAAttention(dim, 2, 3, sequence_parallel_group=dist.group.WORLD, **kwargs)
        sp_layer.load_state_dict(full_layer.state_dict())
        x, dout = torch.randn(2, 48, dim, requires_grad=True), torch.randn(2, 48, dim)
        x_shard = x.detach()[:, rank * n : (rank + 1) * n].clone().requires_grad_(True)
        full = full_layer(x, grid=grid, shot_starts=[1])
        (full * dout).sum().backward()
        shard = sp_layer(x_shard, grid=grid, shot_starts=[1])
        (shard * dout[:, rank * n : (rank + 1) * n]).sum().backward()
        router_grad = sp_layer.router.proj.weight.grad.clone()
        dist.all_reduce(router_grad)  # each rank holds its tokens' share of the parameter gradient
        result = dict(
            out=rel_err(shard, full[:, rank * n : (rank + 1) * n]),
            dx=rel_err(x_shard.grad, x.grad[:, rank * n : (rank + 1) * n]),
            drouter=rel_err(router_grad, full_layer.router.proj.weight.grad),
        )
    except Exception:  # reported by the pytest side
        result = dict(exception=traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        dist.destroy_process_group()


def test_sequence_parallel_static_branches_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = mp.spawn(_sequence_parallel_worker, args=(world, port, str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("sequence-parallel children did not finish in 240 s")
    for r in range(world):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            result = pickle.load(f)
        assert "exception" not in result, result.get("exception")
        for name in ("out", "dx", "drouter"):
            assert result[name] < 1e-5, (r, name, result[name])


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="num_heads"):
        MoGAAttention(65, 2, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoGAAttention(64, 4, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        MoGAAttention(64, 2, 4, top_k=5)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        MoGAAttention(64, 2, 0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        MoGAAttention(64, 2, None)
    layer = MoGAAttention(64, 2, 4, frame_attention=True)
    with pytest.raises(ValueError, match="grid"):
        layer(torch.randn(1, 12, 64))
    with pytest.raises(ValueError, match="grid"):
        layer(torch.randn(1, 12, 64), grid=(2, 2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(12, 64))


def test_misuse_raises_instead_of_being_ignored():
    """A routed-only layer never reads grid or shot_starts, so a wrong one must fail loudly, not be dropped."""
    layer = MoGAAttention(64, 4, num_groups=4)
    x, mem = torch.randn(1, 12, 64), torch.randn(1, 12, 64)
    with pytest.raises(TypeError, match="positional"):
        layer(x, mem, mem)  # nn.MultiheadAttention-style cross-attention: there is no key/value input
    with pytest.raises(TypeError, match="positional"):
        layer(x, (2, 2, 3))  # grid is keyword-only
    with pytest.raises(ValueError, match="holds 999 tokens but the sequence length is 12"):
        layer(x, grid=(999, 1, 1))
    with pytest.raises(TypeError, match="grid must be a sequence"):
        layer(x, grid=mem)
    with pytest.raises(TypeError, match="grid must be a sequence"):
        layer(x, grid=torch.tensor([2, 2, 3]))
    with pytest.raises(TypeError, match="shot_starts"):
        layer(x, grid=(2, 2, 3), shot_starts=mem)
    with pytest.raises(ValueError, match="pass grid"):
        layer(x, shot_starts=[1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        layer(x, grid=(2, 2, 3), shot_starts=[5])
    # Well-formed metadata on a routed-only layer is accepted and does not change the result.
    torch.testing.assert_close(layer(x, grid=(2, 2, 3), shot_starts=[1]), layer(x), rtol=0, atol=0)


def test_sequence_parallel_grid_describes_the_whole_sequence(monkeypatch):
    """With a sequence-parallel group, grid is checked against N * P (x is one rank's shard)."""
    monkeypatch.setattr(moga.distributed, "ulysses_moga_attention", lambda q, *a, **kw: torch.zeros_like(q))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    layer = MoGAAttention(64, 2, 4, sequence_parallel_group=object())
    x = torch.randn(1, 6, 64)
    assert layer(x, grid=(2, 2, 3)).shape == (1, 6, 64)
    with pytest.raises(ValueError, match="sequence length is 12"):
        layer(x, grid=(1, 2, 3))
