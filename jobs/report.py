"""Report on scored predictions (metrics, tables, figures), or compare the reports of several runs.

    python jobs/report.py --predictions PRED --out DIR [--threshold T | --calibrate-on VAL_PRED ...]
    python jobs/report.py --compare RUN_OR_REPORT_DIR [...] --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import UserError  # noqa: E402
from mura_ray.report import DEFAULT_BOOTSTRAP, ReportConfig, run  # noqa: E402
from mura_ray.runtime import setup_logging, storage_error_line  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage and exit; main() turns this into its one `error:` line and code 2.
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobs/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--predictions", metavar="PRED",
      help="predictions Parquet dataset from the scoring job (local dir/file or s3://); must have a `label` column")
    a("--compare", nargs="+", metavar="DIR", default=(),
      help="instead of --predictions: run dirs (report/report.json + model/model_card.json) or report dirs "
           "(report.json) to compare in one table")
    a("--out", required=True, metavar="DIR",
      help="output dir, local or s3://: report.json/.md/.html + figures/, or comparison.md/.json")
    a("--threshold", type=float, metavar="T",
      help="call an image or study abnormal when its probability >= T (default: the threshold the predictions "
           "were scored at, from the scoring output's manifest.json, else 0.5); not with --calibrate-on")
    a("--calibrate-on", metavar="VAL_PRED",
      help="validation predictions of the same model (and --tta setting) on which to choose the threshold "
           "(see --operating-point, --calibrate-level)")
    a("--operating-point", choices=["youden", "sensitivity"],
      help="with --calibrate-on: 'youden' maximises sensitivity + specificity (default); 'sensitivity' takes the "
           "highest threshold whose validation sensitivity reaches --target-sensitivity")
    a("--target-sensitivity", type=float, metavar="S",
      help="with --operating-point sensitivity: validation sensitivity to reach, in (0, 1] (default 0.9)")
    a("--calibrate-level", choices=["image", "study"],
      help="with --calibrate-on: choose the threshold on validation image probabilities (default) or on study "
           "probabilities (the mean of a study's images); validation metrics are reported at both levels")
    a("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N",
      help=f"bootstrap resamples for 95%% CIs of ROC AUC and kappa, drawing whole studies at both levels "
           f"(default {DEFAULT_BOOTSTRAP}; 0 disables)")
    a("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    a("--explain", type=int, default=0, metavar="N",
      help="Grad-CAM heatmaps of the N most confident true positives, false negatives and false positives in "
           "report.html, from the models and images the scoring output's manifest names (needs "
           "mura_ray[explain]; default 0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        cfg = ReportConfig(
            out=args.out, predictions=args.predictions, compare=tuple(args.compare), threshold=args.threshold,
            calibrate_on=args.calibrate_on, operating_point=args.operating_point,
            target_sensitivity=args.target_sensitivity, calibrate_level=args.calibrate_level,
            bootstrap=args.bootstrap, seed=args.seed,
            explain=args.explain,
        ).validate()
        run(cfg)
    except (UserError, ValueError, OSError) as e:
        # Bad flags, missing files, unusable predictions and S3 refusing the credentials are the user's to fix: one
        # line, no traceback.
        print(f"error: {storage_error_line(e) or ' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
