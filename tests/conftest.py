"""Shared fixtures: generated CVAT exports (built once per session), hand-written CVAT exports,
the real BCCD dataset, and what is expensive to make (the trained run, untrained bundles), built
once per test run however many xdist workers ask for it.

Scheduling (``make test`` runs ``pytest -n 2 --dist loadgroup --no-loadscope-reorder``): the tests
of a module stay on one worker (their module fixtures are built once) unless they name an
``xdist_group`` themselves (each architecture of test_architectures.py is one), and groups holding
``slow`` tests start first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from trainer.data.synth import generate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
#: What the shared trained run is trained with (tests/test_trained.py checks what it learnt).
TRAINED_LABELS = ("circle", "square")
TRAIN_FAST = ["--arch", "fasterrcnn_mobilenet_v3_large_fpn", "--weights", "none", "--device", "cpu",
              "--roi-batch-size", "64", "--workers", "0", "--patience", "0"]


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker computes on its share of the cores. torch, OpenMP and OpenVINO each take
    every core by default, and two workers doing so spin against each other: the trained fixture
    took 600 s instead of about 110. Subprocesses (the packaged function, the CLI) inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = str(max(1, len(os.sched_getaffinity(0)) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", share)
        os.environ.setdefault("CVAT_DETECTOR_THREADS", share)  # serverless.engine.cpu_threads
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


#: What a whole run needs under the temporary folder (it peaks at about 1.6 GB), with a margin.
DISK_NEEDED_GB = 2.5


def pytest_sessionstart(session: pytest.Session) -> None:
    """Say at once when the disk cannot hold a run: a full disk midway fails a hundred tests with
    errors that do not name it (as a CI run once did)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    folder = Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free / 1e9
    if free < DISK_NEEDED_GB:
        pytest.exit(f"{folder}: {free:.1f} GB free; the suite needs about {DISK_NEEDED_GB} GB "
                    "(a run peaks at 1.6 GB; set TMPDIR to a folder on a disk with more room)", 4)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group each module's tests (unless they name their own xdist_group); the groups with the
    most slow tests first, then the largest, so long work never starts while the other idles."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    groups = {item.nodeid: _group(item) for item in items}
    size = Counter(groups.values())
    slow = Counter(groups[item.nodeid] for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-slow[groups[item.nodeid]], -size[groups[item.nodeid]]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Refuse to run if pytest-xdist's groups did not take: every module fixture (trained runs
    among them) would be rebuilt each time a worker switches modules, and the suite take far longer."""
    lost = [nodeid for nodeid in ids if "@" not in nodeid.rsplit("]", 1)[-1]]
    if node.config.getvalue("dist") == "loadgroup" and lost:
        pytest.exit(f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more): this pytest and "
                    "pytest-xdist do not work together (pyproject.toml pins them)", 4)


def _group(item: pytest.Item) -> str:
    return "_".join(sorted(str(m.args[0] if m.args else m.kwargs.get("name")) for m in
                           item.iter_markers("xdist_group")))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Path:
    """``build(folder)`` run once per test run, whichever xdist worker asks first (the others wait
    for it); returns the finished folder. Under xdist the workers' base temp folders share a parent
    that belongs to this run alone."""
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / "built-once" / name
    target.parent.mkdir(exist_ok=True)
    with _locked(target.parent / f"{name}.lock"):
        if not target.is_dir():
            partial = target.parent / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build(partial)
            partial.rename(target)
    return target


@contextmanager
def module_dir(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A module fixture's folder, removed when its module is done unless a test failed meanwhile:
    trained runs weigh hundreds of MB, and a whole run would otherwise hold them all on disk."""
    failed = request.session.testsfailed
    path = request.getfixturevalue("tmp_path_factory").mktemp(name)
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def shared_bundle(tmp_path_factory) -> Callable[..., Path]:
    """``shared_bundle(labels, name="run", **make_bundle_options)``: an untrained bundle (in a
    folder called ``name``) built once per test run for each set of arguments. Read-only: a test
    that changes files of a bundle copies it or makes its own."""
    from tests.factories import make_bundle

    def get(labels: list[str], name: str = "run", **options: Any) -> Path:
        key = json.dumps({"labels": labels, "name": name, **options}, sort_keys=True)
        folder = "bundle-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        return build_once(tmp_path_factory, folder, lambda d: make_bundle(d / name, labels, **options)) / name

    return get


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """{"run", "export"}: a mobilenet trained 10 epochs on generated circles and squares (32 train,
    12 validation images), long enough that a broken loss, box format or label offset would show.
    Trained once per test run and shared: tests read it and write elsewhere."""
    from trainer.commands import main

    def train(folder: Path) -> None:
        export = generate(folder / "data", seed=1, train=32, val=12, empty=2, labels=TRAINED_LABELS,
                          formats=("cvat",))["cvat"]
        code = main(["train", str(export), "--out", str(folder / "run"), "--epochs", "10",
                     "--image-size", "224", "--warmup-iters", "30", "--lr", "0.02", *TRAIN_FAST])
        assert code == 0

    folder = build_once(tmp_path_factory, "trained", train)
    return {"run": folder / "run", "export": folder / "data" / "synth_cvat11.zip"}
