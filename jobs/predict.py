"""Run a trained model on new images: a prediction per image, or the accuracy on a labelled folder.

    python jobs/predict.py --run RUN_DIR --out OUT photo.jpg more/photos/     # files and folders (recursive)
    python jobs/predict.py --run RUN_DIR --out OUT --labelled DATA_ROOT/val   # evaluate: + OUT/metrics.json
    python jobs/predict.py --run RUN_DIR --out OUT --cam photos/              # + a Grad-CAM overlay per image

Writes OUT/predictions.csv, one row per image in the order given (a folder's files sorted, its subfolders after):
path, [label,] predicted, probability (of the predicted class), p_<class> for each of the run's classes (they sum
to 1), [cam]. Files that cannot be decoded (0 bytes, not an image, truncated) are skipped, printed on stderr and
listed with the reason in OUT/skipped.csv. A folder contributes its files with an image suffix; a file named
explicitly is tried whatever its suffix.

--labelled ROOT takes ROOT/<class>/<image> (a subset of the run's classes is fine; not recursive, as training
lists a split) and adds a label column and OUT/metrics.json: accuracy, images, per_class_accuracy, the confusion
matrix (rows: true class, columns: predicted, the run's class order). On the run's own val split the accuracy is
summary.json's val_accuracy exactly: the same files, eval transform and batch size, and by default the same autocast
precision the run evaluated with (summary.json "mixed_precision", e.g. bf16 on a CPU with AVX512-BF16).
--cam writes OUT/cam/<folder>__<subfolders>__<file>.png: the photo and the Grad-CAM of the predicted class at the
model's CAM layer, titled with the prediction and its probability (red when a labelled image is wrong).
"""

from catdog.cli import parser, run_job, whole_number, writable_dir
from catdog.predict import PRECISIONS, confusion_table, predict


def main() -> None:
    p = parser(__doc__, overrides=False)
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--run", required=True, help="run directory written by jobs/train.py")
    p.add_argument("--out", required=True, help="folder for predictions.csv, skipped.csv, metrics.json, cam/")
    p.add_argument("--labelled", metavar="ROOT", help="evaluate on ROOT/<class>/<image> instead of PATHs")
    p.add_argument("--cam", action="store_true", help="also write a Grad-CAM overlay per image to OUT/cam/")
    p.add_argument("--precision", choices=("run", *PRECISIONS), default="run",
                   help="autocast precision; 'run' (default): the one the run evaluated with, from its summary.json")
    p.add_argument("--batch-size", type=whole_number(1),
                   help="images per batch (default: the run's data.eval_batch_size)")
    p.add_argument("--workers", type=whole_number(0), help="decoding workers (default: the run's data.num_workers)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default: cuda when available, else cpu)")
    args = p.parse_args()
    writable_dir(args.out, "--out")
    result = predict(args.run, args.out, args.paths, labelled=args.labelled, precision=args.precision, cam=args.cam,
                     device=args.device, batch_size=args.batch_size, workers=args.workers)

    print(f"{result['images']} image(s) predicted on {result['device']} (autocast {result['precision']}) -> "
          f"{result['predictions']}" + (f"; {len(result['skipped'])} skipped -> {result['skipped_csv']}"
                                        if result["skipped"] else ""))
    if result["cam_dir"]:
        print(f"Grad-CAM overlays -> {result['cam_dir']}/")
    metrics = result["metrics"]
    if metrics:
        print(f"accuracy {metrics['accuracy']:.2%} ({metrics['correct']}/{metrics['images']} images) -> "
              f"{result['metrics_json']}")
        for name, accuracy in metrics["per_class_accuracy"].items():
            if accuracy is not None:
                print(f"  {name}: {accuracy:.2%} ({metrics['per_class_images'][name]} images)")
        print(confusion_table(metrics))


if __name__ == "__main__":
    run_job(main)
