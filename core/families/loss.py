"""The last step of every family's training loss: each entry's MSE, times its weights."""


def weighted_mse(prediction, target, *weights):
    """The MSE of each entry (float32), times each given [B] weight (min-SNR's, the batch's
    loss_weight of regularization images; None is 1), averaged over the batch."""
    per_entry = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    for weight in weights:
        if weight is not None:
            per_entry = per_entry * weight.to(per_entry.device, per_entry.dtype)
    return per_entry.mean()
