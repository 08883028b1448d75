"""``fastclip embed``: the command-line front of :class:`fastclip.embed.EmbedJob`."""

import dataclasses
import sys

from ..embed import EmbedJob, summary_line
from ..embed import run as run_job
from ..embed.job import DEFAULT_CAPTION_KEY, DEFAULT_IMAGE_KEYS, MODEL_DTYPES, OUTPUT_DTYPES
from ..images import DEFAULT_MAX_PIXELS
from ..ops.dispatch import BACKEND_NAMES

DEFAULTS = EmbedJob(output="")


def add_arguments(parser):
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--images", nargs="+", default=[], metavar="SRC",
                        help="image folders, .txt lists of paths or URLs, WebDataset shards "
                             "(.tar, .tar.gz; globs and brace patterns such as "
                             "'shards/{00000..00099}.tar'; pipe:COMMAND), or tables (.parquet, "
                             ".arrow, .csv, a datasets save_to_disk folder) whose image column "
                             "holds paths, URLs or image bytes; local or URLs (s3://, gs://, "
                             "hf://, https://, any fsspec protocol)")
    inputs.add_argument("--texts", nargs="+", default=[], metavar="SRC",
                        help=".txt files (one text per line) or table columns; with "
                             "--images, the i-th text is paired with the i-th image")
    inputs.add_argument("--image-column", default="image_path",
                        help="the image-path column of table inputs (default: image_path)")
    inputs.add_argument("--text-column", default="caption",
                        help="the text column of table inputs (default: caption)")
    inputs.add_argument("--embed-captions", action="store_true",
                        help="also embed the captions of image sources (a tar's caption key, "
                             "a table's --text-column, the .txt beside a folder's image) into "
                             "text_emb")
    inputs.add_argument("--enable-metadata", action="store_true",
                        help="carry a table's other columns, and the fields of a sample's "
                             ".json (or of the .json beside a folder's image), into the "
                             "metadata parquet")
    inputs.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                        help="fsspec options for URL inputs and output, as a JSON object, "
                             "for every protocol or keyed by protocol: "
                             "'{\"s3\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}' "
                             "(credentials also come from the usual environment variables)")
    inputs.add_argument("--image-keys", default=";".join(DEFAULT_IMAGE_KEYS),
                        help="WebDataset image extensions, in order of preference "
                             "(default: %(default)s)")
    inputs.add_argument("--caption-key", default=DEFAULT_CAPTION_KEY,
                        help="WebDataset caption extension, or json:FIELD for a field of "
                             "the sample's .json (json:caption; a dotted FIELD reads nested "
                             "objects) (default: %(default)s)")
    inputs.add_argument("--limit", type=int, default=None,
                        help="embed only the first N inputs (file and table sources)")
    inputs.add_argument("--max-bytes", type=int, default=DEFAULTS.max_bytes,
                        help="a larger file, tar member or WebDataset sample is a failure "
                             "(default: %(default)s, 256 MiB)")
    inputs.add_argument("--read-timeout", type=float, default=DEFAULTS.read_timeout,
                        help="seconds one file's read may take before it is a failure (a "
                             "stalled mount; default: %(default)s)")
    inputs.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels, as they are (decompression bombs) or "
                             "once resized for the model (extreme aspect ratios), are "
                             "failures (default: PIL's limit, %(default)s)")

    output = parser.add_argument_group("output")
    output.add_argument("-o", "--output", required=True,
                        help="the output folder, local or a URL (s3://bucket/embeddings)")
    output.add_argument("--dtype", choices=list(OUTPUT_DTYPES), default=DEFAULTS.dtype,
                        help="dtype of the stored embeddings (default: fp16)")
    output.add_argument("--normalize", action="store_true", default=True,
                        help="store unit-norm embeddings (the default)")
    output.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="store the raw embeddings")
    output.add_argument("--shard-size", type=int, default=DEFAULTS.shard_size,
                        help="inputs per output shard of file and table sources; a tar "
                             "shard always makes one output shard (default: 100000)")
    output.add_argument("--max-failure-rate", type=float, default=None, metavar="RATE",
                        help="exit with status 1 when more than this fraction of the inputs "
                             "failed (default: only when every input failed)")
    output.add_argument("--resume", action="store_true",
                        help="complete an interrupted job in the output folder")

    run_options = parser.add_argument_group("model and hardware")
    run_options.add_argument("--model", default=DEFAULTS.model,
                             help="a model name, a checkpoint path, 'random:tiny' (a tiny "
                                  "random model for smoke tests) or 'random:ViT-B/32' "
                                  "(default: ViT-B/32)")
    run_options.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    run_options.add_argument("--num-workers", type=int, default=None,
                             help="decoding processes (default: on CUDA, the cores less "
                                  "one, at most 16; on the CPU, one per 8 cores, at least 1)")
    run_options.add_argument("--device", default=None,
                             help="cuda, cuda:1 or cpu (default: CUDA when available; under "
                                  "torchrun, cuda:LOCAL_RANK)")
    run_options.add_argument("--backend", default=DEFAULTS.backend, choices=BACKEND_NAMES)
    run_options.add_argument("--model-dtype", choices=list(MODEL_DTYPES), default=None,
                             help="dtype of the weights (default: fp16 on CUDA, fp32 on CPU)")
    run_options.add_argument("--gpu-decode", action="store_true",
                             help="decode JPEGs on the GPU with nvjpeg and resize them there "
                                  "(needs torchvision); not bit-identical to the PIL path")
    run_options.add_argument("--no-progress", dest="progress", action="store_false",
                             help="no progress bar")
    run_options.add_argument("--ray-tasks", type=int, default=None, metavar="N",
                             help="run the job as N Ray tasks, one rank each, on the Ray "
                                  "cluster of RAY_ADDRESS (or a local one); the output should "
                                  "be in storage every node reaches (s3://...)")
    run_options.add_argument("--ray-gpus-per-task", type=float, default=0, metavar="G",
                             help="GPUs of each Ray task (default: 0)")
    run_options.add_argument("--ray-cpus-per-task", type=float, default=1, metavar="C",
                             help="CPUs of each Ray task (default: 1)")


