"""Report on scored predictions (metrics, tables, figures), compare the reports of several runs, or draw the runs of
a nightly scoring output.

    python jobs/report.py --predictions PRED --out DIR [--threshold T | --calibrate-on VAL_PRED ...]
    python jobs/report.py --compare RUN_OR_REPORT_DIR [...] --out DIR
    python jobs/report.py --history SCORED --out DIR      (the trend over a scoring output's runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.config import UserError, add_config_arguments, options_given  # noqa: E402
from mura_ray.report import ReportConfig, run  # noqa: E402
from mura_ray.runtime import setup_logging, storage_error_line  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage and exit; main() turns this into its one `error:` line and code 2.
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobs/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ReportConfig, predictions={"metavar": "PRED"}, compare={"metavar": "DIR"},
                         history={"metavar": "SCORED"}, out={"metavar": "DIR"}, threshold={"metavar": "T"},
                         calibrate_on={"metavar": "VAL_PRED"},
                         target_sensitivity={"metavar": "S"}, bootstrap={"metavar": "N"}, explain={"metavar": "N"})
    return p


def build_config(args: argparse.Namespace) -> ReportConfig:
    return ReportConfig(**options_given(args, ReportConfig)).validate()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        run(build_config(build_parser().parse_args(argv)))
    except (UserError, ValueError, OSError) as e:
        # Bad flags, missing files, unusable predictions and S3 refusing the credentials are the user's to fix: one
        # line, no traceback.
        print(f"error: {storage_error_line(e) or ' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
