"""Will a run fit the accelerator? The peak of one training step for each model.quantize mode the
family offers, with and without gradient checkpointing; the choice of "auto" settings; and, when
nothing fits, what to change (lower.py's one list) before any model loads."""
from .. import UserError
from ..families import family_or_default
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


def _offload(config):
    """train.offload_blocks as a number ("auto" counts as none offloaded)."""
    value = config["train"].get("offload_blocks", 0)
    return 0 if value == "auto" else value


def block_count(config, shape=None):
    """Blocks of the trainable model that train.offload_blocks can move."""
    return len(memory_model(config).block_parameters((shape or config_shape(config))[0]))


def peak_of(config, shape, device_type="cuda"):
    """The estimated peak of `config` as it stands ("auto" counts as the least lean choice)."""
    modes = memory_model(config).quantize_modes
    quantize = config["model"]["quantize"]
    return peak_breakdown(config, quantize if quantize in modes else modes[0],
                          config["train"]["gradient_checkpointing"] is True,
                          max(config["dataset"]["resolution"]), shape, device_type, _offload(config)).total


def fewest_blocks(config, shape, device_bytes, device_type="cuda"):
    """`config` with the fewest offloaded blocks, up to its own train.offload_blocks, that fit."""
    for count in range(_offload(config) + 1):
        fewer = with_changes(config, {("train", "offload_blocks"): count})
        if fits(peak_of(fewer, shape, device_type), device_bytes):
            return fewer
    return config


def lowered(config, device_type="cuda", shape=None, device_bytes=None):
    """[(change, config after it, estimated peak after it)]: lower.py's steps applied one after
    another to `config`; the offloading step offloads the fewest blocks that fit device_bytes
    (all of them when none do or the device is not known)."""
    shape = shape or config_shape(config)
    current, applied = config, []
    for description, changes in leaner_steps(config, memory_model(config).quantize_modes, device_type,
                                             CUDA_ONLY, block_count(config, shape)):
        current = with_changes(current, changes)
        if ("train", "offload_blocks") in changes and device_bytes:
            current = fewest_blocks(current, shape, device_bytes, device_type)
            description = f"train.offload_blocks {_offload(current)}"
        applied.append((description, current, peak_of(current, shape, device_type)))
    return applied


def suggestions(config, device_bytes, device_type="cuda"):
    """[(change, estimate after it)] applied one after another until the estimate fits (all of
    them when nothing does), and whether the last one fits."""
    applied = []
    for description, _, peak in lowered(config, device_type, device_bytes=device_bytes):
        applied.append((description, peak))
        if fits(peak, device_bytes):
            return applied, True
    return applied, False


def _explicit(value, auto="auto"):
    return None if value == auto else value


SETTINGS = (("model", "quantize"), ("train", "gradient_checkpointing"), ("train", "offload_blocks"))


def _settings(config):
    return tuple(config[section][key] for section, key in SETTINGS)


