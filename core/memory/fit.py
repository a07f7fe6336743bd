"""Will a run fit the accelerator? The peak of one training step for each model.quantize mode the
family offers, with and without gradient checkpointing; the choice of "auto" settings; and, when
nothing fits, what to change (lower.py's one list) before any model loads."""
from .. import UserError
from .estimate import (CUDA_ONLY, config_shape, fits, gigabytes, memory_model, peak_breakdown)
from .lower import leaner_steps, with_changes


class DoesNotFit(UserError, ValueError):
    """No allowed setting fits the device; the message gives the estimate and what to change."""


def fit_table(config, resolutions=None, modes=None):
    """[PeakEstimate] for each quantize mode x resolution x checkpointing off/on."""
    shape = config_shape(config)
    modes = modes or memory_model(config).quantize_modes
    resolutions = resolutions or sorted(config["dataset"]["resolution"])
    return [peak_breakdown(config, mode, checkpointing, resolution, shape)
            for mode in modes for resolution in resolutions for checkpointing in (False, True)]


def device_memory(device):
    """Total bytes of a CUDA device, None for anything else (CPU, MPS)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory


def peak_of(config, shape, device_type="cuda"):
    """The estimated peak of `config` as it stands ("auto" counts as the least lean choice)."""
    modes = memory_model(config).quantize_modes
    quantize = config["model"]["quantize"]
    return peak_breakdown(config, quantize if quantize in modes else modes[0],
                          config["train"]["gradient_checkpointing"] is True,
                          max(config["dataset"]["resolution"]), shape, device_type).total


def lowered(config, device_type="cuda", shape=None):
    """[(change, config after it, estimated peak after it)]: lower.py's steps applied one after
    another to `config`."""
    shape = shape or config_shape(config)
    current, applied = config, []
    for description, changes in leaner_steps(config, memory_model(config).quantize_modes, device_type, CUDA_ONLY):
        current = with_changes(current, changes)
        applied.append((description, current, peak_of(current, shape, device_type)))
    return applied


def suggestions(config, device_bytes, device_type="cuda"):
    """[(change, estimate after it)] applied one after another until the estimate fits (all of
    them when nothing does), and whether the last one fits."""
    applied = []
    for description, _, peak in lowered(config, device_type):
        applied.append((description, peak))
        if fits(peak, device_bytes):
            return applied, True
    return applied, False


def _explicit(value, auto="auto"):
    return None if value == auto else value


def resolve_memory_settings(config, device_total_bytes, device_type):
    """(quantize, gradient_checkpointing, notes) for a run: "auto" values chosen from the
    estimate at the largest dataset.resolution, explicit ones kept. Raises DoesNotFit before
    anything loads when the settings cannot fit device_total_bytes with 10% headroom."""
    quantize = _explicit(config["model"]["quantize"])
    checkpointing = _explicit(config["train"]["gradient_checkpointing"])
    memory, notes = memory_model(config), []
    if quantize is not None and quantize not in memory.quantize_modes:
        raise DoesNotFit(f"model.quantize {quantize}: model.family {config['model']['family']} offers "
                         f"{', '.join(memory.quantize_modes)}: set model.quantize to auto or one of them.")
    if not memory.estimated:
        return _rule_of_thumb(config, device_total_bytes, device_type, checkpointing)
    if device_type != "cuda":
        if quantize in CUDA_ONLY:
            notes.append(f"model.quantize {quantize} needs bitsandbytes on a CUDA GPU; this is a "
                         f"{device_type}.")
        chosen = (quantize or "none", False if checkpointing is None else checkpointing)
        if quantize is None or checkpointing is None:
            notes.append(f"on the {device_type}: model.quantize {chosen[0]}, gradient checkpointing "
                         f"{'on' if chosen[1] else 'off'} (auto).")
        return chosen[0], chosen[1], notes
    resolution = max(config["dataset"]["resolution"])
    if device_total_bytes is None:
        chosen = (quantize or "none", True if checkpointing is None else checkpointing)
        notes.append("the device's memory is unknown: auto keeps the base unquantized and "
                     "turns gradient checkpointing on.")
        return chosen[0], chosen[1], notes
    shape = config_shape(config)
    modes = [quantize] if quantize else list(memory.quantize_modes)
    switches = [checkpointing] if checkpointing is not None else [False, True]
    for mode in modes:  # auto tries lower.py's first two steps: quantize, then checkpointing
        for switch in switches:
            peak = peak_breakdown(config, mode, switch, resolution, shape).total
            if fits(peak, device_total_bytes):
                if quantize is None or checkpointing is None:
                    notes.append(f"auto: model.quantize {mode}, gradient checkpointing "
                                 f"{'on' if switch else 'off'}: about {gigabytes(peak)} at "
                                 f"{resolution} px of {gigabytes(device_total_bytes)}.")
                return mode, switch, notes
    raise DoesNotFit(does_not_fit_message(config, device_total_bytes, modes[-1], switches[-1], shape))


def _rule_of_thumb(config, device_total_bytes, device_type, checkpointing):
    """(quantize, gradient_checkpointing, notes) for a family without an estimate: unquantized;
    "auto" checkpointing on for a CUDA GPU under the family's size (or of unknown size)."""
    family, memory = config["model"]["family"], memory_model(config)
    if checkpointing is not None:
        return "none", checkpointing, []
    limit = memory.checkpointing_below_gb
    switch = device_type == "cuda" and (None in (limit, device_total_bytes) or device_total_bytes < limit * 2**30)
    rule = f"on for GPUs under {limit} GB" if limit else "on for every GPU: no estimate for it yet"
    return "none", switch, [f"auto: {family} unquantized, gradient checkpointing "
                            f"{'on' if switch else 'off'} ({rule})."]


