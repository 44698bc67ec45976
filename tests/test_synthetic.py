"""The synthetic generator writes a tree that reads exactly like MURA-v1.1."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import pytest
from PIL import Image

from mura_ray.data import synthetic
from mura_ray.data.synthetic import demo_dataset_root, generate_mura
from mura_ray.labels import BODY_PARTS

N_IMAGES = 120
SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return generate_mura(tmp_path_factory.mktemp("mura"), n_images=N_IMAGES, image_size=SIZE, seed=3)


def _lines(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n")
    return text.splitlines()


def _studies(dataset: pathlib.Path, split: str) -> dict[str, int]:
    studies = {}
    for line in _lines(dataset / f"{split}_labeled_studies.csv"):
        path, label = line.split(",")
        studies[path] = int(label)
    return studies


def _fingerprint(dataset: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(dataset)): p.read_bytes() for p in sorted(dataset.rglob("*")) if p.is_file()}


def test_layout_and_csvs_match_mura(dataset: pathlib.Path) -> None:
    assert dataset.name == "MURA-v1.1"
    n_images = 0
    for split in ("train", "valid"):
        studies = _studies(dataset, split)
        assert studies, f"no {split} studies"
        for path, label in studies.items():
            parts = path.split("/")
            assert path.endswith("/") and parts[:2] == ["MURA-v1.1", split], path
            assert parts[2].removeprefix("XR_") in BODY_PARTS
            assert parts[3].startswith("patient") and len(parts[3]) == len("patient") + 5 and parts[3][7:].isdigit()
            number, outcome = parts[4].split("_")
            assert number.startswith("study") and number[5:].isdigit()
            assert (outcome, label) in {("positive", 1), ("negative", 0)}, path
        images = _lines(dataset / f"{split}_image_paths.csv")
        for line in images:
            study, name = line.rsplit("/", 1)
            assert study + "/" in studies, line
            assert name.startswith("image") and name.endswith(".png") and name[5:-4].isdigit()
        views = collections.Counter(line.rsplit("/", 1)[0] + "/" for line in images)
        assert set(views) == set(studies) and set(views.values()) <= {1, 2, 3, 4}
        n_images += len(images)
    assert abs(n_images - N_IMAGES) <= 0.1 * N_IMAGES


def test_every_listed_image_decodes(dataset: pathlib.Path) -> None:
    for split in ("train", "valid"):
        for line in _lines(dataset / f"{split}_image_paths.csv"):
            with Image.open(dataset.parent / line) as image:
                image.load()
                assert 0.8 * SIZE - 1 <= image.width <= SIZE and 0.8 * SIZE - 1 <= image.height <= SIZE
    listed = sum(len(_lines(dataset / f"{s}_image_paths.csv")) for s in ("train", "valid"))
    assert len(list(dataset.rglob("*.png"))) == listed


def test_patients_and_body_parts(dataset: pathlib.Path) -> None:
    train, valid = _studies(dataset, "train"), _studies(dataset, "valid")
    assert {p.split("/")[2] for p in train} == {f"XR_{part}" for part in BODY_PARTS}
    patients = {split: {p.split("/")[3] for p in studies} for split, studies in (("train", train), ("valid", valid))}
    assert patients["train"].isdisjoint(patients["valid"])
    parts_per_patient = collections.defaultdict(set)
    for path in [*train, *valid]:
        parts_per_patient[path.split("/")[3]].add(path.split("/")[2])
    assert max(len(parts) for parts in parts_per_patient.values()) >= 2
    labels = [*train.values(), *valid.values()]
    assert 0 < sum(labels) < len(labels)


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = generate_mura(tmp_path / "again", n_images=N_IMAGES, image_size=SIZE, seed=3)
    assert _fingerprint(again) == _fingerprint(dataset)
    in_two_processes = generate_mura(tmp_path / "parallel", n_images=N_IMAGES, image_size=SIZE, seed=3, workers=2)
    assert _fingerprint(in_two_processes) == _fingerprint(dataset)
    other = generate_mura(tmp_path / "other", n_images=N_IMAGES, image_size=SIZE, seed=4)
    assert _fingerprint(other) != _fingerprint(dataset)


def test_image_modes_are_mixed_like_mura(dataset: pathlib.Path) -> None:
    modes = collections.Counter()
    for png in dataset.rglob("*.png"):
        with Image.open(png) as image:
            modes[image.mode] += 1
            if image.mode == "I;16":
                values = np.asarray(image)
                assert values.min() == 0 and values.max() == 65535
    assert set(modes) == {"L", "RGB", "I;16"}
    assert modes["L"] > modes["RGB"] + modes["I;16"]


def test_existing_tree_is_not_overwritten(dataset: pathlib.Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        generate_mura(dataset.parent, n_images=10, image_size=SIZE)


def test_bad_arguments_are_all_reported(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="n_images.*image_size.*valid_fraction"):
        generate_mura(tmp_path, n_images=0, image_size=8, valid_fraction=1.0)


def test_demo_dataset_is_built_once(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MURA_RAY_CACHE", str(tmp_path))
    root = demo_dataset_root(n_images=40, image_size=32, seed=1)
    assert root.parent == tmp_path
    assert (root / "MURA-v1.1" / "train_labeled_studies.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind

    def fail(*args: object, **kwargs: object) -> pathlib.Path:
        raise AssertionError("the cached demo set was rebuilt")

    monkeypatch.setattr(synthetic, "generate_mura", fail)
    assert demo_dataset_root(n_images=40, image_size=32, seed=1) == root
