"""The training loop, in named stages read top to bottom in _train: start, plan, run folder, model
and caches, LoRA and optimizer (setup.py), then the step loop and the finish here. Model-specific
math lives in the family module (core/families/<family>), file formats in core/lora, the run
folder in core/runs."""
import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from .. import UserError
from ..coach.monitor import Monitor
from ..cpu_threads import training_threads
from ..dataset.buckets import crop_top_left
from ..families import get_family
from ..families.preservation import preservation_batch
from ..io import save_image
from ..lora import lora_weights
from ..memory import out_of_memory_advice
from ..runs import write_json
from ..runs.plot import loss_plot
from ..sampling import sample_images, save_samples
from . import setup
from .checkpoints import save_checkpoint, write_lora
from .metrics import peak_memory_mb
from .shared_model import given_back_unchanged
from .validation import HeldOut


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


class OutOfMemory(UserError, RuntimeError):
    """The accelerator ran out of memory; the message says which settings to change."""


def train(config, pipeline=None, on_event=None, should_stop=None):
    """Trains the LoRA that `config` (resolved, see core.config) describes. `pipeline` reuses an
    already loaded base model; `on_event(dict)` receives progress; `should_stop()` is checked
    every step (a stop saves a checkpoint first, so running again resumes)."""
    try:
        with given_back_unchanged(get_family(config["model"]["family"]), pipeline), \
                training_threads("cuda" if torch.cuda.is_available() else "cpu"):  # error or not
            with contextlib.ExitStack() as held:  # the run folder's lock, for the whole run
                return _train(config, pipeline, on_event, should_stop or (lambda: False), held)
    except torch.cuda.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        raise OutOfMemory(out_of_memory_advice(config, error)) from None


def _train(config, pipeline, on_event, should_stop, held):
    session = setup.start(config, on_event)
    planned = setup.plan(session)
    folder = setup.run_folder(session, planned, held)
    result = TrainResult("finished", folder.run.path, folder.run.final_lora, folder.start_step,
                         planned.steps, config=session.config, warnings=session.notes,
                         memory=session.memory)
    if folder.start_step >= planned.steps and folder.run.has_final_lora():  # nothing loads or changes
        state = folder.resume[1]  # with train.ema, the file's weights are the average's
        result.status, result.weights = "already finished", state.get("ema_lora", state["lora"])
        session.emit({"type": "done", "status": result.status, "step": result.step, "path": result.lora_path})
        return result
    torch.manual_seed(session.config["train"]["seed"])
    model = setup.model_and_caches(session, planned, folder, pipeline)
    trainable = setup.lora_and_optimizer(session, planned, folder, model)
    result.step = folder.start_step  # a resume state that did not fit the model is skipped
    watch = Watch(session, folder.run, model, trainable, result,
                  Monitor(folder.run, [planned.scan.items[i].path for i in planned.training]))
    step_loop(session, planned, folder.run, model, trainable, watch, should_stop)
    finish(session, planned, folder.run, model, trainable, watch)
    return result


@dataclass
class Watch:
    """What the run reports besides its steps: warnings (the coach's Monitor) and samples."""
    session: setup.Session
    run: object
    model: setup.Model
    trainable: setup.Trainable
    result: TrainResult
    monitor: Monitor

    @property
    def sampling(self):
        every = self.session.config["sample"]["sample_every"]
        return every > 0 and self.model.sample_prompts and self.session.accelerator.is_main_process

    def warn(self, messages, step):
        for message in messages:
            self.session.warn(message, step)

    def sample(self, step):
        session, model = self.session, self.trainable.model
        model.eval()
        with self.trainable.ema.applied():  # train.ema: the samples show the weights saved
            images = sample_images(session.family, self.model.pipeline, self.trainable.text.sample_embeds,
                                   [1.0], session.config["sample"], session.device)
        model.train()
        paths = save_samples(self.run.samples(step), images, self.model.sample_prompts)
        session.emit({"type": "sample", "step": step, "paths": paths, "image": images[1.0][0]})
        self.warn(self.monitor.on_samples(step, images[1.0]), step)


