"""The validation loss: the family's own training loss on the images held out of training
(dataset.validation_images), in eval mode and without gradients, at fixed noise and noise levels.
Two measurements therefore differ only because the LoRA changed, also across a resume."""
import torch

from ..dataset.buckets import crop_top_left

SEED = 20_000_003  # held-out case n draws from a generator seeded SEED + n, at every measurement


class HeldOut:
    """The held-out images of a run at each of their bucket sizes. metrics(...) gives the entry of
    the run's metrics line: {"validation_loss": mean loss}, or {} when no image is held out."""

    def __init__(self, family, items, indices, sizes, latent, encode, train_config, uses_guidance,
                 device, dtype, autocast):
        self.family, self.items, self.latent, self.encode = family, items, latent, encode
        self.train_config, self.uses_guidance = train_config, uses_guidance
        self.device, self.dtype, self.autocast = device, dtype, autocast
        self.cases = [(index, size) for index in indices for size in sizes[index]]

    def batch(self, index, size):
        """A batch of one held-out image, as the loop builds them (its caption, never dropped)."""
        item = self.items[index]
        text, pooled = self.encode([item.caption])
        batch = {name: value.to(self.device, self.dtype) for name, value in
                 {"latents": self.latent(index, size)[None], "text": text, "pooled": pooled}.items()}
        batch["original_size"] = torch.tensor([(item.height, item.width)], device=self.device)
        batch["crop_top_left"] = torch.tensor([crop_top_left(item.width, item.height, size)],
                                              device=self.device)
        return batch

    @torch.no_grad()
    def metrics(self, model, text_encoders=()):
        """Measures the loss with `model` (and a text-encoder LoRA's encoders) in eval mode, then
        puts each back in the mode it was in."""
        if not self.cases:
            return {}
        modules = [model, *text_encoders]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            losses = []
            for number, (index, size) in enumerate(self.cases):
                generator = torch.Generator().manual_seed(SEED + number)
                with self.autocast():
                    loss = self.family.training_loss(model, self.batch(index, size), generator,
                                                     self.train_config, self.uses_guidance)
                losses.append(loss.float().item())
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)
        return {"validation_loss": sum(losses) / len(losses)}
