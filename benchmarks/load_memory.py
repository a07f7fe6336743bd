"""Benchmark: the RAM that loading each FLUX.1 part from its single file adds, against the bytes
the loaded part holds. Loading streams tensor by tensor into an empty (meta) model, so the peak
should stay near the model's own size: the bound checked is 1.3 x.

Files: `write_real_width_files` (core/families/flux/tiny.py) writes FLUX-width random files into a
temporary folder: a transformer of hidden 3072 / 24 heads with one double and one single block
(bf16, BFL keys), a T5 of T5-XXL's widths with one layer, a real-shape CLIP-L, FLUX.1's VAE.

Each load runs in a FRESH subprocess, so one part's peak never mixes with another's or with the
file writing. In that process every library the loader uses is imported first; then the peak RSS
counter (VmHWM) is reset by writing "5" to /proc/self/clear_refs, VmRSS is read, the part is
loaded, and VmHWM is read again: peak added = VmHWM after - VmRSS before. Resetting matters:
getrusage's ru_maxrss cannot be reset, so it would report the import peak whenever that is
higher than the load's. Where clear_refs cannot be written, a thread samples VmRSS every 1 ms
instead (it can miss a short spike; the table says which method was used).

    python benchmarks/load_memory.py [--folder DIR] [--keep] [--dtype bf16]

Qwen-Image's rows load its files (core/families/qwen_image/tiny.py write_real_width_files: a
transformer of width 3072 with one block, Qwen2.5-VL 7B with one layer and one vision block, the
real VAE) the same way.
Z-Image (core/families/zimage/tiny.py `write_real_width_files`): a transformer of dim 3840 / 30
heads with one main layer and one refiner of each kind, in ComfyUI's layout, and a Qwen3 of
Qwen3-4B's widths with one layer, loaded by core/families/zimage/single_files.py.
FLUX.2 klein (core/families/flux2/tiny.py `write_real_width_files`): a transformer of klein 4B's
widths (3072 wide, 24 heads, 7680-wide text; diffusers' klein-4b config) with one double and one
single block in BFL's names, and the FLUX.2 VAE at its real size, loaded by
core/families/flux2/files.py (its Qwen3 is Z-Image's row).

Rows: the transformer, CLIP-L, T5 and VAE loaded in bf16 (their load dtype, bound relative to
their bf16 bytes); the transformer with quantize "fp8" (block linears in float8: bound relative to
the bytes it holds then); and the whole pipeline from the four files (load_pipeline_from_files,
tokenizers from ComfyUI's checkout at LORALAB_COMFYUI).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

BOUND = 1.3
PARTS = [("transformer", "none"), ("transformer", "fp8"), ("clip_l", "none"), ("t5", "none"),
         ("vae", "none"), ("pipeline", "none"),
         ("qwen_image:transformer", "none"), ("qwen_image:transformer", "fp8"),
         ("qwen_image:text_encoder", "none"), ("qwen_image:vae", "none"),
         ("zimage_transformer", "none"), ("zimage_text_encoder", "none"),
         ("flux2_transformer", "none"), ("flux2_vae", "none")]


# ---------------------------------------------------------------------------------------------
# The child: one load, measured


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMeter:
    """Peak RSS added by the code in its `with` block, in bytes."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS"
        self.before = _status_kib("VmRSS")
        self.sampled, self._stop = self.before, threading.Event()
        if self.method != "VmHWM":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.sampled, _status_kib("VmRSS"))
        self.added = (peak - self.before) * 1024
        self.after = (_status_kib("VmRSS") - self.before) * 1024
        return False


def _held_bytes(module):
    """Bytes of the tensors a module holds, each storage counted once (T5's tied embeddings)."""
    seen, total = set(), 0
    tensors = [p for p in module.parameters()] + [b for b in module.buffers() if b is not None]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and tensor.device.type != "meta":
            seen.add(key)
            total += storage.nbytes()
    return total


