"""The MoGA router: one linear layer, top-k routing and the group balance loss (paper Eqs. 2-8)."""

from __future__ import annotations

import math

import torch
from torch import nn

from moga._checks import check_top_k


class MoGARouter(nn.Module):
    """The lightweight router: one linear layer from the hidden state to group logits.

    ``forward(x)``: x (..., dim) -> logits (..., num_groups). Softmax and top-k happen in
    :func:`moga.moga_attention`, which takes these logits.
    """

    def __init__(self, dim: int, num_groups: int, bias: bool = False) -> None:
        super().__init__()
        if dim < 1 or num_groups < 1:
            raise ValueError(f"dim and num_groups must be positive, got dim={dim}, num_groups={num_groups}")
        self.dim = dim
        self.num_groups = num_groups
        self.proj = nn.Linear(dim, num_groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"router input must have last dim {self.dim}, got shape {tuple(x.shape)}")
        return self.proj(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_groups={self.num_groups}, bias={self.proj.bias is not None}"

    @classmethod
    def from_kmeans(
        cls,
        x: torch.Tensor,
        num_groups: int,
        *,
        temperature: float | None = None,
        iters: int = 20,
        seed: int = 0,
        init: str = "kmeans++",
    ) -> MoGARouter:
        """A router initialised from k-means on calibration hidden states: a warm start for the paper's training.

        With centroids c_1..c_M of :func:`moga.kmeans` on the tokens of ``x``, the router (with bias) computes
        ``logits_m = (x.c_m - |c_m|^2 / 2) / temperature``, whose argmax is the nearest centroid: before any
        training its top-1 groups are the k-means clusters of the calibration tokens (equal to the labels
        :func:`moga.kmeans` returns for the same arguments). Training then proceeds as for a freshly
        initialised router (the gate and the balance loss).

        Args:
            x: (..., dim) calibration hidden states (e.g. a few batches of a layer's inputs); all leading dims
                are flattened into one set of tokens, at least ``num_groups`` of them.
            num_groups: M.
            temperature: divides the logits so that the initial gates p = softmax(logits) are not flat. None
                picks one from the data: the median gap between each token's best and second-best logit,
                halved, rounded to a power of two (a median top-1 / top-2 probability ratio of about e^2). A
                power of two scales the scores exactly, so the argmax equals the k-means labels (tested on the
                CPU; on CUDA the router's GEMM and k-means' batched GEMM may round an exact near-tie
                differently); other values can also flip near-ties through rounding.
            iters, seed, init: passed to :func:`moga.kmeans`.

        Returns: a ``MoGARouter(dim, num_groups, bias=True)`` on x's device, float32 parameters (float64 for
        float64 x).
        """
        from moga.kmeans import kmeans

        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("x must be a tensor of shape (..., dim) with at least one leading dim")
        tokens = x.detach().reshape(1, -1, x.shape[-1])
        _, centroids = kmeans(tokens, num_groups, iters=iters, seed=seed, init=init)
        c = centroids[0]  # (M, dim)
        half_sq = 0.5 * c.square().sum(-1)
        if temperature is None:
            temperature = _auto_temperature(tokens[0].to(c.dtype), c, half_sq)
        elif not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        router = cls(x.shape[-1], num_groups, bias=True).to(device=x.device, dtype=c.dtype)
        with torch.no_grad():
            router.proj.weight.copy_(c / temperature)
            router.proj.bias.copy_(-half_sq / temperature)
        return router


def _auto_temperature(tokens: torch.Tensor, c: torch.Tensor, half_sq: torch.Tensor) -> float:
    """Half the median best-minus-second logit gap of the tokens, rounded to a power of two (1.0 when M = 1 or
    the gaps vanish). One host read of the median."""
    if c.shape[0] < 2:
        return 1.0
    gaps = []
    for a in range(0, tokens.shape[0], 1 << 16):
        top2 = torch.addmm(-half_sq, tokens[a : a + (1 << 16)], c.t()).topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    gap = float(torch.cat(gaps).median())
    if not gap > 0 or gap == float("inf"):
        return 1.0
    return float(2.0 ** round(math.log2(gap / 2)))


def _check_logits(router_logits: torch.Tensor) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if not router_logits.dtype.is_floating_point:
        raise TypeError(f"router_logits must be a floating-point tensor, got {router_logits.dtype}")
    if router_logits.dim() < 1 or router_logits.shape[-1] < 1:
        raise ValueError(
            f"router_logits must have shape (..., num_groups) with num_groups >= 1, got {tuple(router_logits.shape)}"
        )


def _check_finite_logits(router_logits: torch.Tensor) -> None:
    """ValueError when some token's softmax would be NaN: a NaN or +inf logit, or no logit above -inf."""
    logits = router_logits.detach()
    bad = (logits.isnan() | (logits == float("inf"))).any(-1) | (logits == float("-inf")).all(-1)
    num_bad = int(bad.sum())  # the one host read
    if num_bad:
        raise ValueError(
            f"router_logits: {num_bad} of {bad.numel()} tokens have a NaN or +inf logit, or only -inf logits "
            "(their softmax, the gate and the balance loss are NaN)"
        )


def route_tokens(router_logits: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax the router logits and pick each token's top_k groups.

    Args:
        router_logits: (..., M) float, usually (B, N, M).
        top_k: groups per token, in [1, M].

    Returns:
        probs: (..., M) float32 (float64 for float64 logits), p = softmax(logits).
        groups: (..., top_k) int64, most probable first; ties go to the lower group index.
        gates: (..., top_k), ``probs`` at ``groups`` (differentiable: the router's only gradient path).
    """
    _check_logits(router_logits)
    check_top_k(top_k, router_logits.shape[-1])
    compute_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(router_logits.to(compute_dtype), dim=-1)
    # A stable descending sort keeps equal probabilities in index order: ties go to the lower group.
    # (contiguous: gather saves its index for backward, and a slice would keep all M sort indices alive)
    groups = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k].contiguous()
    gates = probs.gather(-1, groups)
    return probs, groups, gates


def group_balance_loss(
    router_logits: torch.Tensor, top_k: int = 1, *, form: str = "paper", check_finite: bool = False
) -> torch.Tensor:
    """Auxiliary loss that keeps groups balanced: L = M * sum_i F_i * P_i (multiply by alpha, 0.1 in the paper).

    With N the number of tokens of the whole batch and g(x) the top_k groups of token x:

    * F_i = (1/N) * #{x : i in g(x)}, the fraction of tokens assigned to group i (no gradient);
    * ``form="paper"``: P_i = (1/N) * sum over tokens x with i in g(x) of p(i|x) (the paper's Eq. 8 as printed);
    * ``form="switch"``: P_i = (1/N) * sum over all tokens x of p(i|x) (Switch Transformer's form).

    Perfectly balanced top-1 routing with confident probabilities gives about 1 for both forms.

    Non-finite logits: one NaN or +inf logit (or a token whose logits are all -inf) makes that token's softmax
    NaN, and the loss is then NaN too, silently by default (as the attention output of such a token is NaN:
    :func:`moga.moga_attention` does not check either). ``check_finite=True`` raises a ValueError instead,
    at the price of one host synchronisation per call (on a GPU); -inf logits on a token that also has finite
    ones are allowed (they mean "never this group").

    Args:
        router_logits: (..., M) float.
        top_k: groups per token, in [1, M].
        form: "paper" or "switch", see above.
        check_finite: raise a ValueError, naming how many tokens are affected, when some token's softmax is
            not finite (a NaN or +inf logit, or all of its logits -inf).
    Returns: a scalar tensor (float32, or float64 for float64 logits).
    """
    if form not in ("paper", "switch"):
        raise ValueError(f"form must be 'paper' or 'switch', got {form!r}")
    _check_logits(router_logits)
    if check_finite:
        _check_finite_logits(router_logits)
    M = router_logits.shape[-1]
    logits = router_logits.reshape(-1, M)
    probs, groups, _ = route_tokens(logits.unsqueeze(0), top_k)
    return balance_loss_of_routing(probs[0], groups[0], form=form)


def balance_loss_of_routing(probs: torch.Tensor, groups: torch.Tensor, *, form: str = "paper") -> torch.Tensor:
    """:func:`group_balance_loss` of a routing already computed by :func:`route_tokens` (no second routing).

    Args:
        probs: (..., M) routing probabilities.
        groups: (..., top_k) int64, each token's groups.
        form: "paper" or "switch" (see :func:`group_balance_loss`).
    Returns: a scalar tensor; the gradient flows through ``probs``.
    """
    if form not in ("paper", "switch"):
        raise ValueError(f"form must be 'paper' or 'switch', got {form!r}")
    M = probs.shape[-1]
    probs, groups = probs.reshape(-1, M), groups.reshape(-1, groups.shape[-1])
    n = max(probs.shape[0], 1)
    assigned = torch.zeros_like(probs).scatter_(-1, groups, 1.0)  # (N, M), 1 where i in g(x)
    fraction = assigned.sum(0) / n
    if form == "paper":
        prob_mass = (probs * assigned).sum(0) / n
    else:
        prob_mass = probs.sum(0) / n
    return M * (fraction * prob_mass).sum()
