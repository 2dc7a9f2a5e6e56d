"""The bench's varlen entries: the ``recipe[varlen]`` baseline (argsort, gather, one varlen_attn call, scatter) and
``group_attention[varlen]`` in the methods list. On the CPU varlen_attn is replaced by the float64 stand-in of
tests/test_varlen_backend.py (same signature, asserts int32 cu_seqlens and segments within max_q/max_k)."""

from __future__ import annotations

import pytest
import torch

from moga.backends import varlen_backend
from moga.bench.baselines import varlen_recipe, varlen_recipe_reason
from moga.bench.cases import BenchCase, group_ids_from_sizes
from moga.bench.methods import methods_for
from moga.reference import group_attention_ref
from tests.test_varlen_backend import make_standin
from tests.utils import as_double_leaves, load_bench_script, rel_err


@pytest.mark.parametrize("sizes", [[150, 0, 97, 1, 52], [300]])  # ragged with empty and singleton; one group
def test_varlen_recipe_matches_reference(monkeypatch, sizes: list[int]) -> None:
    import torch.nn.attention.varlen as varlen_module

    calls: list = []
    monkeypatch.setattr(varlen_module, "varlen_attn", make_standin("2.11", calls))
    ids = group_ids_from_sizes(sizes, torch.Generator().manual_seed(3)).view(1, -1)
    n = ids.shape[1]
    q, k, v = (torch.randn(1, n, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = varlen_recipe(q, k, v, ids, len(sizes))
    dbl = as_double_leaves(q, k, v)
    ref = group_attention_ref(*dbl, ids)
    assert rel_err(out, ref) < 1e-12
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    for t, r in zip((q, k, v), dbl, strict=True):
        assert rel_err(t.grad, r.grad) < 1e-12
    assert calls[-1]["max_q"] == max(sizes)  # the recipe reads the largest group back: an exact bound


def test_varlen_recipe_reason() -> None:
    assert "CUDA-only" in varlen_recipe_reason(torch.device("cpu"), torch.bfloat16)
    assert "float16/bfloat16" in varlen_recipe_reason(torch.device("cuda"), torch.float32)
    assert varlen_recipe_reason(torch.device("cuda"), torch.bfloat16) is None


def _methods(device: torch.device, dtype: str) -> dict:
    case = BenchCase(n=64, m=4, distribution="balanced", heads=2, head_dim=64, dtype=dtype)
    return {m.name: m for m in methods_for(case, device, quick=True)}


def test_methods_list_the_varlen_recipe_and_backend(monkeypatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the CPU skip reasons do not apply")
    cpu = torch.device("cpu")
    methods = _methods(cpu, "float32")
    assert "CUDA-only" in methods["recipe[varlen]"].skip_reason
    assert methods["recipe[varlen]"].kind == "baseline"
    assert "group_attention[varlen]" not in methods  # not available here: listed once in the header instead
    # Where the backend is available it is listed like the others, with its own reason when it cannot run.
    monkeypatch.setattr(varlen_backend, "varlen_attn_override", make_standin("2.12", []))
    methods = _methods(cpu, "float32")
    assert "float16 and bfloat16" in methods["group_attention[varlen]"].skip_reason
    assert methods["group_attention[varlen]"].kind == "moga"
    methods = _methods(cpu, "bfloat16")
    assert methods["group_attention[varlen]"].skip_reason is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen_attn is CUDA-only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_varlen_recipe_matches_reference(dtype) -> None:
    from moga.bench.baselines import sorted_recipe

    if varlen_recipe_reason(torch.device("cuda"), dtype) is not None:
        pytest.skip(varlen_recipe_reason(torch.device("cuda"), dtype))
    sizes = [1500, 0, 970, 1, 520]
    ids = group_ids_from_sizes(sizes, torch.Generator().manual_seed(3)).view(1, -1).cuda()
    n = ids.shape[1]
    q, k, v = (torch.randn(1, n, 4, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref = group_attention_ref(q, k, v, ids)
    err = rel_err(varlen_recipe(q, k, v, ids, len(sizes)), ref)
    sdpa_err = rel_err(sorted_recipe(q, k, v, ids, len(sizes)), ref)
    assert err <= max(1e-3 if dtype == torch.float16 else 0.0, 2 * sdpa_err), (err, sdpa_err)


def test_varlen_bounds_script_refuses_cleanly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the script would run")
    mod = load_bench_script("varlen_bounds")
    assert mod.main([]) == 2
    for name, layout, n in mod._cases(torch.device("cpu")):  # the cases themselves are well-formed layouts
        assert layout.num_tokens == n and layout.q_index.numel() == n, name