def child(slot, quantize, paths, dtype_name):
    # everything the loaders import, imported before the measurement starts
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: F401
    from transformers import (CLIPTextModel, CLIPTokenizer, T5EncoderModel,  # noqa: F401
                              T5TokenizerFast)

    from loralab.core.families.flux import single_files
    from loralab.core.families.zimage import single_files as zimage_files
    from loralab.core.dtypes import torch_dtype

    dtype = torch_dtype(dtype_name)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    if slot.startswith("qwen_image:"):  # Qwen-Image's files (core/families/qwen_image/files.py)
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # noqa: F401
        from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

        from loralab.core.families.qwen_image import files

        part = slot.split(":")[1]
        load = {"transformer": lambda path: files.load_transformer(path, None, dtype, quantize),
                "text_encoder": lambda path: files.load_text_encoder(path, dtype),
                "vae": lambda path: files.load_vae(path, dtype)}[part]
        with PeakMeter() as meter:
            loaded = load(paths[slot])
        print(json.dumps({"added": meter.added, "after": meter.after, "held": _held_bytes(loaded),
                          "method": meter.method, "seconds": time.perf_counter() - started}))
        return
    if slot.startswith("flux2_"):  # FLUX.2 klein's files (core/families/flux2/files.py)
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel  # noqa: F401

        from loralab.core.families.flux2 import files as flux2_files
    with PeakMeter() as meter:
        if slot.startswith("flux2_"):
            loaded = {"flux2_transformer": flux2_files.load_transformer, "flux2_vae": flux2_files.load_vae}[slot](
                paths[slot], dtype)
        elif slot.startswith("zimage_"):  # Z-Image's transformer (ComfyUI's layout) and Qwen3
            load = zimage_files.load_transformer if slot == "zimage_transformer" else zimage_files.load_text_encoder
            loaded = load(paths[slot], dtype)
        elif slot == "pipeline":
            loaded = single_files.load_pipeline_from_files(paths["transformer"], paths["clip_l"],
                                                           paths["t5"], paths["vae"], dtype, quantize)
        else:
            loaded = single_files.load_part(slot, paths[slot], dtype, quantize)
    seconds = time.perf_counter() - started
    if slot == "pipeline":
        held = sum(_held_bytes(getattr(loaded, name))
                   for name in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    else:
        held = _held_bytes(loaded)
    print(json.dumps({"added": meter.added, "after": meter.after, "held": held, "method": meter.method,
                      "seconds": seconds}))


# ---------------------------------------------------------------------------------------------
# The parent: files, one child per row, the table


def _file_bytes(path):
    from loralab.core.families.parts.files import read_header

    tensors, _ = read_header(path)
    return sum(info["data_offsets"][1] - info["data_offsets"][0] for info in tensors.values())


def _mib(n):
    return f"{n / 2**20:,.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="where the files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="load dtype (the bound is relative to the bytes loaded in it)")
    parser.add_argument("--only", help="comma-separated rows: transformer,transformer-fp8,clip_l,t5,vae,pipeline,"
                                       "qwen_image:transformer,qwen_image:transformer-fp8,qwen_image:text_encoder,"
                                       "qwen_image:vae,zimage_transformer,zimage_text_encoder,flux2_transformer,flux2_vae")
    parser.add_argument("--child", nargs=3, metavar=("SLOT", "QUANTIZE", "PATHS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        slot, quantize, paths = args.child
        return child(slot, quantize, json.loads(paths), args.dtype)

    from loralab.core.families.flux.tiny import write_real_width_files
    from loralab.core.families.flux2.tiny import write_real_width_files as flux2_files
    from loralab.core.families.qwen_image.tiny import write_real_width_files as qwen_image_files
    from loralab.core.families.zimage.tiny import write_real_width_files as write_zimage_files

    rows = [(s, q) for s, q in PARTS if not args.only or
            (s + ("-fp8" if q == "fp8" else "")) in args.only.split(",")]
    folder = args.folder or tempfile.mkdtemp(prefix="loralab-load-memory-")
    started = time.perf_counter()
    paths = {}
    writers = (("qwen_image:", lambda: {f"qwen_image:{k}": v for k, v in
                                         qwen_image_files(os.path.join(folder, "qwen_image")).items()}),
               ("zimage_", lambda: write_zimage_files(folder)),
               ("flux2_", lambda: flux2_files(os.path.join(folder, "flux2"))),
               ("", lambda: write_real_width_files(folder)))  # FLUX.1's rows: the rest
    for start, write in writers:  # only the files of the rows asked for
        if any(s.startswith(start) and not any(s.startswith(w) for w, _ in writers if w and w != start)
               for s, _ in rows):
            paths.update(write())
    print(f"files in {folder} ({time.perf_counter() - started:.0f} s to write): "
          + ", ".join(f"{k} {_mib(os.path.getsize(p))} MiB" for k, p in paths.items()), flush=True)
    env = dict(os.environ)
    comfyui = env.setdefault("LORALAB_COMFYUI", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "..", "..", "shared", "comfyui"))
    header = (f"{'part':<28}{'file MiB':>10}{'held MiB':>10}{'peak added MiB':>16}{'ratio':>7}"
              f"{'after MiB':>11}{'seconds':>9}  bound {BOUND}x")
    print(header)
    print("-" * len(header))
    failed = []
    try:
        for slot, quantize in rows:
            name = slot + (" (quantize fp8)" if quantize == "fp8" else "")
            if slot == "pipeline" and not os.path.isfile(os.path.join(comfyui, "comfy", "sd1_tokenizer", "vocab.json")):
                print(f"{name:<28}skipped: no ComfyUI checkout for the tokenizers (set LORALAB_COMFYUI)")
                continue
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--dtype", args.dtype, "--child",
                                   slot, quantize, json.dumps(paths)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{name:<28}failed: {done.stderr.strip().splitlines()[-1:]}")
                failed.append(name)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            file_bytes = sum(_file_bytes(paths[k]) for k in ("transformer", "clip_l", "t5", "vae")) if slot == "pipeline" \
                else _file_bytes(paths[slot])
            ratio = result["added"] / result["held"]
            within = ratio <= BOUND
            if not within:
                failed.append(name)
            print(f"{name:<28}{_mib(file_bytes):>10}{_mib(result['held']):>10}{_mib(result['added']):>16}"
                  f"{ratio:>7.2f}{_mib(result['after']):>11}{result['seconds']:>9.1f}  "
                  f"{'within' if within else 'EXCEEDS'} ({result['method']})", flush=True)
    finally:
        if not args.keep and not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    print("held: bytes of the loaded part's tensors (its load dtype; fp8 block weights at 1 byte). "
          "peak added: peak RSS during the load minus RSS before it. after: RSS kept once loaded.")
    if failed:
        print("over the bound: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
