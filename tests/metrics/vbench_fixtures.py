"""Tiny random CLIP / DINO / LAION head / TorchScript interpolator saved in their real formats, and hand-made
videos with known VBench answers."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_models(root: Path, seed: int = 0) -> dict[str, str]:
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    torch.manual_seed(seed)
    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPConfig(
        text_config=dict(**tiny, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(**tiny, image_size=224, patch_size=32),
        projection_dim=8,
    )
    CLIPModel(clip).save_pretrained(root / "clip")  # the layout of openai/clip-vit-*: config.json + safetensors
    ViTModel(ViTConfig(**tiny, image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(root / "dino")
    head = torch.nn.Linear(8, 1)
    torch.save(head.state_dict(), root / "sa_0_4_vit_l_14_linear.pth")  # LAION's file: a Linear state dict
    torch.jit.save(torch.jit.script(Blend()), root / "blend.pt")
    return {"dino": str(root / "dino"), "clip_b32": str(root / "clip"), "clip_l14": str(root / "clip"),
            "aesthetic_head": str(root / "sa_0_4_vit_l_14_linear.pth"), "interpolator": str(root / "blend.pt")}


class Blend(torch.nn.Module):
    """Linear-blend interpolator. The half-level offset makes AMT's truncating uint8 conversion exact for a midpoint
    that is an integer level, so linear-in-time videos get known answers."""

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor) -> torch.Tensor:
        return img0 * (1 - embt) + img1 * embt + 0.5 / 255


class ShiftFlow(torch.nn.Module):
    """Oracle 'RAFT' for horizontally rolled textures: the integer shift (|dx| <= 8) that best maps frame 0 to
    frame 1, as a constant flow field; called like torchvision's RAFT (list of flows, the last is final)."""

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, num_flow_updates: int = 12) -> list[torch.Tensor]:
        flows = []
        for a, b in zip(x0, x1, strict=True):
            shifts = sorted(range(-8, 9), key=abs)  # ties (a uniform frame) resolve to no motion
            err = torch.stack([(torch.roll(a, dx, dims=-1) - b).abs().mean() for dx in shifts])
            dx = float(shifts[int(err.argmin())])
            flows.append(torch.stack([torch.full(a.shape[-2:], dx), torch.zeros(a.shape[-2:])]))
        return [torch.stack(flows)]


def uniform_video(levels: list[int], h: int = 16, w: int = 24) -> torch.Tensor:
    """``(T, 3, h, w)`` uint8, frame t uniformly ``levels[t]``."""
    return torch.tensor(levels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, h, w).contiguous()


def rolled_texture(num_frames: int, speed: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A random texture translated by ``speed`` px per frame (circularly): constant motion."""
    g = torch.Generator().manual_seed(seed)
    tex = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return torch.stack([torch.roll(tex, t * speed, dims=-1) for t in range(num_frames)])
