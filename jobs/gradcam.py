"""Grad-CAM heat maps of several trained runs on the same val images, faithfulness scores (salient vs random
removal; grad-cam's ROAD and confidence change) and a sanity check (cascading randomisation) per model and method.

    python jobs/gradcam.py --runs RUN_DIR [RUN_DIR ...] --data DATA_ROOT --out OUT_DIR
    python jobs/gradcam.py gradcam.methods=[gradcam,layercam] --runs ...   # overrides before --runs

Writes OUT_DIR/gradcam/{grid.png,sanity.png,summary.json,config.yaml}. The gradcam section comes from --config (default: the
first run's config.yaml) plus overrides; each model's eval transform comes from its own run's config.yaml.
"""
from catdog.cam import gradcam
from catdog.cli import parse_runs_into_out, parser, run_job


def main() -> None:
    args, config = parse_runs_into_out(
        parser(__doc__), runs="run directories written by jobs/train.py",
        data="data root with a val/ split (the one the runs were trained on)", out="folder to write gradcam/ into")
    summary = gradcam(args.runs, args.data, args.out, config)
    for model in summary["models"]:
        for method, score in model["methods"].items():
            print(f"{model['run']} ({model['model']}) {method}: confidence drop {score['salient_drop']:.3f} removing "
                  f"the most salient {summary['removal_fraction']:.0%} vs {score['random_drop']:.3f} removing a random "
                  f"{summary['removal_fraction']:.0%} ({score['n_images']} images)")
            road = score["road"]
            print(f"    ROAD (removing {', '.join(f'{100 - p}%' for p in road['percentiles'])}): most relevant first "
                  f"{road['morf_mean']:+.3f}, least relevant first {road['lerf_mean']:+.3f}, combined "
                  f"{road['combined']:+.3f}; confidence change (image x CAM) {score['confidence_change']:+.3f}; "
                  f"{score['seconds']['total']:.0f} s")
            rho = ", ".join(f"{step['layer']} {step['spearman']:.2f}" for step in score["sanity"][1:])
            print(f"    sanity (Spearman with the trained maps, randomised down to): {rho}")
            for flag in score["sanity_flags"]:
                print(f"    FLAGGED: {flag}")


if __name__ == "__main__":
    run_job(main)