def resolve_memory_settings(config, device_total_bytes, device_type):
    """(quantize, gradient_checkpointing, offload_blocks, notes) for a run: the "auto" ones chosen
    from the estimate at the largest dataset.resolution (lower.py's list, walked until the
    estimate fits, then the cheapest of what fits), explicit ones kept. Raises DoesNotFit before
    anything loads when the settings cannot fit device_total_bytes with 10% headroom."""
    given = {key: _explicit(config[key[0]].get(key[1], "auto")) for key in SETTINGS}
    quantize, checkpointing, offload = given.values()
    memory, notes = memory_model(config), []
    if quantize is not None and quantize not in memory.quantize_modes:
        raise DoesNotFit(f"model.quantize {quantize}: model.family {config['model']['family']} offers "
                         f"{', '.join(memory.quantize_modes)}: set model.quantize to auto or one of them.")
    if not memory.estimated:
        mode, switch, notes = _rule_of_thumb(config, device_total_bytes, device_type, checkpointing)
        return mode, switch, offload or 0, notes
    shape = config_shape(config)
    blocks = block_count(config, shape)
    if offload is not None and offload > blocks:
        raise DoesNotFit(f"train.offload_blocks {offload}: {family_or_default(config['model']['family']).title} "
                         f"({shape[1]}) has {blocks} blocks; set it to at most {blocks}, or to auto.")
    if device_type != "cuda" or device_total_bytes is None:
        return _without_estimate(given, device_type, device_total_bytes is None and device_type == "cuda")
    start = with_changes(config, {("model", "quantize"): quantize or memory.quantize_modes[0],
                                  ("train", "gradient_checkpointing"): bool(checkpointing),
                                  ("train", "offload_blocks"): offload or 0})
    chosen = cheapest_fit(start, [key for key, value in given.items() if value is None], shape,
                          device_total_bytes)
    if chosen is None:
        raise DoesNotFit(does_not_fit_message(start, device_total_bytes, shape))
    mode, switch, count = _settings(chosen)
    if None in given.values():
        notes.append(f"auto: {describe_settings(chosen, shape)}: about "
                     f"{gigabytes(peak_of(chosen, shape))} at {max(config['dataset']['resolution'])} px "
                     f"of {gigabytes(device_total_bytes)}.")
    return mode, switch, count, notes


def _without_estimate(given, device_type, unknown_cuda):
    """A CPU (or MPS): nothing quantized, no checkpointing, nothing offloaded unless given; a
    CUDA device of unknown size: checkpointing on, the base unquantized."""
    quantize, checkpointing, offload = given.values()
    notes = []
    if quantize in CUDA_ONLY and device_type != "cuda":
        notes.append(f"model.quantize {quantize} is bitsandbytes', made for CUDA GPUs: on this {device_type} "
                     "it runs, slowly, for trying settings.")
    chosen = (quantize or "none", unknown_cuda if checkpointing is None else checkpointing, offload or 0)
    if unknown_cuda:
        notes.append("the device's memory is unknown: auto keeps the base unquantized, turns gradient "
                     "checkpointing on and offloads nothing.")
    elif None in given.values():
        notes.append(f"on the {device_type}: model.quantize {chosen[0]}, gradient checkpointing "
                     f"{'on' if chosen[1] else 'off'}, train.offload_blocks {chosen[2]} (auto).")
    return (*chosen, notes)


def cheapest_fit(config, free, shape, device_bytes):
    """The cheapest settings that fit: lower.py's steps on the `free` settings applied one after
    another until the estimate fits (a step on a given setting is skipped; the first step on
    anything else ends the walk), then the fewest offloaded blocks, and checkpointing dropped
    again where the rest fits without it. None when nothing fits."""
    candidate = config
    steps = leaner_steps(config, memory_model(config).quantize_modes, "cuda", CUDA_ONLY, block_count(config, shape))
    for _, changes in [(None, {})] + steps:
        if not set(changes) <= set(SETTINGS):
            return None
        if not set(changes) <= set(free):
            continue
        candidate = with_changes(candidate, changes)
        if fits(peak_of(candidate, shape), device_bytes):
            break
    else:
        return None
    best = fewest_blocks(candidate, shape, device_bytes)
    if ("train", "gradient_checkpointing") in free and best["train"]["gradient_checkpointing"]:
        # without checkpointing and with what else the walk chose, but nothing offloaded that
        # was not given: offloading's copies and host memory go only where nothing else fits
        unchecked = with_changes(best, {("train", "gradient_checkpointing"): False,
                                        ("train", "offload_blocks"): _offload(config)})
        if fits(peak_of(unchecked, shape), device_bytes):
            best = unchecked
    return best


def describe_settings(config, shape):
    """"model.quantize fp8, gradient checkpointing on, train.offload_blocks 16 of 60 (5.1 GiB in
    CPU memory); about +35% step time (an estimate)"."""
    from .speed import slowdown

    mode, switch, count = _settings(config)
    resolution = max(config["dataset"]["resolution"])
    text = f"model.quantize {mode}, gradient checkpointing {'on' if switch else 'off'}"
    if count:
        host = peak_breakdown(config, mode, switch, resolution, shape, offload_blocks=count).offloaded
        text += (f", train.offload_blocks {count} of {block_count(config, shape)} "
                 f"({gigabytes(host)} in CPU memory)")
    return text + f"; about +{slowdown(config, shape[0], mode, switch, resolution, count):.0%} step time (an estimate)"


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


