"""Masked loss: a grey mask per training image (dataset.mask_folder, the image's name with any
image extension) or the image's own alpha (dataset.alpha_mask). White trains fully, black at
dataset.mask_min. A mask is read the way its image is (upright, the same cover-and-centre-crop
to the bucket) and averaged down to the latent's resolution, so it lies where its pixels do."""
import hashlib
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .images import decode_upright
from .scan import IMAGE_EXTENSIONS, DatasetError


def masking(data_cfg):
    return bool(data_cfg.get("mask_folder") or data_cfg.get("alpha_mask"))


def mask_path(image_path, mask_folder):
    """The mask of `image_path` in `mask_folder`, or DatasetError naming where it was looked for."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for extension in IMAGE_EXTENSIONS:
        path = os.path.join(mask_folder, stem + extension)
        if os.path.isfile(path):
            return path
    raise DatasetError(f"dataset.mask_folder {mask_folder} holds no mask for {image_path} (looked "
                       f"for {stem}.png, .jpg, .jpeg or .webp): add one, white where the image "
                       "trains, or clear dataset.mask_folder.")


def _mask_image(item, data_cfg):
    """The mask of dataset item `item` as an 8-bit grey PIL image of the image's own size."""
    if data_cfg.get("mask_folder"):
        path = mask_path(item.path, data_cfg["mask_folder"])
        mask = decode_upright(path)
        where = f"mask {path}"
    else:
        image = decode_upright(item.path)
        if not image.has_transparency_data:
            raise DatasetError(f"dataset.alpha_mask is on but {item.path} has no alpha channel: save "
                               "it as a PNG or WebP with transparency, or turn dataset.alpha_mask off.")
        mask, where = image.convert("RGBA").getchannel("A"), f"the alpha of {item.path}"
    if mask.size != (item.width, item.height):
        raise DatasetError(f"{where} is {mask.size[0]}x{mask.size[1]}, but its image {item.path} is "
                           f"{item.width}x{item.height}: a mask must have its image's size.")
    return mask.convert("L")


def with_masks(fingerprint, items, indices, data_cfg, digest):
    """The dataset `fingerprint` with the bytes of dataset.mask_folder's masks of items[indices]
    (by `digest(path)`): a changed mask is a changed dataset. (An alpha mask is in its image's.)"""
    if not data_cfg.get("mask_folder"):
        return fingerprint
    masks = [digest(mask_path(items[i].path, data_cfg["mask_folder"])) for i in indices]
    return hashlib.sha256(":".join([fingerprint, *masks]).encode()).hexdigest()


def check_masks(items, indices, data_cfg):
    """Raises DatasetError naming the first of items[indices] whose mask is missing or misfits."""
    for index in indices:
        _mask_image(items[index], data_cfg)


def loss_mask(item, size, latent_shape, data_cfg):
    """The loss weight [1, h, w] of `item` at bucket `size` (width, height) for a latent of
    spatial shape `latent_shape`: mask_min + (1 - mask_min) x the mask's mean over each latent cell."""
    fitted = ImageOps.fit(_mask_image(item, data_cfg), size, method=Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).float().div(255)
    mask = F.adaptive_avg_pool2d(pixels.view(1, size[1], size[0]), tuple(latent_shape))
    low = data_cfg.get("mask_min", 0.0)
    return low + (1 - low) * mask
