"""``imaml-data``: fetch and convert datasets into the arrays the loaders read.

Usage::

    imaml-data omniglot --root DIR [--src ZIPDIR_OR_URL]
    imaml-data miniimagenet --src SRC --root DIR
    python -m imaml_kernels.data ...        # the same, without the entry point

Without ``--root`` the loaders' default is used (``$IMAML_DATA`` /
``$IMAML_DATA_MINIIMAGENET``, else ``~/.cache/imaml_kernels/<dataset>``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _counts(text: str) -> dict[str, int]:
    try:
        bg, ev = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BACKGROUND,EVALUATION counts like 964,659, got {text!r}")
    return {"background": bg, "evaluation": ev}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imaml-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True)

    o = sub.add_parser("omniglot", help="download the Omniglot release and convert it")
    o.add_argument("--root", help="output folder (default: $IMAML_DATA or ~/.cache/imaml_kernels/omniglot)")
    o.add_argument(
        "--src",
        help="folder holding images_background.zip and images_evaluation.zip, or a base URL "
        "(default: the brendenlake/omniglot GitHub release)",
    )
    o.add_argument("--expected-counts", type=_counts, default="964,659", metavar="BG,EV",
                   help="characters per split to insist on (default 964,659)")
    o.add_argument("--no-count-check", action="store_true", help="accept any number of characters")
    o.add_argument("--keep-zips", action="store_true", help="keep the downloaded zips in --root")
    o.add_argument("--force", action="store_true", help="convert even if the files exist")
    o.add_argument("--verify", action="store_true",
                   help="check the result against the reference sha256 checksums")
    o.add_argument("--no-progress", action="store_true")

    m = sub.add_parser("miniimagenet", help="convert a local MiniImagenet copy (CSV+images or pickles)")
    m.add_argument("--src", required=True,
                   help="folder with train/val/test.csv and images/, or mini-imagenet-cache-*.pkl")
    m.add_argument("--root", help="output folder (default: $IMAML_DATA_MINIIMAGENET or "
                   "~/.cache/imaml_kernels/miniimagenet)")
    m.add_argument("--per-class", type=int, default=600, help="images per class to insist on (default 600)")
    m.add_argument("--no-count-check", action="store_true",
                   help="accept any class and image counts (equal within a split)")
    m.add_argument("--force", action="store_true", help="convert even if the files exist")
    m.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 data error, 2 usage error)."""
    args = _parser().parse_args(argv)
    # Imported here so that --help works even where torch is slow to import.
    from .download import prepare_omniglot
    from .miniimagenet import MINIIMAGENET_CLASSES, convert_miniimagenet

    try:
        if args.dataset == "omniglot":
            root = prepare_omniglot(
                args.root,
                src=args.src,
                expected_counts=None if args.no_count_check else args.expected_counts,
                keep_zips=args.keep_zips,
                force=args.force,
                progress=not args.no_progress,
            )
            if args.verify:
                from .omniglot import load_omniglot_arrays

                for size in (105, 28):
                    load_omniglot_arrays(root, image_size=size, verify=True)
            print(f"Omniglot ready in {root}")
        else:
            root = convert_miniimagenet(
                args.src,
                args.root,
                expected_classes=None if args.no_count_check else MINIIMAGENET_CLASSES,
                per_class=None if args.no_count_check else args.per_class,
                force=args.force,
                progress=not args.no_progress,
            )
            print(f"MiniImagenet ready in {root}")
    except (OSError, ValueError) as exc:
        print(f"imaml-data: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
