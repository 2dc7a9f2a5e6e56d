"""Train only the MoGA routers of a tiny random Wan 2.1 transformer for a few steps (CPU, well under a minute).

The transformer gets the paper's configuration (moga.paper_config("wan"): M = 5 groups, STGA with 2x2 spatial
windows per frame and 2 cross-shot context frames, per-frame attention, balance loss weight 0.1). The loss is
a flow-matching style denoising loss on random latents plus alpha times the group balance loss; everything
but the routers is frozen. Each step prints the losses and the fraction of tokens per group, averaged over
layers.

    python examples/wan_moga.py [--steps 8]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import WanTransformer3DModel

import moga
from moga.integrations.diffusers import apply_moga, moga_balance_loss, moga_processors


def tiny_wan() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.manual_seed(0)

    cfg = moga.paper_config("wan")
    model = tiny_wan()
    apply_moga(
        model, cfg.num_groups, window=cfg.window, frame_attention=cfg.frame_attention,
        context_frames=cfg.context_frames, top_k=cfg.top_k,
    )
    for name, p in model.named_parameters():
        p.requires_grad_("router" in name)
    routers = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(routers, lr=args.lr)
    print(f"{sum(p.numel() for p in routers)} router parameters in {len(moga_processors(model))} layers; {cfg}")

    # Latents (B, C, frames, height, width) -> post-patchify grid (6, 8, 8): 384 tokens, two shots of 3 frames.
    shot_starts = [0, 3]
    for step in range(args.steps):
        clean = torch.randn(2, 4, 6, 16, 16)
        noise = torch.randn_like(clean)
        t = torch.rand(2)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1, 1) * noise
        pred = model(
            noisy, timestep=t * 1000, encoder_hidden_states=torch.randn(2, 8, 32),
            attention_kwargs={"shot_starts": shot_starts},
        ).sample
        denoise = (pred - (noise - clean)).square().mean()
        balance = moga_balance_loss(model)
        loss = denoise + cfg.balance_loss_weight * balance
        optim.zero_grad()
        loss.backward()
        optim.step()
        occupancy = torch.stack([p.last_group_fraction for p in moga_processors(model)]).mean(0)
        print(
            f"step {step}: loss {loss.item():.4f} (denoise {denoise.item():.4f}, balance {balance.item():.4f}) "
            f"groups {' '.join(f'{f:.2f}' for f in occupancy.tolist())}"
        )


if __name__ == "__main__":
    main()
