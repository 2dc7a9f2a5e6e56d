"""MoGA processors for diffusers' joint text-video (MMDiT) transformers, and for LTX-Video.

HunyuanVideo, CogVideoX and Mochi run text and video tokens through one attention. Each processor here
reproduces its stock processor's projections, QK norms and rotary embedding, then calls the one shared core,
:func:`moga.integrations._core.joint_moga_attention` (routed and static branches on the video tokens, text global,
padded text never a key). They differ only in how their model lays out the joint sequence:

============  ==============  ==========================  =====================================================
family        order           text padding                padded text queries
============  ==============  ==========================  =====================================================
HunyuanVideo  video, text     (B, 1, 1, N) key mask       attend (as the stock key-padding mask)
CogVideoX     text, video     none (fixed-length text)    (no padding)
Mochi         video, text     (B, Nt) text mask           output 0 (the stock processor drops them)
============  ==============  ==========================  =====================================================

LTX-Video has separate cross-attention like Wan: its self-attention (``attn1``) holds video tokens only and
:class:`MoGALTXAttnProcessor` runs :func:`moga.modules.moga_layer_attention` on it, under diffusers' Ulysses
context parallelism too (the shared path of the Wan processor).

The joint processors do not support diffusers' context parallelism yet (they raise NotImplementedError; diffusers
0.42.1 has no context-parallel plan for these models either).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moga.integrations._core import MoGAProcessorBase, joint_moga_attention
from moga.router import route_tokens


class _JointProcessor(MoGAProcessorBase):
    """Runs the shared joint core on (video, text) q/k/v built by a family's processor."""

    def _joint(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logits: torch.Tensor,
        *,
        num_text: int,
        video_first: bool,
        text_valid: torch.Tensor | None,
        pad_queries: str,
    ) -> torch.Tensor:
        self._refuse_context_parallel()
        routing = route_tokens(logits, self.top_k)  # once: the routed branch and the statistics share it
        out = joint_moga_attention(
            q, k, v, logits, num_text=num_text, video_first=video_first, text_valid=text_valid,
            pad_queries=pad_queries, top_k=self.top_k, grid=self.state.grid, window=self.window,
            frame_attention=self.frame_attention, shot_starts=self.state.shot_starts,
            context_frames=self.context_frames, backend=self.backend, routing=routing,
        )  # fmt: skip
        self._record_routing(logits, routing)
        return out.flatten(2, 3).to(q.dtype)


class MoGAHunyuanVideoAttnProcessor(_JointProcessor):
    """HunyuanVideo's joint attention (dual-stream ``transformer_blocks.<i>.attn`` with ``add_q_proj``, and
    single-stream ``single_transformer_blocks.<i>.attn`` on the concatenated sequence). Joint order: video, text.
    ``attention_mask`` is the model's (B, 1, 1, N) bool key mask; its text part marks the padded text."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        shot_starts: Any = None,  # noqa: ARG002 (read from the transformer call by apply_moga's hook)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} needs the text tokens (encoder_hidden_states)")
        Nv, Nt = hidden_states.shape[1], encoder_hidden_states.shape[1]
        joint_input = attn.add_q_proj is None  # single-stream block: one projection over video and text
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if joint_input else hidden_states
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            rot = lambda t: apply_rotary_emb(t, image_rotary_emb, sequence_dim=1)  # noqa: E731
            q = torch.cat([rot(q[:, :Nv]), q[:, Nv:]], dim=1)
            k = torch.cat([rot(k[:, :Nv]), k[:, Nv:]], dim=1)
        if not joint_input:
            projs = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for proj in projs)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        text_valid = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.shape != (q.shape[0], 1, 1, Nv + Nt):
                raise ValueError(
                    f"{type(self).__name__} takes HunyuanVideo's (B, 1, 1, N) bool key-padding mask, got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            text_valid = attention_mask[:, 0, 0, Nv:]
        logits = self._router_logits(attn, hidden_states, k[:, :Nv])
        out = self._joint(q, k, v, logits, num_text=Nt, video_first=True, text_valid=text_valid, pad_queries="attend")
        video, text = out[:, :Nv], out[:, Nv:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text


class MoGACogVideoXAttnProcessor(_JointProcessor):
    """CogVideoX's joint attention (``transformer_blocks.<i>.attn1``): one projection over text then video, QK
    LayerNorm, rotary embedding on the video tokens. CogVideoX has no text padding."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        shot_starts: Any = None,  # noqa: ARG002 (read from the transformer call by apply_moga's hook)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention_mask (CogVideoX passes none)")
        Nt = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :Nt], apply_rotary_emb(q[:, Nt:], image_rotary_emb, sequence_dim=1)], dim=1)
            k = torch.cat([k[:, :Nt], apply_rotary_emb(k[:, Nt:], image_rotary_emb, sequence_dim=1)], dim=1)
        logits = self._router_logits(attn, hidden_states, k[:, Nt:])
        out = self._joint(q, k, v, logits, num_text=Nt, video_first=False, text_valid=None, pad_queries="attend")
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, Nt:], out[:, :Nt]


def _rotate_pairs_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on channel pairs (2i, 2i+1) in float32, with one (cos, sin) per pair: Mochi's convention.
    x (B, N, H, D); cos, sin broadcastable to (B, N, H, D / 2)."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


class MoGAMochiAttnProcessor(_JointProcessor):
    """Mochi's joint attention (``transformer_blocks.<i>.attn1``): separate video and text projections and norms,
    rotary embedding on the video tokens. Joint order: video, text. ``attention_mask`` is the (B, Nt) text mask;
    padded text tokens are neither keys nor queries (their outputs are 0, as in the stock processor, which
    requires the valid text tokens to come first; this processor keeps every token at its own position)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        shot_starts: Any = None,  # noqa: ARG002 (read from the transformer call by apply_moga's hook)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        Nv, Nt = hidden_states.shape[1], encoder_hidden_states.shape[1]
        q, k, v = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        projs = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        eq, ek, ev = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for p in projs)
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        if image_rotary_emb is not None:
            q, k = _rotate_pairs_fp32(q, *image_rotary_emb), _rotate_pairs_fp32(k, *image_rotary_emb)
        text_valid = None
        if attention_mask is not None:
            if attention_mask.shape != (q.shape[0], Nt):
                raise ValueError(
                    f"{type(self).__name__} takes Mochi's (B, Nt) text mask, got {tuple(attention_mask.shape)}"
                )
            text_valid = attention_mask.bool()
        logits = self._router_logits(attn, hidden_states, k)
        out = self._joint(
            torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1), logits, num_text=Nt,
            video_first=True, text_valid=text_valid, pad_queries="zero",
        )  # fmt: skip
        video, text = out[:, :Nv], out[:, Nv:]
        video = attn.to_out[1](attn.to_out[0](video))
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return video, text


class MoGALTXAttnProcessor(MoGAProcessorBase):
    """LTX-Video's self-attention (``transformer_blocks.<i>.attn1``, video tokens only): RMS QK-norm over the full
    projections and LTX's rotary embedding as the stock processor, then :func:`moga.modules.moga_layer_attention`
    (with diffusers' Ulysses context parallelism when it is on).
    The grid is the transformer call's ``(num_frames, height, width)``."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None:
            raise ValueError(f"{type(self).__name__} is for self-attention: encoder_hidden_states must be None")
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention_mask (LTX's attn1 has none)")
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        out = self._layer_attention(q, k, v, self._router_logits(attn, hidden_states, k))
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))
