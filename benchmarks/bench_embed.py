"""Images per second of ``fastclip embed`` (the command line, end to end) on this machine.

Run: ``python benchmarks/bench_embed.py`` (the CPU; writes benchmarks/results/embed_cpu.*), or
``python benchmarks/bench_embed.py --device cuda --images 8192 --vit-images 8192 --output
benchmarks/results/embed_gpu`` on a GPU machine. It writes ``<output>.json`` and
``<output>.md`` with the machine described.

What is measured:

- ``fastclip embed`` as a user runs it (a fresh process: import, model build, decoding in
  workers, writing), on generated 500x375 JPEGs, with a full-size random-weight ViT-B/32
  (``--model random:ViT-B/32``: the same compute as OpenAI's weights), for several
  ``--num-workers`` and weight dtypes. items/s is the command's own summary: all inputs over
  the whole wall time, start-up included.
- The same with ``random:tiny``, whose model costs almost nothing: the ceiling that decoding,
  preprocessing and writing put on the pipeline.
- A baseline: the loop most scripts run with OpenAI's package, one image at a time,
  ``model.encode_image(preprocess(Image.open(path))[None])``, timed in-process after the model
  is built (so it is not charged start-up).
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import fastclip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_images(folder, count):
    """JPEGs of 500x375 (a common photo size after downscaling), smooth plus noise so that
    they decode like photos rather than like flat colour."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for i in range(count):
        base = np.stack([(x * (i % 7 + 1) + y) % 256, (y * 2 + i) % 256, (x + y * 3) % 256], -1)
        noise = rng.integers(-20, 21, base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def run_cli(images, output, model, workers, batch_size, extra=(), device="cpu"):
    shutil.rmtree(output, ignore_errors=True)
    load_before = os.getloadavg()[0]
    command = [sys.executable, "-m", "fastclip", "embed", "--images", images, "-o", output,
               "--model", model, "--num-workers", str(workers), "--batch-size",
               str(batch_size), "--device", device, "--no-progress", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    summary = re.search(r"(\d+) items, (\d+) failures, ([\d.]+) items/s, ([\d.]+) s wall",
                        result.stderr)
    return {"model": model, "num_workers": workers, "batch_size": batch_size,
            "options": " ".join(extra), "items": int(summary.group(1)),
            "items_per_second": float(summary.group(3)), "embed_seconds": float(summary.group(4)),
            "process_seconds": round(wall, 2),
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only(count, batch_size=64, device="cpu"):
    """The compute ceiling under the same conditions: batched ``encode_image`` on ready
    tensors, in-process, no decoding or writing."""
    model, _ = fastclip.load("random:ViT-B/32", device=device)
    batch = torch.randn(batch_size, 3, 224, 224, device=device)
    with torch.inference_mode():
        model.encode_image(batch)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        done = 0
        while done < count:
            model.encode_image(batch)
            done += batch_size
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"model": "random:ViT-B/32", "loop": f"encode_image on ready batches of "
            f"{batch_size}, in-process", "items": done,
            "items_per_second": round(done / seconds, 2)}


def single_image_loop(images_folder, count, device="cpu"):
    model, preprocess = fastclip.load("random:ViT-B/32", device=device)
    paths = sorted(os.path.join(images_folder, n) for n in os.listdir(images_folder))[:count]
    with torch.inference_mode():
        model.encode_image(preprocess(Image.open(paths[0]))[None].to(device))  # warm-up
        start = time.perf_counter()
        for path in paths:
            model.encode_image(preprocess(Image.open(path))[None].to(device)).cpu()
        seconds = time.perf_counter() - start
    return {"model": "random:ViT-B/32", "loop": "one image at a time, in-process",
            "items": len(paths), "items_per_second": round(len(paths) / seconds, 2)}


def machine():
    model_name = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
            model_name = names[0] if names else model_name
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return {"cpu": model_name, "cores": len(os.sched_getaffinity(0)),
            "avx512_bf16": "avx512_bf16" in flags,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384,
                        help="images generated, all embedded by the tiny model")
    parser.add_argument("--vit-images", type=int, default=192,
                        help="of which ViT-B/32 embeds the first N (--limit)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                         "embed_cpu"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_embed_")
    images = os.path.join(work, "images")
    make_images(images, args.images)
    runs = []
    vit = ("--limit", str(args.vit_images))
    if args.device == "cpu":
        batch_size = 64
        configurations = [("random:tiny", 0, ()), ("random:tiny", 1, ()), ("random:tiny", 2, ()),
                          ("random:ViT-B/32", 0, vit), ("random:ViT-B/32", 1, vit),
                          ("random:ViT-B/32", 2, vit),
                          ("random:ViT-B/32", 1, vit + ("--model-dtype", "bf16"))]
    else:
        batch_size = 256
        cores = len(os.sched_getaffinity(0))
        configurations = [("random:ViT-B/32", cores // 2, vit),
                          ("random:ViT-B/32", cores - 1, vit),
                          ("random:ViT-B/32", cores - 1, vit + ("--gpu-decode",))]
    for model, workers, extra in configurations:
        runs.append(run_cli(images, os.path.join(work, "out"), model, workers, batch_size,
                            extra, args.device))
        print(json.dumps(runs[-1]), flush=True)
    references = [model_only(args.vit_images, batch_size, args.device),
                  single_image_loop(images, min(args.vit_images // 2, 512), args.device)]
    for reference in references:
        print(json.dumps(reference), flush=True)
    result = {"machine": machine(), "device": args.device,
              "images": f"{args.images} JPEGs of 500x375",
              "cli_runs": runs, "in_process": references}
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result))
    shutil.rmtree(work)


def markdown(result):
    m = result["machine"]
    lines = [
        f"# fastclip embed on {result['device']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (AVX512-BF16: {m['avx512_bf16']}), "
        f"{m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; Python {m['python']}, "
        f"torch {m['torch']}; {m['date']}.",
        f"Inputs: {result['images']}. Produced by `python benchmarks/bench_embed.py`.",
        "items/s is the command's own summary: every input over the whole wall time of the "
        "job, model build included; process s adds Python and torch start-up.",
        "",
        "The load average (1 min, before and after) shows how much other work shared the "
        "cores: compare runs with similar loads.",
        "",
        "| model | --num-workers | options | items | items/s | embed s | process s | load |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in result["cli_runs"]:
        lines.append(f"| {run['model']} | {run['num_workers']} | {run['options'] or '-'} | "
                     f"{run['items']} | {run['items_per_second']:.1f} | "
                     f"{run['embed_seconds']:.1f} | {run['process_seconds']:.1f} | "
                     f"{run['load_average'][0]} -> {run['load_average'][1]} |")
    lines += ["", "In-process references (model built beforehand, not timed):", ""]
    for reference in result["in_process"]:
        lines.append(f"- {reference['model']}, {reference['loop']}: "
                     f"{reference['items_per_second']:.1f} images/s over "
                     f"{reference['items']} images.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
