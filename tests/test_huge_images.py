"""Whole-slide images: one pixel limit (--max-pixels / CVAT_DETECTOR_MAX_PIXELS) decides, never Pillow's
bomb checks; over it, one line says what to do; inspect decodes nothing; crops decode an image once."""

from __future__ import annotations

import csv

import pytest
from PIL import Image, ImageFile

from serverless.errors import ImageDecodeError
from serverless.imageio import MAX_PIXELS_ENV, read_image
from tests import cvat_writer as cw
from trainer.commands import main

SLIDE = (20_000, 12_000)  # 240 MP: above Pillow's own error threshold (2 x 89.5 MP)


@pytest.fixture(scope="module")
def slide_export(tmp_path_factory):
    """A task export of one 20000 x 12000 slide (a 1-bit PNG: 29 kB on disk) with two boxes."""
    root = tmp_path_factory.mktemp("slide") / "task"
    (root / "images").mkdir(parents=True)
    Image.new("1", SLIDE, 0).save(root / "images" / "slide.png")
    boxes = "".join(cw.shape("box", "cell", occluded=0, xtl=f"{x:.2f}", ytl="100.00", xbr=f"{x + 50:.2f}",
                             ybr="160.00", z_order=0) for x in (100, 19_000))  # fmt: skip
    meta = cw.task_meta(5, [{"name": "cell"}], size=1)
    (root / "annotations.xml").write_text(cw.annotations_xml(meta, cw.image(0, "slide.png", SLIDE, boxes)))
    return root


def test_inspect_reads_the_size_from_the_header_without_decoding(slide_export, monkeypatch, capsys):
    def no_decoding(self, *args):
        raise AssertionError("inspect decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert main(["inspect", str(slide_export)]) == 0
    out = capsys.readouterr().out
    assert "objects: 2" in out and "largest image: default/slide.png, 20000x12000 = 240000000 pixels" in out
    assert main(["inspect", str(slide_export), "--max-pixels", "100M"]) == 0  # inspect only reports it
    assert "over the limit of 100000000: raise it with --max-pixels 240000000" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_over_the_limit_is_one_line_naming_image_size_limit_and_remedy(
    slide_export, tmp_path, monkeypatch, capsys, how
):
    argv = ["crop", str(slide_export), "--out", str(tmp_path / "crops")]
    if how == "flag":
        argv += ["--max-pixels", "100000000"]
    else:
        monkeypatch.setenv(MAX_PIXELS_ENV, "100000000")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: image default/slide.png: 20000x12000 = 240000000 pixels, over the limit of 100000000 pixels; "
        "to allow it, pass --max-pixels 240000000 or set CVAT_DETECTOR_MAX_PIXELS=240000000\n"
    )
    assert not (tmp_path / "crops").exists()


def test_a_bad_limit_in_the_environment_is_named(slide_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    assert main(["crop", str(slide_export), "--out", str(tmp_path / "crops")]) == 2
    assert "CVAT_DETECTOR_MAX_PIXELS: expected a positive integer, got 'lots'" in capsys.readouterr().err


def test_the_decoder_refuses_from_the_header_with_the_same_message(slide_export):
    message = r"slide.png: 20000x12000 = 240000000 pixels, over the limit .* --max-pixels 240000000"
    with pytest.raises(ImageDecodeError, match=message):
        read_image(slide_export / "images" / "slide.png", max_pixels=10**8)


def test_crops_decode_each_image_once(tmp_path, monkeypatch):
    import trainer.crop.worker as worker

    calls = []
    def counting(path, limit=None):
        calls.append(limit)
        return read_image(path)

    monkeypatch.setattr(worker, "read_image", counting)
    root = tmp_path / "task"
    boxes = "".join(cw.shape("box", "cell", occluded=0, xtl=f"{x:.2f}", ytl="10.00", xbr=f"{x + 20:.2f}",
                             ybr="30.00", z_order=0) for x in range(0, 250, 50))  # fmt: skip
    files = {"annotations.xml": cw.annotations_xml(cw.task_meta(5, [{"name": "cell"}], size=1),
                                                   cw.image(0, "a.png", (300, 200), boxes)),
             "images/a.png": cw.png((300, 200))}  # fmt: skip
    cw.write(root, files)
    assert main(["crop", str(root), "--out", str(tmp_path / "crops"), "--max-pixels", "70000"]) == 0
    assert calls == [70_000]  # once, under the limit the data was checked against
    assert len(list(csv.DictReader((tmp_path / "crops" / "metadata.csv").open()))) == 5