def does_not_fit_message(config, device_bytes, shape=None):
    """`config`: the settings as given (auto as least lean); what auto could reach is in the steps."""
    resolution = max(config["dataset"]["resolution"])
    quantize, checkpointing, offload = _settings(config)
    peak = peak_of(config, shape or config_shape(config))
    applied, fit = suggestions(config, device_bytes)
    text = (f"estimated peak {gigabytes(peak)} (model.quantize {quantize}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}, train.offload_blocks {offload}, {resolution} px, "
            f"rank {config['network']['linear']}, batch {config['train']['batch_size']}) does not fit "
            f"this GPU's {gigabytes(device_bytes)} with 10% headroom.")
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
        quantize, checkpointing, offload, _ = resolve_memory_settings(config, vram_bytes, "cuda")
        chosen = with_changes(config, dict(zip(SETTINGS, (quantize, checkpointing, offload))))
        lines.append(f"  auto picks: {describe_settings(chosen, config_shape(config))}" + _explicit_note(config))
    except DoesNotFit as error:
        lines.append(f"  does not fit: {error}")
    return "\n".join(lines)


def _explicit_note(config):
    given = [f"{name} {value}" for name, value in (
        ("model.quantize", config["model"]["quantize"]),
        ("train.gradient_checkpointing", config["train"]["gradient_checkpointing"]),
        ("train.offload_blocks", config["train"].get("offload_blocks", "auto"))) if value != "auto"]
    return f" (given: {', '.join(given)})" if given else ""



CARDS_GB = (8, 12, 16, 24, 48)


def card_table(config, cards_gb=CARDS_GB, resolutions=(512, 1024), yours_gb=None):
    """Text: per card size (GiB) and resolution, the cheapest settings that fit (auto's choice)
    with the estimated step-time cost, or "does not fit"; `yours_gb` is added and marked."""
    from .speed import assumptions, slowdown

    memory = memory_model(config)
    title = family_or_default(config["model"]["family"]).title
    if not memory.estimated:
        notes = _rule_of_thumb(config, None, "cuda", None)[2]
        return f"{title}: no memory estimate yet; {notes[0][len('auto: '):]}"
    cards = sorted(set(cards_gb) | ({yours_gb} if yours_gb else set()))
    shape = config_shape(config)
    named = shape[1] if shape[1].startswith(title) else f"{title} ({shape[1]})"
    lines = [f"{named}: the cheapest settings that fit each card, and the step time they add (estimate; "
             f"rank {config['network']['linear']}, batch {config['train']['batch_size']}, "
             f"{config['train']['optimizer']})",
             "  card    " + "".join(f"{f'{r} px':<40}" for r in resolutions).rstrip()]
    for gb in cards:
        cells = []
        for resolution in resolutions:
            sized = with_changes(config, {("dataset", "resolution"): [resolution]})
            try:
                mode, switch, count, _ = resolve_memory_settings(sized, gb * 2**30, "cuda")
            except DoesNotFit:
                cells.append("does not fit")
                continue
            extra = slowdown(sized, shape[0], mode, switch, resolution, count)
            cells.append(f"{mode}{', ckpt' if switch else ''}"
                         f"{f', {count}/{block_count(config, shape)} offloaded' if count else ''}, +{extra:.0%}")
        mark = "  <- yours" if gb == yours_gb else ""
        lines.append(f"  {gb:g} GB".ljust(10) + "".join(f"{cell:<40}" for cell in cells).rstrip() + mark)
    lines.append(f"  (ckpt: gradient checkpointing; N/M offloaded: train.offload_blocks; time against the same "
                 f"quantize mode with nothing recomputed or offloaded, on {assumptions()})")
    return "\n".join(lines)