def _json_object(text):
    import argparse
    import json
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, such as '{\"anon\": true}'")
    return value


def job_from(args):
    """The :class:`EmbedJob` that parsed arguments describe."""
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(EmbedJob)
                if f.name != "image_keys"}  # --max-failure-rate judges the finished job
    return EmbedJob(**settings, image_keys=args.image_keys.split(";"))


def run(args):
    if args.ray_tasks is not None:
        from ..embed.ray import run_on_ray
        summaries = run_on_ray(job_from(args), args.ray_tasks, num_cpus=args.ray_cpus_per_task,
                               num_gpus=args.ray_gpus_per_task)
    else:
        summaries = [run_job(job_from(args))]
    for summary in summaries:
        print(summary_line(summary), file=sys.stderr)
    manifest = next((s["manifest"] for s in summaries if s["manifest"] is not None), None)
    if manifest is None:
        return 0
    print(f"Wrote {args.output} (manifest.json, failures.jsonl)", file=sys.stderr)
    inputs, failures = manifest["counts"]["inputs"], manifest["counts"]["failures"]
    if inputs and failures == inputs:
        print(f"fastclip embed: error: every input failed ({failures} of {inputs}); "
              f"{args.output}/failures.jsonl says why.", file=sys.stderr)
        return 1
    if args.max_failure_rate is not None and inputs and failures / inputs > args.max_failure_rate:
        print(f"fastclip embed: error: {failures} of {inputs} inputs failed, more than "
              f"--max-failure-rate {args.max_failure_rate:g}; {args.output}/failures.jsonl "
              "says why.", file=sys.stderr)
        return 1
    return 0
