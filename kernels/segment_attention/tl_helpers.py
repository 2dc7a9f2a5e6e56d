"""Small Triton helpers shared by the segment-attention kernels."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. IEEE: exact fp32 products (fp32 inputs must not silently become tf32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def load_tile(Tiles, i_tile):
    """Row ``i_tile`` of a tile table (see ``tiles.py``): int64 (tile_start, segment_end, other_start, other_end)."""
    p_tile = Tiles + i_tile.to(tl.int64) * 4
    return tl.load(p_tile + 0), tl.load(p_tile + 1), tl.load(p_tile + 2), tl.load(p_tile + 3)


@triton.jit
def row_ptrs(Base, rows, i_h, stride_t, stride_h, offs_d):
    """[len(rows), D] pointers to ``Base[rows, i_h, :]`` (int64 addressing).

    Each row starts 16-byte aligned: the launchers guarantee an aligned base and token/head strides that are
    multiples of 16 bytes (see ``aligned_rows``). Saying so lets the compiler use vector loads for gathered
    rows whatever the runtime argument specialisation, and keeps gathered tiles from spilling registers.
    """
    p_x = Base + rows[:, None] * stride_t + i_h.to(tl.int64) * stride_h + offs_d[None, :]
    return tl.multiple_of(p_x, [1, 16])


@triton.jit
def load_rows(Base, rows, i_h, stride_t, stride_h, offs_d, mask, UPCAST: tl.constexpr):
    """Gather token rows ``Base[rows, i_h, :]`` as a [len(rows), D] tile, zeros where ``mask`` is false.

    UPCAST: return fp32 (the Triton interpreter's bf16 tl.dot is wrong, so bf16 tiles are upcast there only).
    """
    b_x = tl.load(row_ptrs(Base, rows, i_h, stride_t, stride_h, offs_d), mask=mask[:, None], other=0.0)
    if UPCAST:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def finish_softmax(b_acc, b_sum, b_max):
    """The end of an online softmax in base 2: out [BM, D] = acc / sum, lse [BM] = natural-log sum-exp of the
    scores. Rows that saw no key (sum 0) give zero outputs and lse = -inf."""
    has_keys = b_sum > 0.0
    # [BM]
    b_safe_sum = tl.where(has_keys, b_sum, 1.0)
    # [BM, D]
    b_out = b_acc / b_safe_sum[:, None]
    # [BM] ln(sum 2^s) = (max + log2(sum)) * ln(2)
    b_lse = tl.where(has_keys, (b_max + tl.log2(b_safe_sum)) * 0.6931471805599453, float("-inf"))
    return b_out, b_lse
