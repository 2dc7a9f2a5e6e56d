"""Ulysses sequence parallelism (moga.distributed) against the single-process functions, on gloo.

One spawn per world size runs every case (process start-up dominates the cost); each rank records, per
case, relative errors of its output and gradient shards against single-process moga on the whole
sequence, or the error it raised. The pytest functions below then check those records.

Every rank builds the SAME full inputs from a per-case seed, keeps its shard for the distributed call and
uses the whole tensors for the single-process result.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import pickle
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

import moga
from moga import _alloc
from moga.distributed import (
    gather_sequence,
    heads_to_sequence,
    qkv_to_heads,
    sequence_to_heads,
    ulysses_group_attention,
    ulysses_moga_attention,
)
from tests.utils import free_port, rel_err, spawn_ranks

TOL_FP32 = 1e-5
WORLD_SIZES = (2, 4)
SPAWN_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------------------------------
# Helpers run inside the children.


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous slice of dim 1 (the sequence)."""
    n = x.shape[1] // world
    return x[:, rank * n : (rank + 1) * n]


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaves; float ones require grad (integer group ids cannot)."""
    return [t.detach().clone().requires_grad_(t.dtype.is_floating_point) for t in tensors]


def _compare(
    run_sharded: Callable[..., torch.Tensor],
    run_full: Callable[..., torch.Tensor],
    full_inputs: list[torch.Tensor],
    rank: int,
    world: int,
    shard_rank: int | None = None,
    shard_world: int | None = None,
    names: tuple[str, ...] = ("q", "k", "v", "x"),
) -> dict[str, float]:
    """Forward + backward of both; relative errors of this rank's shards and NaN counts (poisoned buffers).

    Float inputs get gradients; the loss is <out, w> with a fixed random weight w (the same on every rank).
    """
    shard_rank = rank if shard_rank is None else shard_rank
    shard_world = world if shard_world is None else shard_world
    full = _leaves(*full_inputs)
    is_float = [t.dtype.is_floating_point for t in full_inputs]
    out_full = run_full(*full)
    weight = torch.randn(out_full.shape, generator=torch.Generator().manual_seed(1234), dtype=out_full.dtype)
    (out_full * weight).sum().backward()

    local = _leaves(*(_shard(t, shard_rank, shard_world) for t in full_inputs))
    with _alloc.poisoned_outputs():
        out = run_sharded(*local)
        (out * _shard(weight, shard_rank, shard_world)).sum().backward()
    result = {"out": rel_err(out.detach(), _shard(out_full.detach(), shard_rank, shard_world))}
    result["nan"] = int(torch.isnan(out).sum())
    for name, loc, ful, f in zip(names, local, full, is_float, strict=True):
        if f:
            result["d" + name] = rel_err(loc.grad, _shard(ful.grad, shard_rank, shard_world))
            result["nan"] += int(torch.isnan(loc.grad).sum())
    return result


def _qkv(B: int, N: int, Hq: int, Hkv: int, D: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g) for h in (Hq, Hkv, Hkv)]


def _moga_case(world: int, rank: int, *, Hq: int, Hkv: int, M: int, top_k: int, seed: int, **kw) -> dict:
    B, N, D = 2, 6 * world, 8
    q, k, v = _qkv(B, N, Hq, Hkv, D, seed)
    logits = 2.0 * torch.randn(B, N, M, generator=torch.Generator().manual_seed(seed + 1))

    def sharded(q, k, v, x):
        return ulysses_moga_attention(q, k, v, x, top_k=top_k, backend="torch", **kw)

    def full(q, k, v, x):
        return moga.moga_attention(q, k, v, x, top_k=top_k, backend="torch")

    return _compare(sharded, full, [q, k, v, logits], rank, world)


def _bf16_case(world: int, rank: int) -> dict:
    """bf16 errors against float64 single-process moga, for this rank's shards: the sharded run ("sp_*") and
    single-process bf16 moga ("single_*"). The standard: sp <= 2 x single."""
    B, N, Hq, Hkv, D, M = 1, 6 * world, 2 * world, world, 16, 4
    inputs = [*_qkv(B, N, Hq, Hkv, D, seed=61), torch.randn(B, N, M, generator=torch.Generator().manual_seed(62))]
    weight = torch.randn(B, N, Hq, D, generator=torch.Generator().manual_seed(63), dtype=torch.float64)

    def run(fn, dtype: torch.dtype, sharded: bool) -> list[torch.Tensor]:
        """[out, dq, dk, dv, dlogits] of this rank's tokens."""
        cut = (lambda t: _shard(t, rank, world)) if sharded else (lambda t: t)
        leaves = _leaves(*(cut(t).to(dtype) for t in inputs))
        out = fn(*leaves, top_k=2, backend="torch")
        (out.double() * cut(weight)).sum().backward()
        results = [out.detach(), *(t.grad for t in leaves)]
        return results if sharded else [_shard(t, rank, world) for t in results]

    ref = run(moga.moga_attention, torch.float64, sharded=False)
    single = run(moga.moga_attention, torch.bfloat16, sharded=False)
    with _alloc.poisoned_outputs():
        sp = run(ulysses_moga_attention, torch.bfloat16, sharded=True)
    result = {"nan": sum(int(torch.isnan(t).sum()) for t in sp)}
    for name, r, a, b in zip(("out", "dq", "dk", "dv", "dx"), ref, sp, single, strict=True):
        result["sp_" + name], result["single_" + name] = rel_err(a, r), rel_err(b, r)
    return result


