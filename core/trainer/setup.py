"""The stages of a run before its step loop, in order: start (accelerator, memory settings), plan,
run folder, model and caches, LoRA and optimizer. Each returns what the later ones use."""
import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from ..memory import caption_device, device_memory, resolve_memory_settings
from ..memory.offload import offload_blocks
from ..coach.run_plan import plan_run
from ..dataset import Cache, image_sizes, model_fingerprint
from ..dataset.cache import file_digest
from ..dataset.masks import check_masks, loss_mask, masking, with_masks
from ..families import get_family, load_model, model_files
from ..families.preservation import class_caption
from ..lora import add_lora, add_text_encoder_lora
from ..runs import choose_run_folder
from ..runs.fingerprint import dataset_fingerprint
from ..sampling import prompts_with_trigger
from .checkpoints import load_resume_state, resume as fit_and_load
from .ema import make_ema
from .metrics import versions
from .optimizers import make_optimizer, make_scheduler
from .precision import check_precision
from .text import CachedText, TrainedText

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


@dataclass
class Session:
    """What every stage uses. `config` is resolved, with what this device needs chosen for
    quantize and gradient checkpointing, and (from the plan on) train.steps."""
    config: dict
    accelerator: Accelerator
    family: object
    emit: Callable
    notes: list = field(default_factory=list)    # the run's warnings so far
    memory: list = field(default_factory=list)   # what quantize/checkpointing "auto" chose, and why

    @property
    def device(self):
        return self.accelerator.device

    def warn(self, message, step=None):
        self.notes.append(message)
        self.emit({"type": "warning", "message": message} if step is None else
                  {"type": "warning", "step": step, "message": message})


def start(config, on_event):
    # A long-lived process (ComfyUI) trains many times with different precisions: accelerate keeps
    # its state in a singleton, so start each run from a fresh one (the process group stays).
    AcceleratorState._reset_state()
    # accumulate() counts micro-steps: under DDP only the last of each step all-reduces (no_sync)
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[config["train"]["dtype"]],
                              gradient_accumulation_steps=config["train"]["gradient_accumulation_steps"],
                              cpu=not torch.cuda.is_available())  # cpu: torchrun on CPUs is DDP too
    device = accelerator.device
    check_precision(config["model"]["dtype"], config["train"]["dtype"], device.type, config["model"]["quantize"])
    # quantize, gradient checkpointing and offload_blocks "auto" become what the memory estimate
    # needs on this device (a run that cannot fit stops here, before loading); the run folder
    # records them.
    quantize, checkpointing, offload, memory = resolve_memory_settings(config, device_memory(device), device.type)
    config = {**config, "model": {**config["model"], "quantize": quantize},
              "train": {**config["train"], "gradient_checkpointing": checkpointing, "offload_blocks": offload}}
    emit = (on_event if accelerator.is_main_process else None) or (lambda event: None)
    return Session(config, accelerator, get_family(config["model"]["family"]), emit, memory=memory)


def plan(session):
    """The run plan (before any model loads, so a bad folder fails fast), told as events."""
    planned = plan_run(session.config)
    session.config = planned.config
    if masking(session.config["dataset"]):  # a missing or misfit mask is named before any model loads
        check_masks(planned.scan.items, planned.training, session.config["dataset"])
    for name, reason in planned.scan.skipped:
        session.warn(f"skipped {name}: {reason}")
    for name, note in planned.scan.notes:
        session.warn(f"caption file {name}: {note}")
    for note in session.family.advice(session.config["model"]):  # a known trap of this model
        session.warn(note)
    if session.device.type == "cpu" and session.config["train"]["optimizer"] == "adamw8bit":
        session.warn("train.optimizer adamw8bit runs on this CPU but slowly (bitsandbytes' 8-bit "
                     "states are a GPU feature); without a GPU, adamw is much faster.")
    for note in session.memory:
        session.emit({"type": "status", "message": note})
    session.emit({"type": "plan", **planned.numbers()})
    return planned


@dataclass
class Folder:
    run: object          # RunFolder, held by this run
    resume: tuple        # (step, state) of the newest complete checkpoint, or None
    digests: dict        # {item index: file digest}: the fingerprint's and the cache's keys
    fingerprint: str

    @property
    def start_step(self):
        return self.resume[0] if self.resume else 0


