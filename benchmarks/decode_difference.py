"""How far the ``--gpu-decode`` path's JPEG decode (``torchvision.io.decode_jpeg``: nvjpeg on
CUDA, torchvision's libjpeg on the CPU) is from PIL's (libjpeg-turbo), pixel by pixel.

    python benchmarks/decode_difference.py --device cuda --output decode_gpu.json

Photo-like JPEGs (``bench_preprocess.photo_jpegs``: smooth content plus noise) of 500x375,
1024x768 and 2048x1536, at quality 75 and 95, with 4:4:4, 4:2:2 and 4:2:0 subsampling, and
progressive ones, are decoded both ways. Written per case and over all: the largest
difference of one channel of one pixel (in grey levels), the share of channel values that
differ, and the mean difference. The GPU suite writes it beside its other results.
"""

import argparse
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_preprocess import photo_jpegs  # noqa: E402

from fastclip.embed.device_decode import torchvision_decode_jpeg  # noqa: E402

SIZES = [(500, 375), (1024, 768), (2048, 1536)]
# PIL's subsampling codes: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0.
CASES = [(quality, subsampling, False) for quality in (75, 95) for subsampling in (0, 1, 2)]
CASES.append((90, 2, True))


def reencoded(jpeg, quality, subsampling, progressive):
    """``jpeg``'s pixels encoded again with these settings."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "JPEG", quality=quality, subsampling=subsampling,
                                      progressive=progressive)
    return buffer.getvalue()


def differences(jpegs, device):
    """(largest difference, differing values, all values, sum of differences) of the device
    decode against PIL's over ``jpegs``."""
    decode_jpeg, rgb = torchvision_decode_jpeg()
    largest, differing, values, total = 0, 0, 0, 0
    for data in jpegs:
        ours = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=rgb,
                           device=device).cpu().permute(1, 2, 0).numpy().astype(np.int16)
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        if ours.shape != pil.shape:
            raise SystemExit(f"the device decoded {ours.shape}, PIL {pil.shape}")
        difference = np.abs(ours - pil)
        largest = max(largest, int(difference.max()))
        differing += int((difference > 0).sum())
        values += difference.size
        total += int(difference.sum())
    return largest, differing, values, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=3, help="JPEGs per size and case")
    parser.add_argument("--output", required=True, help="the JSON file to write")
    args = parser.parse_args()
    try:
        import torchvision
    except ImportError:  # the --gpu-decode path needs it too: nothing to measure
        with open(args.output, "w") as f:
            json.dump({"device": args.device, "skipped": "torchvision is not installed"}, f)
        print(f"skipped: torchvision is not installed; wrote {args.output}")
        return
    report = {"device": args.device, "torch": torch.__version__,
              "torchvision": torchvision.__version__, "pillow": Image.__version__,
              "device_name": (torch.cuda.get_device_name(args.device)
                              if args.device.startswith("cuda") else "CPU"),
              "cases": []}
    overall = [0, 0, 0, 0]
    for size in SIZES:
        sources = photo_jpegs(args.images, size, seed=3)
        for quality, subsampling, progressive in CASES:
            jpegs = [reencoded(j, quality, subsampling, progressive) for j in sources]
            largest, differing, values, total = differences(jpegs, args.device)
            report["cases"].append({
                "image": f"{size[0]}x{size[1]}", "quality": quality,
                "subsampling": ("4:4:4", "4:2:2", "4:2:0")[subsampling],
                "progressive": progressive, "images": len(jpegs),
                "largest_difference": largest, "share_differing": differing / values,
                "mean_difference": total / values})
            overall = [max(overall[0], largest), overall[1] + differing,
                       overall[2] + values, overall[3] + total]
    report["largest_difference"] = overall[0]
    report["share_differing"] = overall[1] / overall[2]
    report["mean_difference"] = overall[3] / overall[2]
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{args.device}: decode_jpeg against PIL: at most {overall[0]} grey levels apart, "
          f"{100 * report['share_differing']:.3f}% of values differ, mean "
          f"{report['mean_difference']:.4f}; wrote {args.output}")


if __name__ == "__main__":
    main()
