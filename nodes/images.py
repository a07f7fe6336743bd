"""PIL images as ComfyUI's IMAGE: a float tensor [batch, height, width, channels] in 0..1."""


def image_tensor(*images):
    import numpy
    import torch

    arrays = [numpy.asarray(image.convert("RGB"), dtype=numpy.float32) / 255.0 for image in images]
    return torch.from_numpy(numpy.stack(arrays))
