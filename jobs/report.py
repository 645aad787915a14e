"""One self-contained HTML report (plus summary.json) of every stage of one or more runs.

    python jobs/report.py --runs RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--gradcam OUT_DIR/gradcam]
                          [--compare OUT_DIR/compare]

Writes REPORT_DIR/index.html (images embedded, opens offline) and REPORT_DIR/summary.json. Stages that have
not run yet are shown as missing, with the command that makes them. With --compare (jobs/compare.py's folder), or
with two or more runs, the page leads with the comparison of the runs.
"""
from catdog.cli import parser, run_job, writable_dir
from catdog.report import report


def main() -> None:
    p = parser(__doc__, overrides=False)
    p.add_argument("--runs", nargs="+", required=True, help="run directories written by jobs/train.py")
    p.add_argument("--out", required=True, help="report folder to write")
    p.add_argument("--gradcam", help="the gradcam/ folder written by jobs/gradcam.py")
    p.add_argument("--compare", help="the compare/ folder written by jobs/compare.py (two or more runs)")
    args = p.parse_args()
    writable_dir(args.out, "--out")
    summary = report(args.runs, args.out, args.gradcam, args.compare)
    for run in summary["runs"]:
        missing = [stage for stage in ("training", "architecture", "robustness", "forest", "sweep", "topact", "concepts")
                   if "missing" in run[stage]]
        print(f"{run['run']} ({run['model']}): missing stages: {', '.join(missing) or 'none'}")
    for stage in ("gradcam", "compare"):
        if summary[stage] is not None and "missing" in summary[stage]:
            print(f"{stage}: missing ({summary[stage]['missing']})")
    print(f"wrote {args.out}/index.html and {args.out}/summary.json")


if __name__ == "__main__":
    run_job(main)
