"""Ulysses sequence parallelism for MoGA (DeepSpeed-Ulysses layout, arXiv 2309.14509).

Every rank of a process group of size P holds a contiguous shard of the sequence: rank r holds tokens
``[r * N/P, (r + 1) * N/P)`` of q, k, v (B, N/P, H, D) and of the router logits (B, N/P, M). Attention needs
whole groups, and a routed group spans the whole sequence, so each call

1. all-to-alls q, k, v (packed into one collective) from sequence shards to head shards: every rank gets all
   N tokens of H/P heads, rank r the heads ``[r * H/P, (r + 1) * H/P)`` (and the matching kv heads);
2. all-gathers the router logits, so every rank routes the full sequence identically (each token's routing
   is computed once, from the logits its owner produced);
3. runs :func:`moga.moga_attention` (or :func:`moga.group_attention`) on the full sequence for its heads;
4. all-to-alls the output back to sequence shards.

Backward is the reverse: the all-to-all is its own adjoint, and the all-gather's adjoint is a reduce-scatter:
the rank holding heads h contributes ``sum_h dO . SA`` to dL/dp of *every* token, so each token's logit
gradient is the SUM over ranks of their parts, delivered to the rank that owns the token.

All collectives are ``all_to_all_single`` and ``all_gather_single`` (``all_gather_into_tensor`` on older
torch), which NCCL and gloo both implement. With equal shards nothing here reads tensor values on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moga import _alloc
from moga._checks import (
    FLOAT_DTYPES,
    check_group_ids,
    check_num_groups,
    check_qkv,
    check_router_logits,
    check_top_k,
    softmax_scale_or_default,
)
from moga.functional import group_attention, moga_attention

ProcessGroup = Any  # torch.distributed.ProcessGroup; None means the default group

# torch >= 2.13 deprecates all_gather_into_tensor in favour of all_gather_single; the GPU image has torch 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _world(group: ProcessGroup) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("moga.distributed needs torch.distributed.init_process_group() to have been called")
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """Exchange chunk j of dim 0 with rank j: ``out[j]`` on rank r is ``x[r]`` on rank j.

    x: (P, ...) -> (P, ...), same shape. The map is its own adjoint, so backward applies it to the gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = _alloc.empty(*x.shape, dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllToAll.apply(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    """Stack every rank's x: (...) -> (P, ...), ``out[j]`` = x of rank j.

    Backward is a reduce-scatter: rank j receives every rank's gradient for slot j and sums them. It is an
    all-to-all plus a local sum (the same traffic as ``reduce_scatter_tensor``) so that backward needs no
    collective beyond the two used forward, and the sum runs in rank order, in float32 for half-precision
    inputs, identically on every backend.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        _, world = _world(group)
        x = x.contiguous()
        # The concatenated output form: gloo rejects the stacked (P, ...) form that NCCL accepts.
        out = _alloc.empty(world * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        parts = _AllToAll.apply(grad, ctx.group)  # parts[j]: rank j's gradient for this rank's slot
        acc = parts.float() if parts.dtype in (torch.float16, torch.bfloat16) else parts
        return acc.sum(0).to(grad.dtype), None


def sequence_to_heads(x: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Sequence shard -> head shard. x (B, N/P, H, D) -> (B, N, H/P, D): all tokens, this rank's heads.

    Differentiable (backward is :func:`heads_to_sequence`). H must be divisible by P.
    """
    _check_4d("sequence_to_heads", x)
    return _pack_to_heads([x], group)[0]


def qkv_to_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sequence_to_heads` of q (B, N/P, Hq, D) and k, v (B, N/P, Hkv, D) in ONE all-to-all.

    Returns q (B, N, Hq/P, D), k and v (B, N, Hkv/P, D): rank r holds q heads ``[r * Hq/P, (r + 1) * Hq/P)``
    and kv heads ``[r * Hkv/P, (r + 1) * Hkv/P)``, so GQA's head map h -> h // (Hq/Hkv) stays local.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(f"qkv_to_heads: {name}", t)
    q_h, k_h, v_h = _pack_to_heads([q, k, v], group)
    return q_h, k_h, v_h


def heads_to_sequence(x: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Head shard -> sequence shard. x (B, N, H/P, D) -> (B, N/P, H, D). Differentiable. N must be divisible by P."""
    _check_4d("heads_to_sequence", x)
    _, world = _world(group)
    B, N, h = x.shape[:3]
    if N % world:
        raise ValueError(f"heads_to_sequence: seqlen {N} of x {tuple(x.shape)} is not divisible by world size {world}")
    n = N // world
    # (B, N, h, ...) -> (P, B, n, h, ...): chunk j holds the tokens rank j owns.
    chunks = x.reshape(B, world, n, *x.shape[2:]).transpose(0, 1)
    got = _AllToAll.apply(chunks, group)  # got[j]: my tokens, heads of rank j
    # (P, B, n, h, ...) -> (B, n, P, h, ...) -> (B, n, P * h, ...): heads in global order.
    return got.permute(1, 2, 0, *range(3, got.dim())).reshape(B, n, world * h, *x.shape[3:])


def gather_sequence(x: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """All-gather sequence shards. x (B, N/P, ...) -> (B, N, ...), identical on every rank.

    Differentiable: backward sums every rank's gradient of the full tensor and returns this rank's slice,
    which is what a tensor used redundantly by all ranks (e.g. router logits) needs.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"gather_sequence: x must be a (batch, seqlen, ...) tensor, got {shape}")
    _, world = _world(group)
    stacked = _AllGather.apply(x, group)  # (P, B, n, ...)
    B, n = x.shape[:2]
    return stacked.transpose(0, 1).reshape(B, world * n, *x.shape[2:])


def _check_4d(name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a (batch, seqlen, heads, headdim) tensor, got {shape}")


def _pack_to_heads(tensors: list[torch.Tensor], group: ProcessGroup) -> list[torch.Tensor]:
    """sequence_to_heads for several (B, n, H_i, D) tensors in ONE all-to-all (they share B, n, D)."""
    _, world = _world(group)
    B, n, _, D = tensors[0].shape
    for t in tensors[1:]:
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, n, D):
            raise ValueError(
                f"qkv_to_heads: shapes {[tuple(t.shape) for t in tensors]} differ in batch, seqlen or headdim"
            )
    heads = []
    for t in tensors:
        if t.shape[2] % world:
            raise ValueError(f"sequence_to_heads: heads {t.shape[2]} of {tuple(t.shape)} not divisible by {world}")
        heads.append(t.shape[2] // world)
    # (B, n, H, D) -> (P, B, n, H/P, D) per tensor, concatenated on the head axis: chunk j goes to rank j.
    chunked = [t.reshape(B, n, world, h, D).permute(2, 0, 1, 3, 4) for t, h in zip(tensors, heads, strict=True)]
    packed = torch.cat(chunked, dim=3)
    got = _AllToAll.apply(packed, group)  # got[j]: rank j's tokens, my heads
    full = got.transpose(0, 1).reshape(B, world * n, sum(heads), D)
    return list(torch.split(full, heads, dim=2))


def _dtype_code(t: Any) -> int:
    return FLOAT_DTYPES.index(t.dtype) if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES else -1


def _metadata_device(group: ProcessGroup, like: Any) -> torch.device:
    """A device the group's backend can communicate on."""
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.device.type != "cpu":
        return like.device
    return torch.device("cuda", torch.cuda.current_device())


def _agree(name: str, group: ProcessGroup, check_local: Callable[[], list[int]], like: Any, check_shards: bool) -> None:
    """Validate this rank's inputs, then (if check_shards) make every rank raise when any rank's inputs are bad.

    ``check_local`` raises TypeError/ValueError for bad local inputs or returns the shard's shape signature
    [B, n, Hq, Hkv, D, M, dtype, top_k]. A rank that raised alone would leave the others waiting forever in
    the all-to-all, so the signatures (and an ok flag) are all-gathered (one tiny collective; reading it back
    is a host synchronisation) and every rank raises the same ValueError on any disagreement.
    """
    _, world = _world(group)
    error: Exception | None = None
    try:
        signature = check_local()
    except (TypeError, ValueError) as exc:
        error, signature = exc, [0] * 8
    if not check_shards or world == 1:
        if error is not None:
            raise error
        return
    mine = torch.tensor([int(error is None), *signature], dtype=torch.int64, device=_metadata_device(group, like))
    table = _AllGather.apply(mine, group).tolist()
    bad = [r for r, row in enumerate(table) if not row[0]]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{name}: rank(s) {bad} rejected their inputs (see the error raised on those ranks)")
    labels = ("batch", "shard seqlen", "q heads", "kv heads", "headdim", "num_groups", "dtype", "top_k")
    for i, label in enumerate(labels):
        values = [row[i + 1] for row in table]
        if len(set(values)) > 1:
            hint = (
                f"; the global sequence length must be divisible by the world size {world} (pad it)"
                if label == "shard seqlen"
                else ""
            )
            raise ValueError(f"{name}: ranks disagree on {label}: {values} (rank order){hint}")


def _local_signature(q: Any, k: Any, v: Any, softmax_scale: float | None, world: int) -> list[int]:
    B, n, Hq, Hkv, D = check_qkv(q, k, v)
    softmax_scale_or_default(softmax_scale, D)
    if Hq % world or Hkv % world:
        raise ValueError(
            f"Ulysses shards heads over the {world} ranks: q heads ({Hq}) and kv heads ({Hkv}) must both be "
            f"divisible by the world size {world}"
        )
    return [B, n, Hq, Hkv, D, 0, _dtype_code(q), 0]


def ulysses_moga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    top_k: int = 1,
    softmax_scale: float | None = None,
    group: ProcessGroup = None,
    backend: str = "auto",
    deterministic: bool = False,
    check_shards: bool = True,
) -> torch.Tensor:
    """:func:`moga.moga_attention` over a sequence sharded across the ranks of ``group`` (Ulysses).

    Call it on every rank of ``group`` (size P) with that rank's contiguous shard: rank r holds tokens
    ``[r * N/P, (r + 1) * N/P)``. Groups span the whole sequence, across ranks.

    Args:
        q: (B, N/P, Hq, D). k, v: (B, N/P, Hkv, D). Hq and Hkv must be divisible by P.
        router_logits: (B, N/P, M), this rank's tokens' logits.
        top_k, softmax_scale, backend, deterministic: as in :func:`moga.moga_attention` (run on each rank's heads).
        group: the sequence-parallel process group (None: the default group).
        check_shards: all-gather the shard shapes first (one tiny collective and one host synchronisation)
            so that unequal shards (N not divisible by P) or mismatched shapes raise ValueError on every rank
            instead of hanging or corrupting; pass False once shapes are known to agree.

    Returns: (B, N/P, Hq, D), this rank's shard of ``moga.moga_attention`` on the whole sequence.
    Differentiable in q, k, v and router_logits; each gradient is this rank's shard of the full gradient.

    Raises: ValueError when Hq or Hkv is not divisible by P, when shards differ across ranks, or for any
    argument :func:`moga.moga_attention` rejects.
    """
    _, world = _world(group)

    def check_local() -> list[int]:
        signature = _local_signature(q, k, v, softmax_scale, world)
        signature[5] = check_router_logits(router_logits, signature[0], signature[1], q.device)
        check_top_k(top_k, signature[5])
        signature[7] = top_k
        return signature

    _agree("ulysses_moga_attention", group, check_local, q, check_shards)
    options = dict(top_k=top_k, softmax_scale=softmax_scale, backend=backend, deterministic=deterministic)
    if world == 1:
        return moga_attention(q, k, v, router_logits, **options)
    q_h, k_h, v_h = qkv_to_heads(q, k, v, group)
    logits = gather_sequence(router_logits, group)  # (B, N, M), identical on every rank
    out = moga_attention(q_h, k_h, v_h, logits, **options)
    return heads_to_sequence(out, group)


def ulysses_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    num_groups: int | None = None,
    group: ProcessGroup = None,
    backend: str = "auto",
    deterministic: bool = False,
    check_shards: bool = True,
) -> torch.Tensor:
    """:func:`moga.group_attention` over a sequence sharded across the ranks of ``group`` (Ulysses).

    Args:
        q: (B, N/P, Hq, D). k, v: (B, N/P, Hkv, D). Hq and Hkv must be divisible by P.
        group_ids: (B, N/P) integer ids of this rank's tokens (negative: padding). Ids are global: tokens
            with equal ids attend to each other whichever rank owns them.
        softmax_scale, num_groups, backend, deterministic: as in :func:`moga.group_attention`.
        group, check_shards: as in :func:`ulysses_moga_attention`.

    Returns: (B, N/P, Hq, D), this rank's shard of ``moga.group_attention`` on the whole sequence.
    Differentiable in q, k and v.
    """
    _, world = _world(group)

    def check_local() -> list[int]:
        signature = _local_signature(q, k, v, softmax_scale, world)
        check_group_ids(group_ids, signature[0], signature[1], q.device)
        check_num_groups(num_groups)
        signature[5] = -1 if num_groups is None else num_groups
        return signature

    _agree("ulysses_group_attention", group, check_local, q, check_shards)
    options = dict(softmax_scale=softmax_scale, num_groups=num_groups, backend=backend, deterministic=deterministic)
    if world == 1:
        return group_attention(q, k, v, group_ids, **options)
    q_h, k_h, v_h = qkv_to_heads(q, k, v, group)
    ids = gather_sequence(group_ids, group)  # (B, N): integer, so no gradient flows through the gather
    out = group_attention(q_h, k_h, v_h, ids, **options)
    return heads_to_sequence(out, group)
