"""The same ``fastclip embed`` job read from an S3 server on 127.0.0.1 (moto in server mode,
s3fs as the client) and from local disk: items per second of each, and their ratio.

    python benchmarks/bench_storage.py --output benchmarks/results/storage_cpu

The job embeds WebDataset shards of generated JPEGs with the tiny random model (so that the
model costs little and reading shows), in this process, the two sources taking turns for
``--rounds`` rounds; the output goes to local disk both times. It writes ``<output>.json``
and ``<output>.md`` with the machine described. moto keeps objects in its own memory and
answers over HTTP: what this measures is fastclip's streaming of shards through fsspec and
the HTTP round trips, not a real store's bandwidth.
"""

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from machine import report, small_machine


def start_moto():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto did not start") from None
            time.sleep(0.1)


def write_shards(folder, shards, per_shard, size):
    rng = np.random.default_rng(0)
    paths = []
    for n in range(shards):
        path = os.path.join(folder, f"{n:05d}.tar")
        with tarfile.open(path, "w") as archive:
            for i in range(per_shard):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{n:05d}{i:05d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(info, buffer)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    import s3fs

    from fastclip.embed import embed
    server, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="fastclip_storage_") as folder:
            paths = write_shards(folder, args.shards, args.per_shard, args.size)
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="bench", secret="bench")
            fs.mkdir("bench")
            for path in paths:
                fs.put(path, f"bench/shards/{os.path.basename(path)}")
            options = {"s3": {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}}
            last = f"{args.shards - 1:05d}"
            sources = {"local disk": os.path.join(folder, f"{{00000..{last}}}.tar"),
                       "S3 (moto)": f"s3://bench/shards/{{00000..{last}}}.tar"}
            seconds = {name: [] for name in sources}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name, source in sources.items():
                    out = os.path.join(folder, f"out-{round_}-{len(seconds[name])}-{name[0]}")
                    start = time.perf_counter()
                    summary = embed(out, images=[source], model="random:tiny", device="cpu",
                                    num_workers=1, progress=False, storage_options=options)
                    elapsed = time.perf_counter() - start
                    assert summary["rows"] == args.shards * args.per_shard, summary
                    if round_:
                        seconds[name].append(elapsed)
    finally:
        server.terminate()
        server.wait()
    items = args.shards * args.per_shard
    rates = {name: items / statistics.median(times) for name, times in seconds.items()}
    result = {"machine": small_machine(),
              "shards": args.shards, "per_shard": args.per_shard, "size": list(args.size),
              "seconds": seconds, "items_per_second": rates,
              "s3_vs_local": rates["S3 (moto)"] / rates["local disk"]}
    report(result, markdown, args.output)


def markdown(result):
    m = result["machine"]
    rows = "\n".join(f"| {name} | {rate:.0f} | {statistics.median(result['seconds'][name]):.2f} |"
                     for name, rate in result["items_per_second"].items())
    return (f"# One embed job read from S3 (moto on 127.0.0.1) and from local disk\n\n"
            f"{m['cpu_model']}, {m['cpu_cores']} cores, Python {m['python']}; "
            f"{result['shards']} shards of {result['per_shard']} JPEGs of "
            f"{result['size'][0]}x{result['size'][1]}, the tiny random model, one decoding "
            "worker; medians of the rounds.\n\n"
            "| source | items/s | seconds |\n| --- | ---: | ---: |\n"
            f"{rows}\n\nS3 gives {result['s3_vs_local']:.2f}x the items per second of local "
            "disk.\n")


if __name__ == "__main__":
    main()
