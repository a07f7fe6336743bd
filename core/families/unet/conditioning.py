"""SDXL's micro-conditioning: the UNet is told each training image's original size, where it was
cropped and the size it is shown at, so at sampling time (original = target, crop = 0) it draws
whole, uncropped subjects at the asked size."""
import torch


def add_time_ids(original_size, crop_top_left, target_size):
    """[B, 6] = (original_height, original_width, crop_top, crop_left, target_height,
    target_width) per sample, in diffusers' order (StableDiffusionXLPipeline._get_add_time_ids).
    original_size and crop_top_left are [B, 2] (height/top first; the crop as
    core/dataset/buckets.py crop_top_left gives it); target_size is (height, width)."""
    original_size = torch.as_tensor(original_size, dtype=torch.float32)
    crop_top_left = torch.as_tensor(crop_top_left, dtype=torch.float32, device=original_size.device)
    target = torch.tensor(target_size, dtype=torch.float32, device=original_size.device)
    return torch.cat([original_size, crop_top_left, target.expand(len(original_size), 2)], dim=1)