def run_folder(session, planned, held):
    """One training per folder, held by this run (before any model loads); its resume state."""
    config, accelerator = session.config, session.accelerator
    digests = {index: file_digest(item.path) for index, item in enumerate(planned.scan.items)}
    fingerprint = dataset_fingerprint(planned.scan, digests)  # the cache keys reuse these digests
    fingerprint = with_masks(fingerprint, planned.scan.items, planned.training, config["dataset"], file_digest)
    run, started_because = choose_run_folder(
        config["save"]["output_dir"], config["name"], {**config, "dataset_stats": {"fingerprint": fingerprint}},
        config["train"]["resume"])
    accelerator.wait_for_everyone()  # every process has chosen before the main one creates it
    if accelerator.is_main_process:
        held.enter_context(run.lock())  # RunLocked when another training holds this folder
        run.clean_temporaries()
    if started_because:
        session.emit({"type": "status", "message": f"a new run folder {run.path}: {started_because}"})
    found, skipped = load_resume_state(run)  # a broken state is skipped, by name, for the one before
    for message in skipped:
        session.warn(message)
    return Folder(run, found, digests, fingerprint)


@dataclass
class Model:
    pipeline: object
    sizes: dict            # {item index: [bucket size per resolution]}
    cache: Cache
    sample_prompts: list
    class_word: str        # train.preservation_class when preservation is on, else ""


def model_and_caches(session, planned, folder, pipeline):
    """The base model (unless given), and the latents and (without a text-encoder LoRA) the
    captions' embeddings, cached once."""
    config, family, device, emit = session.config, session.family, session.device, session.emit
    model_cfg, data_cfg, train_cfg = config["model"], config["dataset"], config["train"]
    if pipeline is None:
        emit({"type": "status", "message": f"loading {model_cfg['path'] or model_cfg['transformer_path']}"})
        pipeline = load_model(model_cfg, model_cfg["quantize"])
    text_device = text_encoding_device(session, pipeline)
    family.encoders_to_device(pipeline, text_device)
    if text_device != device:  # latents still encode on the device (every family's VAE is pipeline.vae)
        pipeline.vae.to(device)
    items = planned.scan.items
    sizes = image_sizes(items, data_cfg["resolution"], family.size_multiple(pipeline))
    sample_prompts = prompts_with_trigger(config["sample"]["prompts"], data_cfg["trigger_word"])
    train_text = config["network"]["text_encoder"]  # a text-encoder LoRA: no text is cached
    captions = [] if train_text else [item.caption for item in items] + [""] + sample_prompts
    class_word = train_cfg["preservation_class"] if train_cfg["preservation_weight"] > 0 else ""
    if class_word:  # preservation's class captions are cached with the captions
        captions += [class_caption(c, data_cfg["trigger_word"], class_word) or c for c in captions]
    model_key = model_fingerprint(model_files(model_cfg), f"{model_cfg['dtype']}:{model_cfg['quantize']}")
    cache = Cache(os.path.join(folder.run.path, "cache") if data_cfg["cache"] == "disk" else None,
                  folder.digests)
    trained = set(planned.training) if masking(data_cfg) else set()  # masked loss: their masks
    make_mask = lambda index, size, shape: (loss_mask(items[index], size, shape, data_cfg)  # noqa: E731
                                            if index in trained else None)
    rebuilt = cache.fill(items, sizes, captions,  # what is read back from a disk cache is checked
                         encode_image=lambda image: family.encode_image(pipeline, image, device),
                         encode_texts=lambda texts: family.encode_prompts(pipeline, texts, text_device),
                         model_key=model_key,
                         on_progress=lambda done, total: emit({"type": "caching", "done": done, "total": total}),
                         make_mask=make_mask)
    for message in rebuilt:
        session.warn(message)
    return Model(pipeline, sizes, cache, sample_prompts, class_word)


def text_encoding_device(session, pipeline):
    """Where the captions are encoded (model.encode_on). A text-encoder LoRA trains the text
    encoders, so they go on the device; else they are freed before the trained model comes on."""
    device, setting = session.device, session.config["model"]["encode_on"]
    if session.config["network"]["text_encoder"]:
        return device
    chosen = caption_device(session.family, pipeline, setting, device)
    if chosen != device:
        session.emit({"type": "status", "message": f"captions are encoded on the CPU (model.encode_on "
                                                   f"{setting}): the text encoders stay off the {device.type}"})
    return chosen


@dataclass
class Trainable:
    model: torch.nn.Module   # the trainable model with its LoRA, prepared by accelerate
    parameters: list         # its LoRA parameters
    text: object             # CachedText, or TrainedText (a text-encoder LoRA)
    optimizer: object
    scheduler: object
    to_kohya: object         # the family's kohya key map of this model
    compute_dtype: torch.dtype
    uses_guidance: bool
    ema: object              # train.ema's AdapterEMA, or NoEMA (core/trainer/ema.py)


