"""Tiny random configurations of the diffusers video transformers apply_moga supports (CPU, no downloads).

``FAMILIES[name]() -> (model, inputs)``: a fresh eval-mode model (weights from the current torch seed) and one
call's keyword arguments; ``OUTPUT`` picks the model output to compare. Text masks pad the second batch row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

diffusers = __import__("diffusers")

B = 2
WAN_ARGS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip
LATENT_5D = (B, 4, 3, 8, 8)  # post-patchify grid (3, 4, 4): 48 video tokens
GRID = (3, 4, 4)
TEXT = 6


def _text_mask() -> torch.Tensor:
    """(B, TEXT) valid-text mask: row 0 full, row 1 with its last two tokens padded (valid tokens first)."""
    mask = torch.ones(B, TEXT, dtype=torch.int64)
    mask[1, -2:] = 0
    return mask


def _wan_like(cls_name: str, **extra) -> Callable:
    def build():
        model = getattr(diffusers, cls_name)(**WAN_ARGS, **extra).eval()
        inputs = dict(
            hidden_states=torch.randn(LATENT_5D), timestep=torch.tensor([500, 300]),
            encoder_hidden_states=torch.randn(B, 5, 16),
        )  # fmt: skip
        if cls_name == "WanVACETransformer3DModel":
            inputs["control_hidden_states"] = torch.randn(LATENT_5D)
        return model, inputs

    return build


def _ltx():
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=2, caption_channels=16,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(B, 48, 4), encoder_hidden_states=torch.randn(B, TEXT, 16),
        timestep=torch.tensor([500, 300]), encoder_attention_mask=_text_mask(), num_frames=3, height=4, width=4,
    )  # fmt: skip
    return model, inputs


def _hunyuan_video(image_condition_type: str | None = None):
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12),
        image_condition_type=image_condition_type,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(LATENT_5D), timestep=torch.tensor([500, 300]),
        encoder_hidden_states=torch.randn(B, TEXT, 16), encoder_attention_mask=_text_mask(),
        pooled_projections=torch.randn(B, 8),
    )  # fmt: skip
    return model, inputs


def _cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip
    angles = torch.rand(48, 16) * 6.0
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    inputs = dict(
        hidden_states=torch.randn(B, 3, 4, 8, 8), encoder_hidden_states=torch.randn(B, TEXT, 16),
        timestep=torch.tensor([500, 300]), image_rotary_emb=(cos, sin),
    )  # fmt: skip
    return model, inputs


def _mochi():
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=TEXT,
    ).eval()  # fmt: skip
    inputs = dict(
        hidden_states=torch.randn(LATENT_5D), encoder_hidden_states=torch.randn(B, TEXT, 16),
        timestep=torch.tensor([500, 300]), encoder_attention_mask=_text_mask(),
    )  # fmt: skip
    return model, inputs


FAMILIES: dict[str, Callable] = {
    "SkyReelsV2Transformer3DModel": _wan_like("SkyReelsV2Transformer3DModel"),
    "WanVACETransformer3DModel": _wan_like("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=4),
    "ChronoEditTransformer3DModel": _wan_like("ChronoEditTransformer3DModel"),
    "LTXVideoTransformer3DModel": _ltx,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
    "CogVideoXTransformer3DModel": _cogvideox,
    "MochiTransformer3DModel": _mochi,
}


def output(model: torch.nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    return model(**inputs, **kwargs, return_dict=False)[0]


def hunyuan_video_token_replace():
    """HunyuanVideo I2V's token-replace variant (other block classes, the same attention)."""
    return _hunyuan_video("token_replace")


def skyreels_block_causal():
    """SkyReels-V2 with diffusion forcing's block-causal mask: 2 latent frames per causal block."""
    model = diffusers.SkyReelsV2Transformer3DModel(**WAN_ARGS, num_frame_per_block=2).eval()
    inputs = dict(
        hidden_states=torch.randn(2, 4, 4, 8, 8), timestep=torch.tensor([500, 300]),
        encoder_hidden_states=torch.randn(2, 5, 16),
    )  # fmt: skip
    return model, inputs
