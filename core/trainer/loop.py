"""The training loop: one function, top to bottom. Model-specific math lives in the family
module (core/families/<family>), file formats in core/lora, the run folder in core/runs."""
import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from .. import UserError
from ..coach.demo_score import FILE as DEMO_SCORES, demo_scores, is_demo
from ..coach.monitor import Monitor
from ..config import recommended_steps, steps_per_epoch
from ..dataset import (BatchPlan, Cache, add_regularization, hold_out, image_sizes, model_fingerprint,
                       regularization_entries, scan_folder)
from ..dataset.buckets import crop_top_left
from ..dataset.cache import file_digest
from ..families import get_family, load_model, model_files
from ..families.builtin import resolve_dataset_folder
from ..families.preservation import base_encoding, class_caption, preservation_batch
from ..lora import add_lora, add_text_encoder_lora, load_lora_weights, lora_weights
from ..memory import device_memory, out_of_memory_advice, resolve_memory_settings
from ..runs import choose_run_folder, write_json
from ..runs.atomic import save_image
from ..runs.fingerprint import dataset_fingerprint
from ..runs.plot import loss_plot
from ..sampling import encoded_now, prompts_with_trigger, sample_images, save_samples
from .checkpoints import load_resume_state, save_checkpoint, write_lora
from .metrics import peak_memory_mb, versions
from .optimizers import make_optimizer, make_scheduler
from .precision import check_precision
from .shared_model import given_back_unchanged
from .validation import HeldOut

MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


class ResumeError(UserError, ValueError):
    """The run folder's checkpoints do not fit this config."""


@dataclass
class TrainResult:
    status: str                  # "finished", "interrupted", "already finished", "stopped: nan"
    run_folder: str
    lora_path: str               # the final file, or the newest checkpoint when stopped early
    step: int
    steps: int
    weights: dict = field(repr=False, default=None)   # float32 peft weights of the LoRA
    config: dict = field(repr=False, default=None)
    warnings: list = field(default_factory=list)
    memory: list = field(default_factory=list)   # what quantize/checkpointing "auto" chose, and why


