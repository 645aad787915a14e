"""Build the train/test/val ImageFolder layout from PetImages or Kaggle's train folder.

    python jobs/prepare.py --source PetImages --out data/cats_vs_dogs
    python jobs/prepare.py --download --out data/cats_vs_dogs         # fetch Microsoft's PetImages first (online)
    python jobs/prepare.py --out DATA --quarantine RUN/audit/duplicates.csv   # move listed images to DATA/quarantine/
"""
from pathlib import Path

from catdog.cli import numbers, parser, run_job, whole_number, writable_dir
from catdog.download import PETIMAGES_URL, fetch_petimages
from catdog.errors import CatdogError
from catdog.prepare import check_fractions, prepare, quarantine_listed


def main() -> None:
    p = parser(__doc__, overrides=False)
    p.add_argument("--source", type=Path, help="PetImages folder (Cat/, Dog/) or a folder of cat.1.jpg, dog.1.jpg ...")
    p.add_argument("--download", action="store_true", help="download PetImages first (needs internet)")
    p.add_argument("--url", default=PETIMAGES_URL, help="archive to download")
    p.add_argument("--out", type=Path, required=True, help="data root to write ({train,test,val}/<class>/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--split", type=numbers(3), default="0.8,0.1,0.1", help="train,test,val fractions")
    p.add_argument("--workers", type=whole_number(1), help="decoding processes (default: one per CPU)")
    p.add_argument("--quarantine", type=Path, metavar="LIST", help="move the images a list names (a CSV with a path "
                   "column, e.g. RUN/audit/label_issues.csv, or one path per line; relative to --out) to "
                   "--out/quarantine/, then stop")
    args = p.parse_args()
    if args.quarantine is not None:
        moved = quarantine_listed(args.out, args.quarantine)
        print(f"moved {moved['moved']} image(s) to {args.out / 'quarantine'} ({moved['already']} already there); "
              f"log: {moved['log']}")
        return
    if args.source is None and not args.download:
        raise CatdogError("give --source DIR, or --download to fetch PetImages")
    check_fractions(args.split, "--split")
    writable_dir(args.out, "--out")
    source = args.source or fetch_petimages(args.out.parent / "downloads", args.url)
    report = prepare(source, args.out, seed=args.seed, fractions=args.split, workers=args.workers)
    print(f"{report['images']} images: {report['counts']}; converted {len(report['converted'])}, "
          f"quarantined {len(report['quarantined'])} (see {args.out / 'prepare_report.json'})")


if __name__ == "__main__":
    run_job(main)
