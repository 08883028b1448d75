"""``fastclip shapes``: sample images of the procedural shapes dataset (``fastclip.train.shapes``),
named after what they show."""

from ..train.shapes import SHAPES, SPLITS, write_samples


def add_arguments(parser):
    parser.add_argument("folder", help="where to write the PNG files (created if missing)")
    parser.add_argument("-n", type=int, default=len(SHAPES),
                        help=f"how many images (default {len(SHAPES)}, one per shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="side in pixels (default 128)")
    parser.add_argument("--split", choices=SPLITS, default="held_out",
                        help="held_out (default): shape-color pairs never seen in training")


def run(args):
    if args.n < 1 or args.size < 16:
        raise ValueError("-n must be at least 1 and --size at least 16.")
    for path in write_samples(args.folder, args.n, args.seed, args.size, args.split):
        print(path)
    return 0
