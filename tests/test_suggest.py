"""`suggest`: which unannotated frames to annotate next.

The network is a stand-in with controlled scores, run through the real Detector (thresholds,
post-processing, the backbone hook): each frame carries, in its top-left and top-right pixels, the
score its one centred 'cell' box gets as it is and when mirrored, and its mean colour is what the
backbone sees. Expected values are computed by hand from the module's stated rules.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from serverless import detector as detector_module
from serverless.detector import Detector
from tests.conftest import module_dir
from tests.factories import make_bundle
from tests.test_upload import FakeClient, FakeTask, label
from trainer.commands import main
from trainer.cvat import server as cvat_server
from trainer.evaluation.suggest import BAND, rank, score_frames

THRESHOLD = 0.5
H, W = 32, 48


class PassThrough(torch.nn.Module):
    """Stands where torchvision keeps the backbone: its one "feature map" is the frame itself."""

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": batch}


class Coded(torch.nn.Module):
    """One 'cell' box in the middle scored by the red value of the top-left pixel (0: nothing);
    the backbone passes the frame through, so its pooled features are the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = PassThrough()

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.backbone(torch.stack(images))
        outputs = []
        for image in images:
            score = float(image[0, 0, 0])
            h, w = image.shape[1:]
            boxes = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]]) if score > 0 else torch.zeros(0, 4)
            outputs.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
                            "scores": torch.tensor([score] * len(boxes))})  # fmt: skip
        return outputs


def frame(code: int, mirrored: int | None = None, colour=(90, 90, 90)) -> np.ndarray:
    """A frame whose box scores code/255 as it is and mirrored/255 when mirrored."""
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    rgb[:] = colour
    rgb[0, 0, 0] = code
    rgb[0, W - 1, 0] = code if mirrored is None else mirrored
    return rgb


@pytest.fixture(scope="module")
def bundle(request) -> Iterator[Path]:
    with module_dir(request, "bundle") as folder:
        yield make_bundle(folder, ["cell"], threshold=THRESHOLD)


@pytest.fixture
def detector(bundle) -> Detector:
    detector = Detector(bundle, "cpu")
    detector.model = Coded()
    return detector


def ranked(detector, frames: dict[str, np.ndarray], diversity: float = 1.0) -> list:
    scored = list(score_frames(detector, list(frames), frames.__getitem__, progress=False))
    return rank(scored, diversity)


def weight(code: int) -> float:
    """The stated uncertainty weight of one detection scoring code/255."""
    return max(0.0, 1 - abs(code / 255 - THRESHOLD) / BAND)


def test_frames_with_objects_near_the_threshold_rank_first(detector):
    frames = {"sure": frame(250), "near": frame(133), "faint": frame(20), "empty": frame(0)}
    ranking = ranked(detector, frames)
    assert ranking[0].item == "near"
    by_name = {s.item: s.score for s in ranking}
    assert by_name["near"].uncertainty == pytest.approx(weight(133), abs=1e-6)
    assert by_name["sure"].uncertainty == 0 and by_name["faint"].uncertainty == 0
    assert by_name["sure"].detections == 1 and by_name["faint"].detections == 0
    assert all(by_name[n].disagreement == 0 for n in frames)  # both views agree everywhere


def test_a_detection_the_mirrored_view_does_not_confirm_is_disagreement(detector):
    frames = {"steady": frame(230), "flaky": frame(230, mirrored=0), "shaky": frame(230, mirrored=150)}
    scores = {s.item: s.score for s in ranked(detector, frames, diversity=0)}
    assert scores["steady"].disagreement == 0
    assert scores["flaky"].disagreement == pytest.approx(230 / 255, abs=1e-6)  # unmatched: its score
    assert scores["shaky"].disagreement == pytest.approx(80 / 255, abs=1e-6)  # matched: the difference
    order = [s.item for s in ranked(detector, frames, diversity=0)]
    assert order == ["flaky", "shaky", "steady"]


def test_near_identical_frames_are_not_all_picked(detector):
    frames = {f"copy{i}": frame(133) for i in range(5)}
    frames["other"] = frame(150, colour=(20, 200, 40))  # less uncertain, but looks different
    with_diversity = [s.item for s in ranked(detector, frames)]
    assert with_diversity[0].startswith("copy") and with_diversity[1] == "other"
    without = [s.item for s in ranked(detector, frames, diversity=0)]
    assert without[-1] == "other"


@pytest.fixture
def coded_detector(monkeypatch, bundle):
    """Every Detector the command builds gets the stand-in network."""

    class Stand(Detector):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.model = Coded()

    monkeypatch.setattr(detector_module, "Detector", Stand)


def test_cli_ranks_a_folder_into_a_csv(tmp_path, bundle, coded_detector, capsys):
    images = tmp_path / "slides"
    (images / "b").mkdir(parents=True)
    for name, rgb in {"a.png": frame(250), "b/c.png": frame(133), "d.png": frame(0)}.items():
        PIL.Image.fromarray(rgb).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "next.csv"
    argv = ["suggest", str(bundle), "--images", str(images), "--out", str(out), "--device", "cpu"]
    assert main([*argv, "--json", "--top", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in report["top"]] == ["b/c.png", report["top"][1]["image"]]
    assert len(report["skipped"]) == 1 and "broken.png" in report["skipped"][0]
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and rows[0]["image"] == "b/c.png"
    assert float(rows[0]["uncertainty"]) == pytest.approx(weight(133), abs=1e-4)
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--mark", "3"]) == 2
    assert "go with --server" in capsys.readouterr().err


def test_cli_marks_the_best_task_frames_with_a_tag(monkeypatch, tmp_path, bundle, coded_detector, capsys):
    task = FakeTask(15, [label(1, "cell")])
    task.frames = [png(frame(c)) for c in (250, 0, 20, 0, 133, 0, 0, 140, 0)]
    task.annotations.tags = [SimpleNamespace(frame=1, label_id=99)]  # a tag of another label
    monkeypatch.setattr(cvat_server, "connect", lambda url: FakeClient([task]))
    out = tmp_path / "next.csv"
    argv = ["suggest", str(bundle), "--server", "https://cvat.example.org", "--tasks", "15",
            "--out", str(out), "--mark", "2", "--diversity", "0", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "task 15: would tag 2 frame(s) 'annotate-next' (4, 7); would create tag label" in printed
    assert task.call_names() == []  # frames 1, 3, 5, 6 are annotated, 8 deleted: 0, 2, 4, 7 ranked
    rows = list(csv.DictReader(out.open()))
    assert {(r["task"], r["frame"]) for r in rows} == {("15", "0"), ("15", "2"), ("15", "4"), ("15", "7")}
    assert main([*argv, "--overwrite"]) == 0
    [(_, update), (_, data, _)] = [c for c in task.calls if c[0] in ("update", "update_annotations")]
    assert [(x.name, x.type) for x in update.labels] == [("annotate-next", "tag")]
    assert [(t.frame, t.label_id) for t in data.tags] == [(4, 101), (7, 101)]
    task.annotations.tags = [SimpleNamespace(frame=f, label_id=101) for f in (4, 7)]
    task.calls.clear()
    assert main([*argv, "--overwrite"]) == 0  # tagged frames stay candidates, tagged once
    assert "tagged 0 frame(s) 'annotate-next'; 2 already tagged" in capsys.readouterr().out
    assert task.call_names() == []


def png(rgb: np.ndarray) -> bytes:
    data = io.BytesIO()
    PIL.Image.fromarray(rgb).save(data, format="PNG")
    return data.getvalue()