def lora_and_optimizer(session, planned, folder, model):
    """The LoRA layers (on the text encoders too with network.text_encoder), the optimizer and the
    schedule, resumed from the newest complete checkpoint; the run's config.json."""
    config, family, accelerator, device = session.config, session.family, session.accelerator, session.device
    net_cfg, train_cfg, pipeline = config["network"], config["train"], model.pipeline
    if net_cfg["text_encoder"]:
        encoders = family.text_encoders(pipeline)
        parameters = add_text_encoder_lora(encoders, net_cfg["linear"], net_cfg["linear_alpha"],
                                           family.text_encoder_lora_targets(net_cfg), net_cfg)
        text_lr = train_cfg["text_encoder_lr"]  # None: train.lr
        text = TrainedText(family, pipeline, device, model.sample_prompts, encoders, parameters,
                           train_cfg["lr"] if text_lr is None else text_lr)
    else:
        family.free_text_encoders(pipeline)  # their work is done: freed before the transformer comes on
        text = CachedText(model.cache, model.sample_prompts)
    trainable = family.trainable_model(pipeline)
    # train.offload_blocks: those blocks' frozen weights stay on the host (before the model moves)
    offload = offload_blocks(trainable, family.offload_blocks(trainable), train_cfg["offload_blocks"], device,
                             train_cfg["gradient_checkpointing"])
    family.to_device(pipeline, device)
    with offload.weights_on_host() if offload else contextlib.nullcontext():
        parameters = add_lora(trainable, net_cfg["linear"], net_cfg["linear_alpha"], family.lora_targets(net_cfg),
                              net_cfg)
    if train_cfg["gradient_checkpointing"]:
        trainable.enable_gradient_checkpointing()
    trainable.train()
    optimizer = make_optimizer(train_cfg["optimizer"], [{"params": parameters}, *text.groups],
                               train_cfg["lr"])  # the schedule scales both groups
    scheduler = make_scheduler(train_cfg["lr_scheduler"], optimizer, train_cfg["lr_warmup_steps"],
                               train_cfg["steps"])
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    # With mixed precision, prepare() wraps the transformer's forward in autocast and float32
    # outputs. The loop runs its own accelerator.autocast(); sampling (and ComfyUI, which shares
    # this transformer) need the model's own forward, or float32 latents meet a bf16 VAE.
    unwrapped = accelerator.unwrap_model(trainable, keep_fp32_wrapper=False)
    vars(unwrapped).pop("forward", None)  # unwrap rebinds the original; the class method is it
    ema = make_ema(train_cfg, parameters + text.parameters)  # the trained weights' own order
    if folder.resume is not None:
        resume(session, folder, accelerator.unwrap_model(trainable), text.encoders, optimizer, scheduler, ema)
    to_kohya = family.lora_to_kohya(accelerator.unwrap_model(trainable))
    if accelerator.is_main_process:
        write_run_config(session, planned, folder, model.sizes)
    return Trainable(trainable, parameters, text, optimizer, scheduler, to_kohya,
                     family.compute_dtype(pipeline),  # asked once: diffusers walks every module
                     family.uses_guidance(pipeline), ema)


def resume(session, folder, model, text_encoders, optimizer, scheduler, ema):
    """Loads the newest complete checkpoint that fits this model and optimizer (checked first,
    core/trainer/checkpoints.py; a misfit is skipped by name for the one before it), and sets
    folder.resume to what was loaded (None: training starts at step 0)."""
    step, refused = fit_and_load(folder.run, folder.resume, model, text_encoders, optimizer,
                                 scheduler, session.config["train"]["optimizer"], ema)
    for message in refused:
        session.warn(message)
    folder.resume = (step, None) if step else None
    if step:
        session.emit({"type": "resume", "step": step})


def write_run_config(session, planned, folder, sizes):
    """config.json with the run's versions, dataset stats and plan; metrics cut back to the start."""
    run, scan = folder.run, planned.scan
    metrics_problem = run.truncate_metrics(folder.start_step)  # also drops a torn last line
    if metrics_problem:
        session.warn(metrics_problem)
    run.write_config({**session.config, "versions": versions(), "plan": planned.numbers(),
                      "dataset_stats": {"images": len(planned.training), "skipped": scan.skipped,
                                        "regularization_images": len(planned.regularization),
                                        "validation_images": [os.path.basename(scan.items[i].path)
                                                              for i in planned.held_out],
                                        "fingerprint": folder.fingerprint,
                                        "buckets": sorted({s for v in sizes.values() for s in v})}})
