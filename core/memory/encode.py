"""Where captions are encoded before training (model.encode_on): on the accelerator, then the
text encoders are freed before the trained model comes on; or on the CPU, so that they never
touch the accelerator. `auto` takes the accelerator when the text encoders fit there alone (during
caching only the VAE is beside them, and what is already there: a bitsandbytes base is quantized on
the GPU as it loads)."""
import torch

from .estimate import CUDA_CONTEXT, fits
from .fit import device_memory


def text_encoder_bytes(pipeline):
    """Bytes of the pipeline's loaded text encoders (diffusers names them text_encoder,
    text_encoder_2, ...); one that is not loaded counts 0."""
    return sum(parameter.numel() * parameter.element_size()
               for name, module in pipeline.components.items()
               if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
               for parameter in module.parameters())


def resident_bytes(pipeline, device):
    """Bytes of the pipeline's parameters already on `device` before caching: bitsandbytes nf4 and
    int8 layers are quantized on the GPU as they load (parts/bnb.py)."""
    return sum(parameter.numel() * parameter.element_size()
               for module in pipeline.components.values() if isinstance(module, torch.nn.Module)
               for parameter in module.parameters() if parameter.device.type == device.type)


def encode_device(setting, device, encoder_bytes, device_bytes, resident=0):
    """The device captions are encoded on, for model.encode_on `setting` ("auto" | "device" |
    "cpu") on the run's `device` (device_bytes: its total memory, None when unknown; resident:
    bytes already held there)."""
    cpu = torch.device("cpu")
    if setting == "cpu" or device.type == "cpu":
        return cpu
    if setting == "device" or device_bytes is None:
        return device
    return device if fits(encoder_bytes + resident + CUDA_CONTEXT, device_bytes) else cpu


def caption_device(family, pipeline, setting, device):
    """encode_device for this pipeline's text encoders; for `auto`, encoders that were freed load
    again first, on the CPU (encode_prompts loads them; none is encoded), so that they are sized."""
    if setting == "auto" and device.type != "cpu":
        family.encode_prompts(pipeline, [], torch.device("cpu"))
    return encode_device(setting, device, text_encoder_bytes(pipeline), device_memory(device),
                         resident_bytes(pipeline, device))
