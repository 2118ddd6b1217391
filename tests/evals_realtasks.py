"""Tiny eval models for the real-task tests (the tasks themselves, MNI152 patches and segmentation shards, are
demo data: medfm.demo.mni_tasks)."""

from __future__ import annotations

from medfm.demo.mni_tasks import PATCH


def tiny_image_model_config():
    """A 2-layer ViT on 16x16 patches (4x4 pixel tokens) with a projection head; real architecture, CPU size."""
    from medfm.model_zoo import MultiModalConfig, TowerSpec

    return MultiModalConfig(towers={"image": TowerSpec("vit2d_tiny_p16", {
        "width": 32, "depth": 2, "num_heads": 2, "img_size": PATCH, "patch_size": 4, "in_chans": 1})}, embed_dim=16,
        mae=[])


def tiny_volume_model_config(size: int = 16):
    """A 2-layer ViT3D on size^3 blocks (4^3 voxel tokens); real architecture, CPU size."""
    from medfm.model_zoo import MultiModalConfig, TowerSpec

    return MultiModalConfig(towers={"volume": TowerSpec("vit3d_tiny", {
        "width": 32, "depth": 2, "num_heads": 2, "img_size": [size] * 3, "patch_size": [4, 4, 4]})}, embed_dim=16,
        mae=[])
