"""Label vocabularies shared by every job: MURA's seven body parts and the class-folder names of external sets."""

from __future__ import annotations

BODY_PARTS: tuple[str, ...] = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
"""MURA's body parts, in the order of the body-part head's outputs."""

BODY_PART_INDEX: dict[str, int] = {name: i for i, name in enumerate(BODY_PARTS)}

ABNORMAL_NAMES: tuple[str, ...] = ("normal", "abnormal")
"""Names of the abnormality classes 0 and 1."""

_CLASS_FOLDER_LABELS: dict[str, int] = {
    "fractured": 1,
    "abnormal": 1,
    "positive": 1,
    "not fractured": 0,
    "not_fractured": 0,
    "normal": 0,
    "negative": 0,
}

_SPLIT_FOLDERS: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def parse_class_folder(name: str) -> int:
    """Map an ImageFolder class folder name to a label (1 = abnormal), never by alphabetical order."""
    key = name.strip().lower()
    if key not in _CLASS_FOLDER_LABELS:
        allowed = ", ".join(repr(k) for k in _CLASS_FOLDER_LABELS)
        raise ValueError(f"Unknown class folder {name!r}; expected one of {allowed}")
    return _CLASS_FOLDER_LABELS[key]


def parse_split_folder(name: str) -> str | None:
    """Map a split folder name (`train`, `val`/`valid`, `test`) to a split, or None if it is not one."""
    return _SPLIT_FOLDERS.get(name.strip().lower())


def parse_body_part(name: str) -> str:
    """Normalise a body-part name (`XR_WRIST`, `wrist`) to one of BODY_PARTS."""
    key = name.strip().upper().removeprefix("XR_")
    if key not in BODY_PART_INDEX:
        raise ValueError(f"Unknown body part {name!r}; expected one of {', '.join(BODY_PARTS)}")
    return key