def does_not_fit_message(config, device_bytes, quantize, checkpointing, shape=None):
    resolution = max(config["dataset"]["resolution"])
    peak = peak_breakdown(config, quantize, checkpointing, resolution, shape).total
    lean = with_changes(config, {("model", "quantize"): quantize,
                                 ("train", "gradient_checkpointing"): checkpointing})
    applied, fit = suggestions(lean, device_bytes)
    text = (f"estimated peak {gigabytes(peak)} (model.quantize {quantize}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}, {resolution} px, rank {config['network']['linear']}, "
            f"batch {config['train']['batch_size']}) does not fit this GPU's "
            f"{gigabytes(device_bytes)} with 10% headroom.")
    steps = "; then ".join(f"{change} (about {gigabytes(after)})" for change, after in applied)
    if fit:
        return f"{text} To fit, change in this order: {steps}."
    return (f"{text} Even {steps or 'these settings'} do not fit: a GPU with more memory is needed.")


def fit_report(config, vram_bytes, resolutions=None):
    """Text: the estimated peak per quantize mode at each training resolution, with and without
    gradient checkpointing, which fit vram_bytes, and what auto would choose."""
    family, memory = config["model"]["family"], memory_model(config)
    if not memory.estimated:
        checkpointing = _explicit(config["train"]["gradient_checkpointing"])
        _, _, notes = _rule_of_thumb(config, vram_bytes, "cuda", checkpointing)
        return (f"memory fit for {gigabytes(vram_bytes)}: {family} trains unquantized; "
                + (" ".join(notes) or f"gradient checkpointing {'on' if checkpointing else 'off'} (given)."))
    rows = fit_table(config, resolutions)
    resolutions = sorted({row.resolution for row in rows})
    lines = [f"memory fit for {gigabytes(vram_bytes)} (estimate; fits = within 90%; "
             f"rank {config['network']['linear']}, batch {config['train']['batch_size']}, "
             f"{config['train']['optimizer']}):",
             "  quantize " + "".join(f"{f'{r} px: ckpt off / on':>24}" for r in resolutions)]
    for mode in memory.quantize_modes:
        cells = []
        for resolution in resolutions:
            pair = [row for row in rows if row.quantize == mode and row.resolution == resolution]
            cells.append(" / ".join(f"{row.total / 2**30:5.1f}{'*' if fits(row.total, vram_bytes) else ' '}"
                                    for row in pair))
        note = " (CUDA only)" if mode in CUDA_ONLY else ""
        lines.append(f"  {mode:<8} " + "".join(f"{cell:>24}" for cell in cells) + note)
    lines.append("  (GiB; * fits)")
    try:
        quantize, checkpointing, _ = resolve_memory_settings(config, vram_bytes, "cuda")
        lines.append(f"  auto picks: model.quantize {quantize}, gradient checkpointing "
                     f"{'on' if checkpointing else 'off'}"
                     + _explicit_note(config))
    except DoesNotFit as error:
        lines.append(f"  does not fit: {error}")
    return "\n".join(lines)


def _explicit_note(config):
    given = [f"{name} {value}" for name, value in (
        ("model.quantize", config["model"]["quantize"]),
        ("train.gradient_checkpointing", config["train"]["gradient_checkpointing"])) if value != "auto"]
    return f" (given: {', '.join(given)})" if given else ""