def _ragged_group_ids(B: int, N: int, seed: int) -> torch.Tensor:
    """Ids in [0, 4) at random (ragged groups spanning ranks), one singleton (id 4), padding (-1); id 5 is
    empty when num_groups=6."""
    ids = torch.randint(0, 4, (B, N), generator=torch.Generator().manual_seed(seed))
    ids[0, 1] = 4
    ids[1, -1] = -1
    ids[0, N // 2] = -1
    return ids


def _group_case(world: int, rank: int, *, Hq: int, Hkv: int, num_groups: int | None, seed: int) -> dict:
    B, N, D = 2, 5 * world, 8
    q, k, v = _qkv(B, N, Hq, Hkv, D, seed)
    ids = _ragged_group_ids(B, N, seed + 1)

    def sharded(q, k, v, x):
        return ulysses_group_attention(q, k, v, x, num_groups=num_groups, backend="torch")

    def full(q, k, v, x):
        return moga.group_attention(q, k, v, x, num_groups=num_groups, backend="torch")

    return _compare(sharded, full, [q, k, v, ids], rank, world)


def _strided_case(world: int, rank: int) -> dict:
    """q, k, v as non-contiguous views into one fused (B, n, 3, H, D) projection, as a model produces them."""
    B, N, H, D, M = 1, 4 * world, world, 8, 3
    qkv = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(7))
    logits = torch.randn(B, N, M, generator=torch.Generator().manual_seed(8))

    def sharded(qkv, x):
        return ulysses_moga_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], x, backend="torch")

    def full(qkv, x):
        return moga.moga_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], x, backend="torch")

    return _compare(sharded, full, [qkv, logits], rank, world, names=("qkv", "x"))


def _subgroup_case(world: int, rank: int) -> dict:
    """Sequence parallel over pairs of ranks (data parallel x SP): each pair shards its own sequence."""
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]  # every rank must create every group
    pair, local_rank = rank // 2, rank % 2
    B, N, H, D, M = 1, 8, 2, 8, 3
    q, k, v = _qkv(B, N, H, H, D, seed=100 + pair)
    logits = torch.randn(B, N, M, generator=torch.Generator().manual_seed(200 + pair))

    def sharded(q, k, v, x):
        return ulysses_moga_attention(q, k, v, x, top_k=2, group=pairs[pair], backend="torch")

    def full(q, k, v, x):
        return moga.moga_attention(q, k, v, x, top_k=2, backend="torch")

    return _compare(sharded, full, [q, k, v, logits], rank, world, shard_rank=local_rank, shard_world=2)


def _emulated_distributed_attention(local_attention: Callable, q, k, v, *args, group=None, **kwargs):
    """The contract of DeepSpeed's DistributedAttention / yunchang's UlyssesAttention, written independently of
    moga.distributed: list all_to_all from sequence shards (B, n, H, D) to head shards (B, N, H/P, D), call
    ``local_attention(q, k, v, *args, **kwargs)`` on those, all_to_all back."""
    world = dist.get_world_size(group)

    class _SeqAllToAll(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scatter_dim, gather_dim):
            ctx.dims = (scatter_dim, gather_dim)
            inputs = [t.contiguous() for t in torch.tensor_split(x, world, dim=scatter_dim)]
            outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
            dist.all_to_all(outputs, inputs, group=group)
            return torch.cat(outputs, dim=gather_dim)

        @staticmethod
        def backward(ctx, grad):
            scatter_dim, gather_dim = ctx.dims
            return _SeqAllToAll.apply(grad, gather_dim, scatter_dim), None, None

    q, k, v = (_SeqAllToAll.apply(t, 2, 1) for t in (q, k, v))
    return _SeqAllToAll.apply(local_attention(q, k, v, *args, **kwargs), 1, 2)


