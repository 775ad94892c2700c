"""Folder inference: ``python -m trainer predict RUN --images DIR`` and the results it writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from faster_coco_eval import COCO
from faster_coco_eval.core import mask as mask_utils

from serverless.detector import Detector
from serverless.imageio import read_image
from trainer.commands import main
from trainer.inference import draw_preview, find_images, predict_folder


class BrightObjects(torch.nn.Module):
    """Stand-in network: 'cell' on the bright pixels (score 0.9) and 'debris' in the top-left
    sixteenth (0.3); with ``masks``, the cell's mask is its pixels and the debris's is empty."""

    def __init__(self, masks: bool = False) -> None:
        super().__init__()
        self.masks = masks

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        bright = images[0].mean(0) > 0.5
        h, w = bright.shape
        ys, xs = torch.nonzero(bright, as_tuple=True)
        boxes = [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [0, 0, w // 4, h // 4]]
        out = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.3]),
        }
        if self.masks:
            out["masks"] = torch.stack([bright, torch.zeros_like(bright)]).float()[:, None]
        return [out]


LABELS = ["cell", "debris"]


def write_tree(root: Path) -> None:
    """Nested folders of readable images, one corrupt file, and entries that are not images."""
    rgb = np.full((48, 64, 3), 25, dtype=np.uint8)
    rgb[10:30, 20:50] = 230
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    PIL.Image.fromarray(rgb).save(root / "a.png")
    PIL.Image.fromarray(rgb).save(root / "UPPER.PNG")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # shown rotated: 48 wide, 64 high
    PIL.Image.fromarray(rgb).save(root / "sub" / "b.jpg", exif=exif, quality=95)
    gray = np.full((40, 56), 3000, dtype=np.uint16)
    gray[5:20, 5:30] = 64000
    PIL.Image.fromarray(gray).save(root / "sub" / "deeper" / "c.tif")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    PIL.Image.fromarray(rgb).save(root / ".hidden" / "x.png")
    (root / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def bundle(shared_bundle) -> Path:
    return shared_bundle(LABELS, threshold=0.5)


@pytest.fixture(scope="module")
def standin(bundle) -> Detector:
    detector = Detector(bundle, "cpu")
    detector.model = BrightObjects()
    return detector


def test_cli_writes_coco_results_and_previews(tmp_path, bundle, capsys):
    """The real (untrained) network end to end; two readable images keep it quick."""
    images, out, previews = tmp_path / "images", tmp_path / "pred.json", tmp_path / "previews"
    write_tree(images)
    for extra in ["UPPER.PNG", "sub/deeper/c.tif"]:
        (images / extra).unlink()
    argv = ["predict", str(bundle), "--images", str(images), "--out", str(out)]
    argv += ["--previews", str(previews), "--threshold", "0.1", "--device", "cpu"]
    assert main(argv) == 0
    coco = json.loads(out.read_text())
    sizes = [(i["file_name"], i["width"], i["height"]) for i in coco["images"]]
    assert sizes == [("a.png", 64, 48), ("sub/b.jpg", 48, 64)]  # b.jpg: EXIF-rotated
    assert coco["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
    detector = Detector(bundle, "cpu")
    for image in coco["images"]:
        det = detector.detect(read_image(images / image["file_name"]), 0.1)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in anns] == [1 + LABELS.index(x) for x in det.labels]
        for ann, (x1, y1, x2, y2), score in zip(anns, det.boxes, det.scores, strict=True):
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
            assert ann["score"] == pytest.approx(score) and ann["score"] >= 0.1
        with PIL.Image.open(previews / image["file_name"]) as preview:
            assert preview.size == (image["width"], image["height"])
    printed = capsys.readouterr().out
    assert f"images: 2, detections: {len(coco['annotations'])}" in printed
    assert "skipped 1 unreadable image(s):" in printed and "broken.jpg" in printed
    assert f"wrote {out} and previews in {previews}" in printed


def test_previews_inside_the_images_folder_are_not_read_back(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "pv").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "pv" / "a.png")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path, tmp_path / "pv")]
    assert found == ["UPPER.PNG", "a.png", "sub/b.jpg", "sub/broken.jpg", "sub/deeper/c.tif"]


def test_existing_results_are_not_replaced_without_overwrite(tmp_path, bundle, capsys):
    images = tmp_path / "images"
    images.mkdir()
    write_tree(images)
    out = tmp_path / "pred.json"
    out.write_text("earlier results")
    assert main(["predict", str(bundle), "--images", str(images), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "earlier results"


def test_folder_without_images_is_a_user_error(tmp_path, bundle, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["predict", str(bundle), "--images", str(tmp_path / "empty")]
    assert main([*argv, "--out", str(tmp_path / "p.json")]) == 2
    assert "no .jpg" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_server_options_with_images_are_refused(tmp_path, bundle, capsys):
    assert main(["predict", str(bundle), "--images", str(tmp_path), "--tasks", "15"]) == 2
    assert "go with --server, not --images" in capsys.readouterr().err


def test_bad_threshold_is_refused(tmp_path, bundle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(bundle), "--images", str(tmp_path), "--threshold", "1.5"])
    assert exc.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize(("threshold", "labels"), [(None, [1]), (0.95, []), (0.2, [1, 2])])
def test_threshold_is_honoured(tmp_path, standin, threshold, labels):
    write_tree(tmp_path)
    result = predict_folder(standin, tmp_path, threshold=threshold, progress=False)
    for image in result.coco["images"]:
        anns = [a for a in result.coco["annotations"] if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in anns] == labels
    assert result.coco["info"]["threshold"] == (0.5 if threshold is None else threshold)
    assert len(result.failures) == 1 and "broken.jpg" in result.failures[0]


def test_masks_are_coco_rle_that_faster_coco_eval_reads(tmp_path, standin):
    detector = copy.copy(standin)
    detector.model = BrightObjects(masks=True)  # outputs shaped as Mask R-CNN's
    write_tree(tmp_path)
    result = predict_folder(detector, tmp_path, threshold=0.2, progress=False)
    coco = result.coco
    for image in coco["images"]:
        bright = read_image(tmp_path / image["file_name"]).mean(axis=2) / 255 > 0.5
        [cell] = [a for a in coco["annotations"] if a["image_id"] == image["id"]]  # debris: empty
        decoded = mask_utils.decode(cell["segmentation"]).astype(bool)
        np.testing.assert_array_equal(decoded, bright)
        assert (cell["category_id"], cell["area"]) == (1, bright.sum())
    ground_truth = COCO({k: coco[k] for k in ("images", "categories")} | {"annotations": []})
    loaded = ground_truth.loadRes(coco["annotations"])
    assert len(loaded.getAnnIds()) == len(coco["annotations"]) == 4
    assert result.counts == {"cell": 4}


def test_preview_draws_boxes_and_tints_masks(standin):
    image = np.full((48, 64, 3), 25, dtype=np.uint8)
    image[10:30, 20:50] = 230
    det = standin.detect(image, 0.2)
    preview = np.asarray(draw_preview(image, det, standin.labels))
    assert preview.shape == image.shape
    assert (preview[20, 20] != image[20, 20]).any()  # the cell box's left edge is drawn
    assert (preview[40, 60] == image[40, 60]).all()  # far from every detection: untouched
