"""`moon-fast data`: the synthetic default catalog, co-augmentation, and a format check.

    moon-fast data synth --output DIR --products 1000 --seed 0
    moon-fast data augment --input DIR --output DIR2 [--views 1] [--text-model LM_DIR] [--model RUN/final]
    moon-fast data check DIR        # parse every record and image (heldout.jsonl too); report the bad ones
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="synthesise, augment or check a product catalog",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    sy = s.add_parser("synth", help="generate the synthetic catalog (deterministic for a seed)")
    sy.add_argument("--output", required=True)
    sy.add_argument("--products", type=int, default=1000)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--heldout", type=float, default=0.2, help="fraction of products held out for evaluation")
    sy.add_argument("--views", type=int, default=2, help="images per product (main view + query views)")
    sy.add_argument("--triplets-per-product", type=int, default=3)
    sy.add_argument("--mix", default="1:1:1", help="relative frequency of text:image:multimodal queries")
    sy.add_argument("--corrupt-rate", type=float, default=0.1, help="fraction of mismatched triplets (DSF noise)")
    sy.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 4)")
    sy.set_defaults(func=_synth)

    au = s.add_parser("augment", help="image-text co-augmentation of the train products")
    au.add_argument("--input", required=True, help="source catalog directory")
    au.add_argument("--output", required=True, help="new catalog directory")
    au.add_argument("--views", type=int, default=1, help="new views per product")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--text-model", help="local causal-LM directory for title rewriting (default: the "
                                         "attribute-based enricher)")
    au.add_argument("--no-text", action="store_true", help="skip text enrichment")
    au.add_argument("--model", help="saved MoonModel directory for image-text consistency filtering")
    au.add_argument("--min-similarity", type=float, default=0.0)
    au.add_argument("--max-drop", type=float, default=0.2, help="drop views whose image-text similarity is more "
                                                                "than this below the original image's")
    au.add_argument("--max-bad-fraction", type=float, default=0.05,
                    help="stop when more than this fraction of the source's records is bad (they are skipped)")
    au.set_defaults(func=_augment)

    ch = s.add_parser("check", help="validate a catalog: every record and image")
    ch.add_argument("path")
    ch.set_defaults(func=_check)


def _parse_mix(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--mix {text!r}: expected three numbers text:image:multimodal, e.g. 1:1:1") from None


def _synth(args) -> int:
    from moon_fast.data.synth import synthesize

    try:
        mix = _parse_mix(args.mix)
        synthesize(args.output, products=args.products, seed=args.seed, heldout=args.heldout, views=args.views,
                   triplets_per_product=args.triplets_per_product, mix=mix, corrupt_rate=args.corrupt_rate,
                   workers=args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _augment(args) -> int:
    from moon_fast.data.augment import augment_catalog
    from moon_fast.data.catalog import TooManyBadRecords

    try:
        augment_catalog(args.input, args.output, views=args.views, seed=args.seed, text_model=args.text_model,
                        model=args.model, min_similarity=args.min_similarity, max_drop=args.max_drop,
                        enrich_text=not args.no_text, max_bad_fraction=args.max_bad_fraction)
    except (ValueError, FileNotFoundError, TooManyBadRecords) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _check(args) -> int:
    import logging

    from moon_fast.data.catalog import BadRecordCounter, BadRecordError, Catalog
    from moon_fast.data.encode import check_records
    from moon_fast.data.images import load_image
    from moon_fast.data.loader import read_triplets

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    bad = BadRecordCounter(max_fraction=1.0, max_shown=50)
    try:
        cat = Catalog(args.path, bad=bad)
        triplets = read_triplets(cat.root, bad)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in cat.products:
        for im in p.images:
            try:
                load_image(im, p.where)
                bad.ok()
            except BadRecordError as e:
                bad.skip(e)
    for t in triplets:
        try:
            for pid in (t.positive_id, t.negative_id):
                cat.get(pid, t.where)
            if t.query_image:
                load_image(t.query_image, t.where)
            bad.ok()
        except BadRecordError as e:
            bad.skip(e)
    # Evaluation reads heldout.jsonl only after training: a bad record there is best found now.
    heldout = cat.root / "heldout.jsonl"
    held = f", {check_records(heldout, bad)} good held-out records" if heldout.is_file() else ""
    print(f"{args.path}: {len(cat)} products, {len(triplets)} triplets{held}; {bad.bad} bad of {bad.seen} "
          f"checked{'; ' + bad.summary() if bad.bad else ''}")
    return 1 if bad.bad else 0
