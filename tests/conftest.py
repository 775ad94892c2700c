"""Shared fixtures: generated CVAT exports (built once per session), hand-written CVAT exports,
and the real BCCD dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.synth import generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def _export_cache(tmp_path_factory) -> None:
    """Extracted zips go to a temporary cache, never to the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CVAT_DETECTOR_CACHE", str(tmp_path_factory.mktemp("export_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def synth_exports(tmp_path_factory) -> dict[str, Path]:
    """Small box export in both formats: {"cvat": zip, "coco": zip}; 12 Train + 4 Validation
    annotated images and 2 unannotated ones, 160x120."""
    out = tmp_path_factory.mktemp("synth_box")
    return generate(out, seed=0, train=12, val=4, empty=2, size=(160, 120))


@pytest.fixture(scope="session")
def synth_mixed_exports(tmp_path_factory) -> dict[str, Path]:
    """Every CVAT shape kind (boxes, rotated boxes, polygons, masks, ellipses, groups, points,
    tags) in both formats: {"cvat": zip, "coco": zip}."""
    out = tmp_path_factory.mktemp("synth_mixed")
    return generate(out, seed=1, train=8, val=4, empty=2, size=(160, 120), shapes="mixed")


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """../shared/datasets/bccd (the full real BCCD exports). A clone without ../shared skips the
    tests that need all of it (CI always has it); tests/data/bccd_subset covers the rest."""
    path = SHARED / "datasets" / "bccd"
    if not (path / "bccd_cvat11.zip").is_file() or not (path / "bccd_coco10.zip").is_file():
        pytest.skip(f"the full BCCD exports are not in {path} (a clone without ../shared)")
    return path


@pytest.fixture(scope="session")
def bccd_subset() -> dict[str, Path]:
    """12 real BCCD images as CVAT exported them, shipped with the tests: {"cvat": zip, "coco": zip}."""
    folder = Path(__file__).parent / "data" / "bccd_subset"
    return {"cvat": folder / "cvat_for_images_1.1.zip", "coco": folder / "coco_1.0.zip"}


@pytest.fixture
def cvat_export(tmp_path) -> Callable[..., Path]:
    """Factory for a hand-written CVAT for images 1.1 project export folder.

    ``cvat_export(images_xml, labels=("a", "b"), files={"Train/x.png": (w, h)}, prolog="")``
    writes annotations.xml (meta with the labels, then ``images_xml``) and solid PNG files at
    images/<path>; returns the folder.
    """

    def write(
        images_xml: str,
        *,
        labels: tuple[str, ...] = ("a", "b"),
        files: dict[str, tuple[int, int]] | None = None,
        prolog: str = "",
        name: str = "export",
    ) -> Path:
        root = tmp_path / name
        root.mkdir()
        label_xml = "".join(f"<label><name>{n}</name><attributes/></label>" for n in labels)
        (root / "annotations.xml").write_text(
            f'<?xml version="1.0" encoding="utf-8"?>\n{prolog}<annotations><version>1.1</version>'
            f"<meta><project><name>p</name><labels>{label_xml}</labels></project></meta>"
            f"{images_xml}</annotations>\n"
        )
        for rel, size in (files or {}).items():
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (90, 120, 60)).save(path)
        return root

    return write
