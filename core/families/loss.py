"""The last step of every family's training loss: each entry's MSE, times its weights."""


def weighted_mse(prediction, target, *weights, mask=None):
    """The MSE of each entry (float32), times each given [B] weight (min-SNR's, the batch's
    loss_weight of regularization images; None is 1), averaged over the batch. `mask`, shaped as
    `target`, weights each element first (dataset.mask_folder: the batch's loss_mask)."""
    error = (prediction.float() - target.float()).pow(2)
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    per_entry = error.flatten(1).mean(dim=1)
    for weight in weights:
        if weight is not None:
            per_entry = per_entry * weight.to(per_entry.device, per_entry.dtype)
    return per_entry.mean()


def loss_mask(batch, target, layout=None):
    """The batch's loss_mask [B, 1, h, w] (dataset.mask_folder) spread over `target`'s [B, C, h, w]
    channels and laid out by `layout` as the family lays out its prediction (FLUX packs 2x2
    patches into tokens); None without masks."""
    mask = batch.get("loss_mask")
    if mask is None:
        return None
    mask = mask.expand_as(target).contiguous()
    return layout(mask) if layout else mask
