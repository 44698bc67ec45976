"""What a user writes instead of the scoring job: the baseline of `benchmarks/score.py`.

A `DataLoader` with one worker process per core decodes and preprocesses the images of an ingested split (the
project's one preprocessing, with the image statistics the job records for drift:
`images.load_pixels_and_stats`), one model scores the batches in a plain loop under
`torch.inference_mode`, and the predictions go to one Parquet file in the job's format (`PREDICTION_SCHEMA`, with
each batch's `scored_at`). Torch, timm and pyarrow only: no Ray.

    python benchmarks/score_baseline.py --model MODEL_DIR --input DATA/test --out predictions.parquet
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mura_ray.data.images import DecodeError, load_pixels_and_stats  # noqa: E402
from mura_ray.data.pipeline import body_part_indices  # noqa: E402
from mura_ray.labels import BODY_PARTS  # noqa: E402
from mura_ray.models import load_model  # noqa: E402
from mura_ray.predictions import PREDICTION_SCHEMA  # noqa: E402

COLUMNS = ["image_id", "image", "path", "study_id", "body_part", "label"]


class SplitImages(torch.utils.data.Dataset):
    """Item i: the model input pixels of row i (uint8, size x size), the image statistics the job records for
    drift (mean, contrast, height, width; NaN when it failed) and its decode error ("" when none)."""

    def __init__(self, images: pa.Array, size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        try:
            pixels, st = load_pixels_and_stats(self.images[i].as_py(), self.size)
            stats = torch.tensor([st.mean, st.contrast, st.height, st.width], dtype=torch.float64)
            return torch.from_numpy(pixels.copy()), stats, ""  # Pillow's array is read-only
        except DecodeError as e:
            return torch.zeros((self.size, self.size), dtype=torch.uint8), torch.full((4,), math.nan), str(e)


def predictions(rows: pa.Table, errors: list[str], stats: torch.Tensor, out: dict[str, torch.Tensor],
                threshold: float, model_id: str) -> pa.Table:
    """One batch's rows in the job's prediction format."""
    ok = np.array([not e for e in errors])
    prob = torch.sigmoid(out["abnormal"]).numpy()
    parts = torch.softmax(out["body_part"], dim=1).numpy()
    n = rows.num_rows
    columns = {
        "image_id": rows["image_id"], "path": rows["path"], "study_id": rows["study_id"],
        "body_part": rows["body_part"],
        "body_part_pred": [BODY_PARTS[i] if o else None for i, o in zip(parts.argmax(1), ok, strict=True)],
        "body_part_probs": [p.tolist() if o else None for p, o in zip(parts, ok, strict=True)],
        "prob_abnormal": [float(p) if o else None for p, o in zip(prob, ok, strict=True)],
        "pred_abnormal": [int(p >= threshold) if o else None for p, o in zip(prob, ok, strict=True)],
        "label": rows["label"],
        "model_id": [model_id] * n,
        "scored_at": [datetime.now(timezone.utc)] * n,
        "error": [e or None for e in errors],
        "image_mean": [float(v[0]) if o else None for v, o in zip(stats, ok, strict=True)],
        "image_contrast": [float(v[1]) if o else None for v, o in zip(stats, ok, strict=True)],
        "image_height": [int(v[2]) if o else None for v, o in zip(stats, ok, strict=True)],
        "image_width": [int(v[3]) if o else None for v, o in zip(stats, ok, strict=True)],
    }
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) if isinstance(columns[f.name], list)
                     else columns[f.name].cast(f.type) for f in PREDICTION_SCHEMA})


def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory")
    p.add_argument("--input", required=True, help="ingested Parquet split")
    p.add_argument("--out", required=True, help="predictions Parquet file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=cores, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=cores, help="torch intra-op threads of the model")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep the model and its input in contiguous (NCHW) memory")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, spec, model_id = load_model(args.model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    table = pq.read_table(args.input, columns=COLUMNS)
    meta = table.drop_columns(["image"])
    loader = torch.utils.data.DataLoader(SplitImages(table["image"].combine_chunks(), spec.image_size),
                                         batch_size=args.batch_size, num_workers=args.workers)
    parts, start = [], 0
    with torch.inference_mode():
        for pixels, stats, errors in loader:
            rows = meta.slice(start, len(errors))
            start += len(errors)
            x = (pixels.unsqueeze(1).float() / 255.0 - spec.mean) / spec.std  # images.normalize's arithmetic
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x, torch.from_numpy(body_part_indices(rows["body_part"].to_pylist())))
            parts.append(predictions(rows, list(errors), stats, out, spec.threshold, model_id))
    pq.write_table(pa.concat_tables(parts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