def agreed(accelerator, flag):
    """True on every process when `flag` is true on any of them."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum") > 0)


class OutOfMemory(UserError, RuntimeError):
    """The accelerator ran out of memory; the message says which settings to change."""


def train(config, pipeline=None, on_event=None, should_stop=None):
    """Trains the LoRA that `config` (resolved, see core.config) describes. `pipeline` reuses an
    already loaded base model; `on_event(dict)` receives progress; `should_stop()` is checked
    every step (a stop saves a checkpoint first, so running again resumes)."""
    try:
        with given_back_unchanged(get_family(config["model"]["family"]), pipeline):  # error or not
            with contextlib.ExitStack() as held:  # the run folder's lock, for the whole run
                return _train(config, pipeline, on_event, should_stop, held)
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        raise OutOfMemory(out_of_memory_advice(config, error)) from None


def _train(config, pipeline, on_event, should_stop, held):
    model_cfg, data_cfg, net_cfg = config["model"], config["dataset"], config["network"]
    train_cfg, save_cfg, sample_cfg = config["train"], config["save"], config["sample"]
    # A long-lived process (ComfyUI) trains many times with different precisions: accelerate keeps
    # its state in a singleton, so start each run from a fresh one (the process group stays).
    AcceleratorState._reset_state()
    # accumulate() counts micro-steps: under DDP only the last of each step all-reduces (no_sync)
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[train_cfg["dtype"]],
                              gradient_accumulation_steps=train_cfg["gradient_accumulation_steps"],
                              cpu=not torch.cuda.is_available())  # cpu: torchrun on CPUs is DDP too
    device = accelerator.device
    check_precision(model_cfg["dtype"], train_cfg["dtype"], device.type, model_cfg["quantize"])
    # quantize and gradient checkpointing "auto" become what the memory estimate needs on this
    # device (a run that cannot fit stops here, before loading); the run folder records them.
    quantize, checkpointing, memory_notes = resolve_memory_settings(config, device_memory(device),
                                                                    device.type)
    config = {**config, "model": {**model_cfg, "quantize": quantize},
              "train": {**train_cfg, "gradient_checkpointing": checkpointing}}
    model_cfg, train_cfg = config["model"], config["train"]
    emit = (on_event if accelerator.is_main_process else None) or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    family = get_family(model_cfg["family"])

    # -- dataset and plan (before any model loads, so a bad folder fails fast) --------------
    scan = scan_folder(resolve_dataset_folder(data_cfg["folder"]), data_cfg["caption_ext"],
                       data_cfg["trigger_word"])
    training, held_out = hold_out(scan, data_cfg.get("validation_images", 0))  # indices into scan.items
    regularization = []  # indices of the regularization images, appended after the dataset's
    if data_cfg.get("regularization_folder"):  # their captions are as written: no trigger word
        regularization = add_regularization(scan, scan_folder(
            resolve_dataset_folder(data_cfg["regularization_folder"]), data_cfg["caption_ext"], "",
            key="dataset.regularization_folder"))
    notes = [f"skipped {name}: {reason}" for name, reason in scan.skipped]
    notes += family.advice(model_cfg)  # a known trap of this model (the coach)
    if device.type == "cpu" and train_cfg["optimizer"] == "adamw8bit":
        notes.append("train.optimizer adamw8bit runs on this CPU but slowly (bitsandbytes' 8-bit "
                     "states are a GPU feature); without a GPU, adamw is much faster.")
    for note in notes:
        emit({"type": "warning", "message": note})
    for note in memory_notes:
        emit({"type": "status", "message": note})
    # regularization images add dataset.regularization_ratio entries per training entry to each
    # epoch (BatchPlan), so the guide's steps for the training images grow by as much
    ratio = data_cfg.get("regularization_ratio", 1.0) if regularization else 0
    steps = train_cfg["steps"] or round(recommended_steps(len(training)) * (1 + ratio))
    batch_size = train_cfg["batch_size"]
    entries = len(training) * data_cfg["repeats"]
    entries += regularization_entries(entries, ratio)
    emit({"type": "plan", "images": len(training), "regularization_images": len(regularization),
          "steps": steps, "steps_per_epoch": steps_per_epoch(entries, 1, batch_size)})

    # -- the run folder: one training per folder, held by this run (before any model loads) ------
    digests = {index: file_digest(item.path) for index, item in enumerate(scan.items)}
    fingerprint = dataset_fingerprint(scan, digests)  # the cache keys reuse these digests
    run, started_because = choose_run_folder(
        save_cfg["output_dir"], config["name"],
        {**config, "train": {**train_cfg, "steps": steps}, "dataset_stats": {"fingerprint": fingerprint}},
        train_cfg["resume"])
    accelerator.wait_for_everyone()  # every process has chosen before the main one creates it
    if accelerator.is_main_process:
        held.enter_context(run.lock())  # RunLocked when another training holds this folder
        run.clean_temporaries()
    if started_because:
        emit({"type": "status", "message": f"a new run folder {run.path}: {started_because}"})
    found, skipped = load_resume_state(run)  # a broken state is skipped, by name, for the one before
    for message in skipped:
        notes.append(message)
        emit({"type": "warning", "message": message})
    start_step = found[0] if found else 0
    result = TrainResult("finished", run.path, run.final_lora, start_step, steps, config=config,
                         warnings=notes, memory=memory_notes)
    if start_step >= steps and os.path.isfile(run.final_lora):  # no model loads; no file changes
        result.status, result.weights = "already finished", found[1]["lora"]
        emit({"type": "done", "status": result.status, "step": start_step, "path": run.final_lora})
        return result

    torch.manual_seed(train_cfg["seed"])

    # -- base model ---------------------------------------------------------------------------
    if pipeline is None:
        emit({"type": "status", "message": f"loading {model_cfg['path'] or model_cfg['transformer_path']}"})
        pipeline = load_model(model_cfg, quantize)
    family.encoders_to_device(pipeline, device)
    multiple = family.size_multiple(pipeline)

    # -- cache latents and (without a text-encoder LoRA) text embeddings once -----------------
    sizes = image_sizes(scan.items, data_cfg["resolution"], multiple)
    sample_prompts = prompts_with_trigger(sample_cfg["prompts"], data_cfg["trigger_word"])
    train_text = net_cfg.get("text_encoder", False)  # a text-encoder LoRA: no text is cached
    captions = [] if train_text else [item.caption for item in scan.items] + [""] + sample_prompts
    class_word = train_cfg["preservation_class"] if train_cfg["preservation_weight"] > 0 else ""
    if class_word:  # preservation's class captions are cached with the captions
        captions += [class_caption(c, data_cfg["trigger_word"], class_word) or c for c in captions]
    model_key = model_fingerprint(model_files(model_cfg), f"{model_cfg['dtype']}:{quantize}")
    cache = Cache(os.path.join(run.path, "cache") if data_cfg["cache"] == "disk" else None, digests)
    cache.fill(scan.items, sizes, captions,
               encode_image=lambda image: family.encode_image(pipeline, image, device),
               encode_texts=lambda texts: family.encode_prompts(pipeline, texts, device),
               model_key=model_key,
               on_progress=lambda done, total: emit({"type": "caching", "done": done, "total": total}))

    # -- text: (text [B, seq, dim], pooled [B, dim]) of captions, and the sample prompts' pairs --
    if train_text:  # the text encoders stay, with a LoRA at their own rate, and encode every step
        text_encoders = family.text_encoders(pipeline)
        text_parameters = add_text_encoder_lora(text_encoders, net_cfg["linear"], net_cfg["linear_alpha"],
                                                family.text_encoder_lora_targets(net_cfg))
        text_lr = train_cfg.get("text_encoder_lr")  # None: train.lr
        text_groups = [{"params": text_parameters, "lr": train_cfg["lr"] if text_lr is None else text_lr}]
        encode = lambda texts: family.encode_batch(pipeline, texts, device)
        encode_base = lambda texts: base_encoding(family, pipeline, texts, device, text_encoders)
        sample_embeds = lambda: encoded_now(family, pipeline, sample_prompts, device)
    else:
        family.free_text_encoders(pipeline)  # their work is done: freed before the transformer comes on
        text_encoders, text_parameters, text_groups = {}, [], []
        encode = lambda texts: tuple(torch.stack(part) for part in zip(*map(cache.text, texts)))
        encode_base = encode  # the cache holds the base text encoders' embeddings
        sample_embeds = lambda: ([cache.text(p) for p in sample_prompts], cache.text(""))
    family.to_device(pipeline, device)

    # -- LoRA, optimizer, schedule -----------------------------------------------------------
    model = family.trainable_model(pipeline)
    parameters = add_lora(model, net_cfg["linear"], net_cfg["linear_alpha"], family.lora_targets(net_cfg))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = make_optimizer(train_cfg["optimizer"], [{"params": parameters}, *text_groups],
                               train_cfg["lr"])  # the schedule scales both groups
    scheduler = make_scheduler(train_cfg["lr_scheduler"], optimizer, train_cfg["lr_warmup_steps"], steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # With mixed precision, prepare() wraps the transformer's forward in autocast and float32
    # outputs. The loop runs its own accelerator.autocast(); sampling (and ComfyUI, which shares
    # this transformer) need the model's own forward, or float32 latents meet a bf16 VAE.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    vars(unwrapped).pop("forward", None)  # unwrap rebinds the original; the class method is it

    # -- resume from the newest complete checkpoint -------------------------------------------
    if found is not None:
        resumable, state = found
        try:
            load_lora_weights(accelerator.unwrap_model(model), state["lora"], text_encoders)
        except (RuntimeError, ValueError):
            ranks = {v.shape[0] for k, v in state["lora"].items() if ".lora_A." in k}
            raise ResumeError(f"{run.checkpoint(resumable)} was trained with other network settings "
                              f"(rank {sorted(ranks)}, this config network.linear = {net_cfg['linear']}). "
                              "Give this run another name, or set train.resume to false to start "
                              "a new run folder beside it.") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        emit({"type": "resume", "step": start_step})
    to_kohya = family.lora_to_kohya(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        metrics_problem = run.truncate_metrics(start_step)  # also drops a torn last line
        if metrics_problem:
            notes.append(metrics_problem)
            emit({"type": "warning", "message": metrics_problem})
        run.write_config({**config, "train": {**train_cfg, "steps": steps}, "versions": versions(),
                          "dataset_stats": {"images": len(training), "skipped": scan.skipped,
                                            "regularization_images": len(regularization),
                                            "validation_images": [os.path.basename(scan.items[i].path)
                                                                  for i in held_out],
                                            "fingerprint": fingerprint,
                                            "buckets": sorted({s for v in sizes.values() for s in v})}})

    monitor = Monitor(run, [scan.items[i].path for i in training])

    def warn(messages, step):
        for message in messages:
            result.warnings.append(message)
            emit({"type": "warning", "step": step, "message": message})

    def sample(step):
        model.eval()
        images = sample_images(family, pipeline, sample_embeds, [1.0], sample_cfg, device)
        model.train()
        paths = save_samples(run.samples(step), images, sample_prompts)
        emit({"type": "sample", "step": step, "paths": paths, "image": images[1.0][0]})
        warn(monitor.on_samples(step, images[1.0]), step)

    plan = BatchPlan({i: sizes[i] for i in training}, data_cfg["repeats"], batch_size, train_cfg["seed"],
                     regularization={i: sizes[i] for i in regularization},
                     ratio=ratio)
    loss_weights = {i: data_cfg.get("regularization_weight", 1.0) for i in regularization}  # others: 1
    compute_dtype = family.compute_dtype(pipeline)  # asked once: diffusers walks every module
    uses_guidance = family.uses_guidance(pipeline)
    validation = HeldOut(family, scan.items, held_out, sizes, cache.latent, encode, train_cfg,
                         uses_guidance, device, compute_dtype, accelerator.autocast)
    generator = torch.Generator()
    accumulation = train_cfg["gradient_accumulation_steps"]
    processes, rank = accelerator.num_processes, accelerator.process_index
    dropout = data_cfg["caption_dropout_rate"]
    sampling = sample_cfg["sample_every"] > 0 and sample_prompts and accelerator.is_main_process
    if sampling and start_step == 0:
        sample(0)  # the base model's images: what every later sample is compared with
    losses, window_start = [], time.perf_counter()
    emit({"type": "start", "step": start_step, "steps": steps})

    # -- the loop -------------------------------------------------------------------------------
    skipped, skipped_in_a_row = 0, 0   # updates skipped for a non-finite loss or gradient
    for step in range(start_step + 1, steps + 1):
        step_losses, lr = [], scheduler.get_last_lr()[0]  # the rate this step's update uses
        for micro in range(accumulation):
            position = ((step - 1) * accumulation + micro) * processes + rank
            generator.manual_seed(train_cfg["seed"] * 1_000_003 + position)  # resume = same draws
            entries = plan.batch(position)
            texts = [("" if torch.rand(1, generator=generator).item() < dropout
                      else scan.items[e.image].caption) for e in entries]
            text, pooled = encode(texts)
            batch = {"latents": torch.stack([cache.latent(e.image, e.size) for e in entries]),
                     "text": text, "pooled": pooled}
            if regularization:
                batch["loss_weight"] = torch.tensor([loss_weights.get(e.image, 1.0) for e in entries])
            if class_word:  # preservation: the captions with the class word for the trigger
                batch.update(preservation_batch(texts, data_cfg["trigger_word"], class_word, encode, encode_base))
            batch = {k: v.to(device, compute_dtype) for k, v in batch.items()}
            # Sizes stay integers (bf16 cannot hold 1023): the source image's and its centre crop's
            batch["original_size"] = torch.tensor(
                [(scan.items[e.image].height, scan.items[e.image].width) for e in entries], device=device)
            batch["crop_top_left"] = torch.tensor(
                [crop_top_left(scan.items[e.image].width, scan.items[e.image].height, e.size)
                 for e in entries], device=device)
            with accelerator.accumulate(model), accelerator.autocast():
                loss = family.training_loss(model, batch, generator, train_cfg, uses_guidance)
                # backward divides by the accumulation steps; it runs even on a non-finite loss,
                # so every rank joins the last micro-step's all-reduce
                accelerator.backward(loss)
            step_losses.append(loss.item())
        # The last micro-step synced the gradients: the norm is taken after the all-reduce, and
        # the verdict is summed over all ranks, so every process skips (or stops) together.
        if processes > 1:  # the text encoders are outside DDP's wrapper: averaged here, as DDP does
            for parameter in text_parameters:
                parameter.grad = accelerator.reduce(parameter.grad, "mean")
        grad_norm = accelerator.clip_grad_norm_(parameters + text_parameters,
                                                train_cfg["max_grad_norm"] or math.inf)
        step_loss = accelerator.reduce(torch.tensor([sum(step_losses) / accumulation], device=device),
                                       "mean").item()  # over every micro-step of every process
        nonfinite = agreed(accelerator, not (math.isfinite(step_loss) and torch.isfinite(grad_norm)))
        if nonfinite and accelerator.scaler is None:  # the weights never see a NaN
            optimizer.zero_grad(set_to_none=True)
        else:  # (fp16: the grad scaler skips an overflowing step itself and lowers its scale)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            nonfinite = accelerator.optimizer_step_was_skipped
        skipped_in_a_row = skipped_in_a_row + 1 if nonfinite else 0
        skipped += nonfinite
        if not nonfinite:
            losses.append(step_loss)
        emit({"type": "step", "step": step, "steps": steps, "loss": step_loss,
              "lr": lr, "grad_norm": grad_norm.item()})
        if skipped_in_a_row >= train_cfg["max_nonfinite_steps"]:
            last_good = run.resumable()
            result.status = "stopped: nan"
            result.lora_path = run.checkpoint(last_good) if last_good is not None else None
            warn([f"the loss or its gradients were NaN/inf for {skipped_in_a_row} steps in a row, so "
                  "training stopped; those updates were skipped, and the last checkpoint is kept "
                  f"({result.lora_path}). Likely cause: a learning rate far too high or fp16 "
                  "overflow; lower train.lr or use train.dtype bf16/fp32."], step)
            break
        if (step % config["logging"]["performance_log_every"] == 0 or step == steps) and losses:
            cpu_mb, gpu_mb = peak_memory_mb(device)
            line = {"step": step, "loss": sum(losses) / len(losses), "lr": lr,
                    "grad_norm": grad_norm.item(),  # this step's, before clipping
                    "seconds_per_step": (time.perf_counter() - window_start) / len(losses),
                    "cpu_peak_mb": cpu_mb, "gpu_peak_mb": gpu_mb,
                    "epoch": plan.epoch_of(position), "skipped_steps": skipped,
                    **validation.metrics(model, text_encoders.values())}  # {} when none held out
            if accelerator.is_main_process:
                run.append_metrics(line)
            emit({"type": "log", **line})
            warn(monitor.on_log(line), step)
            losses, window_start = [], time.perf_counter()
        stopping = agreed(accelerator, should_stop())  # a stop asked of any process stops all
        if accelerator.is_main_process and (step % save_cfg["save_every"] == 0 or step == steps or stopping):
            weights = lora_weights(accelerator.unwrap_model(model), text_encoders)
            path = save_checkpoint(run, step, weights, optimizer, scheduler, config, to_kohya)
            removed = run.rotate(save_cfg["max_step_saves_to_keep"])
            emit({"type": "checkpoint", "step": step, "path": path, "removed": removed})
        if sampling and step % sample_cfg["sample_every"] == 0 and step != steps:
            sample(step)
        result.step = step
        if stopping:
            result.status, result.lora_path = "interrupted", run.checkpoint(step)
            emit({"type": "interrupted", "step": step, "path": result.lora_path})
            break

    # -- the final LoRA, its last samples, then the run's verdict ------------------------------------
    result.weights = lora_weights(accelerator.unwrap_model(model), text_encoders)
    if result.status == "finished" and accelerator.is_main_process:
        write_lora(run.final_lora, result.weights, config, result.step, to_kohya)
        if sampling:
            sample(result.step)
        if is_demo(data_cfg["folder"]):  # the demo's verdict in pixels, for the run summary
            write_json(run.file(DEMO_SCORES), demo_scores(
                family, pipeline, {"weights": result.weights, "network": net_cfg},
                data_cfg["trigger_word"], sample_cfg, device))
    warn(monitor.finish(), result.step)
    if accelerator.is_main_process:
        save_image(loss_plot(run.read_metrics(), title=f"{config['name']} loss"), run.file("loss.png"))
        write_json(run.file("warnings.json"), result.warnings)
        if result.status == "finished":
            emit({"type": "done", "status": "finished", "step": result.step, "path": run.final_lora})
    accelerator.wait_for_everyone()
    return result
