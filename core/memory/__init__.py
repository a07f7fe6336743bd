"""Accelerator memory in one place: the estimate of a training step from shapes (estimate.py,
with the family's memory model), whether it fits and what `auto` picks (fit.py), the one ordered
list of what to lower (lower.py), used before a run and after an out-of-memory (out_of_memory.py),
and where captions are encoded (encode.py)."""
from .encode import caption_device, encode_device, text_encoder_bytes
from .estimate import (MemoryEstimate, PeakEstimate, estimate_memory, estimate_peak, fits, gigabytes,
                       peak_breakdown, state_bytes)
from .fit import DoesNotFit, card_table, device_memory, fit_report, fit_table, resolve_memory_settings, suggestions
from .lower import leaner_steps
from .out_of_memory import out_of_memory_advice

__all__ = ["DoesNotFit", "MemoryEstimate", "PeakEstimate", "caption_device", "card_table", "device_memory",
           "encode_device", "estimate_memory", "estimate_peak", "fit_report", "fit_table", "fits", "gigabytes",
           "leaner_steps",
           "out_of_memory_advice", "peak_breakdown", "resolve_memory_settings", "state_bytes",
           "suggestions", "text_encoder_bytes"]