def _interop_setup(world: int, seed: int) -> tuple[list[torch.Tensor], Callable, Callable]:
    """Full inputs [q, k, v, logits], the local attention a Ulysses wrapper calls on head shards (moga with the
    gathered logits), and the single-process function on the whole sequence."""
    B, N, Hq, Hkv, D, M = 2, 4 * world, 2 * world, world, 8, 4
    q, k, v = _qkv(B, N, Hq, Hkv, D, seed=seed)
    logits = torch.randn(B, N, M, generator=torch.Generator().manual_seed(seed + 1))

    def local_attention(q, k, v, router_logits):
        assert q.shape == (B, N, Hq // world, D), "the wrapper must hand over head-sharded full sequences"
        return moga.moga_attention(q, k, v, router_logits, top_k=2, backend="torch")

    def full(q, k, v, x):
        return moga.moga_attention(q, k, v, x, top_k=2, backend="torch")

    return [q, k, v, logits], local_attention, full


def _interop_case(world: int, rank: int) -> dict:
    """moga.moga_attention as the local attention of a Ulysses wrapper, with logits gathered alongside."""
    inputs, local_attention, full = _interop_setup(world, seed=31)

    def sharded(q, k, v, x):
        return _emulated_distributed_attention(local_attention, q, k, v, gather_sequence(x))

    return _compare(sharded, full, inputs, rank, world)


def _interop_case_with(package: str, world: int, rank: int) -> dict:
    """moga inside the real Ulysses wrapper of ``package`` ("deepspeed" or "yunchang"), when it is installed."""
    if importlib.util.find_spec(package) is None:
        return {"skipped": f"{package} is not installed"}
    inputs, local_attention, full = _interop_setup(world, seed=41)
    if package == "deepspeed":
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.comm.init_distributed(dist_backend="gloo")  # adopts the initialised torch.distributed group
        wrapper = DistributedAttention(local_attention, dist.group.WORLD, scatter_idx=2, gather_idx=1)

        def sharded(q, k, v, x):  # batch-first (B, n, H, D): batch_dim_idx=0
            return wrapper(q, k, v, 0, None, router_logits=gather_sequence(x))
    else:
        from yunchang.comm.all_to_all import SeqAllToAll4D

        # yunchang's UlyssesAttention calls a built-in flash-attention kernel; its all-to-all is the hook.
        def sharded(q, k, v, x):
            q, k, v = (SeqAllToAll4D.apply(dist.group.WORLD, t, 2, 1) for t in (q, k, v))
            out = local_attention(q, k, v, gather_sequence(x))
            return SeqAllToAll4D.apply(dist.group.WORLD, out, 1, 2)

    return _compare(sharded, full, inputs, rank, world)


def _helpers_case(world: int, rank: int) -> dict:
    """The public collectives move exactly the documented slices (max abs differences, expected 0)."""
    B, N, H, D = 2, 3 * world, 2 * world, 4
    x = torch.randn(B, N, H, D, generator=torch.Generator().manual_seed(51))
    y = torch.randn(B, N, world, D, generator=torch.Generator().manual_seed(52))
    shard, h = _shard(x, rank, world), H // world
    heads = sequence_to_heads(shard)  # all tokens, heads [rank * h, (rank + 1) * h)
    q_h, k_h, v_h = qkv_to_heads(shard, _shard(y, rank, world), shard)
    return {
        "sequence_to_heads": (heads - x[:, :, rank * h : (rank + 1) * h]).abs().max().item(),
        "qkv_to_heads": max(
            (q_h - heads).abs().max().item(),
            (k_h - y[:, :, rank : rank + 1]).abs().max().item(),
            (v_h - heads).abs().max().item(),
        ),
        "heads_to_sequence": (heads_to_sequence(heads) - shard).abs().max().item(),
        "gather_sequence": (gather_sequence(shard) - x).abs().max().item(),
    }


def _error(fn: Callable[[], object]) -> tuple[str, str] | None:
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None


def _error_cases(world: int, rank: int) -> dict:
    """Each call below must raise on EVERY rank (a rank that does not raise would wait in a collective)."""
    n, D, M = 3, 8, 3
    q = torch.randn(1, n, world, D)
    logits = torch.randn(1, n, M)
    odd_heads = torch.randn(1, n, world + 1, D)
    one_head = torch.randn(1, n, 1, D)
    longer = torch.randn(1, n + 1, world, D)
    ids = torch.zeros(1, n, dtype=torch.int64)
    return {
        "q_heads": _error(lambda: ulysses_moga_attention(odd_heads, odd_heads, odd_heads, logits, backend="torch")),
        "kv_heads": _error(lambda: ulysses_moga_attention(q, one_head, one_head, logits, backend="torch")),
        "group_heads": _error(lambda: ulysses_group_attention(odd_heads, odd_heads, odd_heads, ids)),
        "unequal_shards": _error(
            lambda: ulysses_moga_attention(
                *(3 * [longer if rank == 0 else q]),
                torch.randn(1, n + 1, M) if rank == 0 else logits,
                backend="torch",
            )
        ),
        "one_rank_bad_logits": _error(
            lambda: ulysses_moga_attention(q, q, q, logits[:, :2] if rank == 1 else logits, backend="torch")
        ),
        "top_k_disagrees": _error(lambda: ulysses_moga_attention(q, q, q, logits, top_k=1 + rank % 2)),
        "bad_top_k": _error(lambda: ulysses_moga_attention(q, q, q, logits, top_k=M + 1)),
        "bad_num_groups": _error(lambda: ulysses_group_attention(q, q, q, ids, num_groups=0)),
    }


def _cases(world: int) -> dict[str, Callable[[int], dict]]:
    cases = {
        "moga_top1": lambda r: _moga_case(world, r, Hq=world, Hkv=world, M=4, top_k=1, seed=1),
        "moga_top2_gqa": lambda r: _moga_case(world, r, Hq=2 * world, Hkv=world, M=4, top_k=2, seed=2),
        "moga_top1_gqa_unchecked": lambda r: _moga_case(
            world, r, Hq=2 * world, Hkv=world, M=3, top_k=1, seed=3, check_shards=False
        ),
        "moga_bf16": lambda r: _bf16_case(world, r),
        "moga_dense_m1": lambda r: _moga_case(world, r, Hq=world, Hkv=world, M=1, top_k=1, seed=4),
        "group_num_groups": lambda r: _group_case(world, r, Hq=world, Hkv=world, num_groups=6, seed=5),
        "group_gqa_unique_ids": lambda r: _group_case(world, r, Hq=2 * world, Hkv=world, num_groups=None, seed=6),
        "strided_inputs": lambda r: _strided_case(world, r),
        "interop_emulated": lambda r: _interop_case(world, r),
        "interop_deepspeed": lambda r: _interop_case_with("deepspeed", world, r),
        "interop_yunchang": lambda r: _interop_case_with("yunchang", world, r),
        "errors": lambda r: _error_cases(world, r),
        "helpers": lambda r: _helpers_case(world, r),
    }
    if world % 2 == 0 and world > 2:
        cases["subgroups"] = lambda r: _subgroup_case(world, r)
    return cases


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A collective that is never matched fails after the timeout instead of hanging the test.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, case in _cases(world).items():
            torch.manual_seed(0)
            try:
                results[name] = case(rank)
            except Exception:  # recorded and reported by the pytest side
                results[name] = {"exception": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The pytest side.


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def records(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """Spawn ``world`` gloo processes once; return (world, per-rank result dicts)."""
    world = request.param
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp(f"ulysses{world}"))
    return world, spawn_ranks(_worker, world, (world, free_port(), out_dir), out_dir, SPAWN_TIMEOUT_S)


WITH_LOGITS = ("out", "dq", "dk", "dv", "dx")  # dx: the router-logit gradient
NUMERIC_CASES = {
    "moga_top1": WITH_LOGITS,
    "moga_top2_gqa": WITH_LOGITS,
    "moga_top1_gqa_unchecked": WITH_LOGITS,
    "moga_dense_m1": WITH_LOGITS,
    "group_num_groups": ("out", "dq", "dk", "dv"),
    "group_gqa_unique_ids": ("out", "dq", "dk", "dv"),
    "strided_inputs": ("out", "dqkv", "dx"),
    "interop_emulated": WITH_LOGITS,
    "interop_deepspeed": WITH_LOGITS,  # skipped unless deepspeed is installed
    "interop_yunchang": WITH_LOGITS,  # skipped unless yunchang is installed
}


@pytest.mark.parametrize("case", sorted(NUMERIC_CASES))
def test_matches_single_process(records, case: str) -> None:
    """Output and q/k/v/logit gradient shards equal single-process moga's, every buffer written."""
    world, per_rank = records
    for rank, results in enumerate(per_rank):
        res = results[case]
        if "skipped" in res:
            pytest.skip(res["skipped"])
        assert "exception" not in res, f"rank {rank}:\n{res.get('exception')}"
        assert res["nan"] == 0, f"rank {rank}: {res['nan']} unwritten (NaN) elements"
        expected = set(NUMERIC_CASES[case])
        assert expected == res.keys() - {"nan"}, f"rank {rank}: got {sorted(res)}"
        for key in expected:
            assert res[key] < TOL_FP32, f"world {world} rank {rank} {case}: {key} rel err {res[key]:.2e}"


def test_bf16_within_twice_single_process_error(records) -> None:
    """bf16 sharded vs float64: no worse than 2x single-process bf16 moga (out, q/k/v and logit gradients)."""
    world, per_rank = records
    for rank, results in enumerate(per_rank):
        res = results["moga_bf16"]
        assert "exception" not in res, f"rank {rank}:\n{res.get('exception')}"
        assert res["nan"] == 0
        for key in ("out", "dq", "dk", "dv", "dx"):
            sp, single = res["sp_" + key], res["single_" + key]
            assert 0 < single < 0.05, f"rank {rank} {key}: implausible bf16 error {single:.2e}"
            assert sp <= 2 * single, f"world {world} rank {rank} {key}: sharded {sp:.2e} vs single {single:.2e}"


def test_subgroups(records) -> None:
    """A sequence-parallel group smaller than the world (group= argument, ranks numbered within the group)."""
    world, per_rank = records
    if world < 4:
        pytest.skip("needs two pairs of ranks")
    for rank, results in enumerate(per_rank):
        res = results["subgroups"]
        assert "exception" not in res, f"rank {rank}:\n{res.get('exception')}"
        for key in ("out", "dq", "dk", "dv", "dx"):
            assert res[key] < TOL_FP32, f"rank {rank}: {key} rel err {res[key]:.2e}"
        assert res["nan"] == 0


def test_collectives_move_the_documented_slices(records) -> None:
    world, per_rank = records
    for rank, results in enumerate(per_rank):
        res = results["helpers"]
        assert "exception" not in res, f"rank {rank}:\n{res.get('exception')}"
        assert set(res) == {"sequence_to_heads", "qkv_to_heads", "heads_to_sequence", "gather_sequence"}
        assert all(v == 0.0 for v in res.values()), f"rank {rank}: {res}"


ERROR_EXPECTATIONS = {
    # case: (exception type, a phrase every rank's message must contain)
    "q_heads": ("ValueError", "divisible by the world size"),
    "kv_heads": ("ValueError", "kv heads (1)"),
    "group_heads": ("ValueError", "divisible by the world size"),
    "unequal_shards": ("ValueError", "shard seqlen"),
    "top_k_disagrees": ("ValueError", "top_k"),
    "bad_top_k": ("ValueError", "top_k"),
    "bad_num_groups": ("ValueError", "num_groups"),
}


@pytest.mark.parametrize("case", sorted(ERROR_EXPECTATIONS))
def test_bad_inputs_raise_on_every_rank(records, case: str) -> None:
    world, per_rank = records
    kind, phrase = ERROR_EXPECTATIONS[case]
    for rank, results in enumerate(per_rank):
        errors = results["errors"]
        assert "exception" not in errors, f"rank {rank}:\n{errors.get('exception')}"
        got = errors[case]
        assert got is not None, f"rank {rank} did not raise for {case}"
        assert got[0] == kind and phrase in got[1], f"rank {rank} {case}: {got}"


def test_one_bad_rank_makes_every_rank_raise(records) -> None:
    """Rank 1 alone passes logits of the wrong shape: it raises its own error, the others name rank 1."""
    world, per_rank = records
    for rank, results in enumerate(per_rank):
        got = results["errors"]["one_rank_bad_logits"]
        assert got is not None and got[0] == "ValueError", f"rank {rank}: {got}"
        expected = "router_logits" if rank == 1 else "rank(s) [1] rejected"
        assert expected in got[1], f"rank {rank}: {got}"


def test_requires_initialised_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_moga_attention(q, q, q, torch.randn(1, 4, 3))