def agreed(accelerator, flag):
    """True on every process when `flag` is true on any of them."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum") > 0)


def micro_batch(session, planned, model, trainable, entries, generator):
    """The tensors of one micro-step's batch: latents, caption embeddings (dropped to "" at
    dataset.caption_dropout_rate), loss weights, preservation's, each image's size and crop."""
    data_cfg, device, text = session.config["dataset"], session.device, trainable.text
    items = planned.scan.items
    texts = [("" if torch.rand(1, generator=generator).item() < data_cfg["caption_dropout_rate"]
              else items[e.image].caption) for e in entries]
    embeddings, pooled = text.encode(texts)
    batch = {"latents": torch.stack([model.cache.latent(e.image, e.size) for e in entries]),
             "text": embeddings, "pooled": pooled}
    if planned.regularization:  # the regularization images' loss at dataset.regularization_weight
        others = set(planned.regularization)
        batch["loss_weight"] = torch.tensor([data_cfg["regularization_weight"] if e.image in others
                                             else 1.0 for e in entries])
    if model.cache.masks:  # masked loss: each latent cell's weight (1 for regularization images)
        batch["loss_mask"] = torch.stack([model.cache.mask(e.image, e.size) for e in entries])
    if model.class_word:  # preservation: the captions with the class word for the trigger
        batch.update(preservation_batch(texts, data_cfg["trigger_word"], model.class_word,
                                        text.encode, text.encode_base))
    batch = {k: v.to(device, trainable.compute_dtype) for k, v in batch.items()}
    # Sizes stay integers (bf16 cannot hold 1023): the source image's and its centre crop's
    batch["original_size"] = torch.tensor([(items[e.image].height, items[e.image].width) for e in entries],
                                          device=device)
    batch["crop_top_left"] = torch.tensor([crop_top_left(items[e.image].width, items[e.image].height, e.size)
                                           for e in entries], device=device)
    return batch


def step_loop(session, planned, run, model, trainable, watch, should_stop):
    accelerator, family, device, emit = session.accelerator, session.family, session.device, session.emit
    config, result, steps = session.config, watch.result, planned.steps
    train_cfg, save_cfg, sample_cfg = config["train"], config["save"], config["sample"]
    text, optimizer, scheduler = trainable.text, trainable.optimizer, trainable.scheduler
    batches = planned.batches(model.sizes)
    validation = HeldOut(family, planned.scan.items, planned.held_out, model.sizes, model.cache.latent,
                         text.encode, train_cfg, trainable.uses_guidance, device, trainable.compute_dtype,
                         accelerator.autocast)
    generator = torch.Generator()
    accumulation = train_cfg["gradient_accumulation_steps"]
    processes, rank = accelerator.num_processes, accelerator.process_index
    if watch.sampling and result.step == 0:
        watch.sample(0)  # the base model's images: what every later sample is compared with
    losses, window_start = [], time.perf_counter()
    emit({"type": "start", "step": result.step, "steps": steps})
    skipped, skipped_in_a_row = 0, 0   # updates skipped for a non-finite loss or gradient
    for step in range(result.step + 1, steps + 1):
        step_losses, lr = [], scheduler.get_last_lr()[0]  # the rate this step's update uses
        for micro in range(accumulation):
            position = ((step - 1) * accumulation + micro) * processes + rank
            generator.manual_seed(train_cfg["seed"] * 1_000_003 + position)  # resume = same draws
            batch = micro_batch(session, planned, model, trainable, batches.batch(position), generator)
            with accelerator.accumulate(trainable.model), accelerator.autocast():
                loss = family.training_loss(trainable.model, batch, generator, train_cfg, trainable.uses_guidance)
                # backward divides by the accumulation steps; it runs even on a non-finite loss,
                # so every rank joins the last micro-step's all-reduce
                accelerator.backward(loss)
            step_losses.append(loss.item())
        # The last micro-step synced the gradients: the norm is taken after the all-reduce, and
        # the verdict is summed over all ranks, so every process skips (or stops) together.
        if processes > 1:  # the text encoders are outside DDP's wrapper: averaged here, as DDP does
            for parameter in text.parameters:
                parameter.grad = accelerator.reduce(parameter.grad, "mean")
        grad_norm = accelerator.clip_grad_norm_(trainable.parameters + text.parameters,
                                                train_cfg["max_grad_norm"] or math.inf)
        step_loss = accelerator.reduce(torch.tensor([sum(step_losses) / accumulation], device=device),
                                       "mean").item()  # over every micro-step of every process
        nonfinite = agreed(accelerator, not (math.isfinite(step_loss) and torch.isfinite(grad_norm)))
        nonfinite = apply_update(accelerator, optimizer, scheduler, nonfinite)
        skipped_in_a_row = skipped_in_a_row + 1 if nonfinite else 0
        skipped += nonfinite
        if not nonfinite:
            losses.append(step_loss)
            trainable.ema.update()  # train.ema: follows each update the weights took
        emit({"type": "step", "step": step, "steps": steps, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item()})
        if skipped_in_a_row >= train_cfg["max_nonfinite_steps"]:
            stop_for_nonfinite(watch, skipped_in_a_row, step)
            break
        if (step % config["logging"]["performance_log_every"] == 0 or step == steps) and losses:
            cpu_mb, gpu_mb = peak_memory_mb(device)
            line = {"step": step, "loss": sum(losses) / len(losses), "lr": lr,
                    "grad_norm": grad_norm.item(),  # this step's, before clipping
                    "seconds_per_step": (time.perf_counter() - window_start) / len(losses),
                    "cpu_peak_mb": cpu_mb, "gpu_peak_mb": gpu_mb,
                    "epoch": batches.epoch_of(position), "skipped_steps": skipped,
                    **validation.metrics(trainable.model, text.encoders.values())}  # {} when none held out
            if accelerator.is_main_process:
                run.append_metrics(line)
            emit({"type": "log", **line})
            watch.warn(watch.monitor.on_log(line), step)
            losses, window_start = [], time.perf_counter()
        stopping = agreed(accelerator, should_stop())  # a stop asked of any process stops all
        if accelerator.is_main_process and (step % save_cfg["save_every"] == 0 or step == steps or stopping):
            save_step(session, run, trainable, step)
        if watch.sampling and step % sample_cfg["sample_every"] == 0 and step != steps:
            watch.sample(step)
        result.step = step
        if stopping:
            result.status, result.lora_path = "interrupted", run.checkpoint(step)
            emit({"type": "interrupted", "step": step, "path": result.lora_path})
            break


def apply_update(accelerator, optimizer, scheduler, nonfinite):
    """The optimizer and schedule step, unless the loss or gradients were non-finite; whether
    the update was skipped."""
    if nonfinite and accelerator.scaler is None:  # the weights never see a NaN
        optimizer.zero_grad(set_to_none=True)
        return True
    # (fp16: the grad scaler skips an overflowing step itself and lowers its scale)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.optimizer_step_was_skipped


def save_step(session, run, trainable, step):
    """A step checkpoint (train.ema: the EMA's weights in the file), then the rotation."""
    read = lambda: lora_weights(session.accelerator.unwrap_model(trainable.model), trainable.text.encoders)  # noqa: E731
    path = save_checkpoint(run, step, read(), trainable.optimizer, trainable.scheduler, session.config,
                           trainable.to_kohya, ema=trainable.ema.snapshot(read))
    session.emit({"type": "checkpoint", "step": step, "path": path,
                  "removed": run.rotate(session.config["save"]["max_step_saves_to_keep"])})


def stop_for_nonfinite(watch, in_a_row, step):
    """train.max_nonfinite_steps in a row: the run stops, keeping its last finite checkpoint."""
    run, result = watch.run, watch.result
    last_good = run.resumable()
    result.status = "stopped: nan"
    result.lora_path = run.checkpoint(last_good) if last_good is not None else None
    watch.warn([f"the loss or its gradients were NaN/inf for {in_a_row} steps in a row, so "
                "training stopped; those updates were skipped, and the last checkpoint is kept "
                f"({result.lora_path}). Likely cause: a learning rate far too high or fp16 "
                "overflow; lower train.lr or use train.dtype bf16/fp32."], step)


def finish(session, planned, run, model, trainable, watch):
    """The final LoRA, its last samples and the dataset's finish steps, then the run's verdict."""
    accelerator, config, result = session.accelerator, session.config, watch.result
    with trainable.ema.applied():  # train.ema: the file holds the average
        result.weights = lora_weights(accelerator.unwrap_model(trainable.model), trainable.text.encoders)
    if result.status == "finished" and accelerator.is_main_process:
        write_lora(run.final_lora, result.weights, config, result.step, trainable.to_kohya)
        if watch.sampling:
            watch.sample(result.step)
        for finish_step in planned.finish:  # e.g. the demo's verdict in pixels, for the run summary
            finish_step(run=run, family=session.family, pipeline=model.pipeline, weights=result.weights,
                        config=config, device=session.device)
    watch.warn(watch.monitor.finish(), result.step)
    if accelerator.is_main_process:
        save_image(loss_plot(run.read_metrics(), title=f"{config['name']} loss"), run.file("loss.png"))
        write_json(run.file("warnings.json"), result.warnings)
        if result.status == "finished":
            session.emit({"type": "done", "status": "finished", "step": result.step, "path": run.final_lora})
    accelerator.wait_for_everyone()
