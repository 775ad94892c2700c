"""Every kind of bad export is refused with a message naming the file and what was expected."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest
from PIL import Image

from serverless.errors import UserError
from trainer.data.readers import load_dataset
from trainer.data.readers.archive import extract_zip

BOX = '<box label="a" source="manual" occluded="0" xtl="1" ytl="1" xbr="5" ybr="5" z_order="0"/>'


def one_image(name: str = "x.png", width: int = 8, height: int = 8, subset: str = "Train") -> str:
    return (
        f'<image id="0" name="{name}" subset="{subset}" task_id="1" width="{width}" '
        f'height="{height}">{BOX}</image>'
    )


def test_corrupt_zip_is_refused(tmp_path):
    bad = tmp_path / "export.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match=r"export.zip: corrupt zip"):
        load_dataset([bad], cache_dir=tmp_path / "cache")


def test_truncated_and_damaged_zips_are_refused(synth_exports, tmp_path):
    data = synth_exports["cvat"].read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated\.zip: corrupt zip"):
        load_dataset([truncated], cache_dir=tmp_path / "cache")
    damaged = tmp_path / "damaged.zip"
    middle = len(data) // 2  # inside a stored JPEG: the CRC check must catch it
    damaged.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    with pytest.raises(UserError, match=r"damaged\.zip: corrupt zip"):
        load_dataset([damaged], cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # nothing half-extracted is left


@pytest.mark.parametrize("entry", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "C:/evil"])
def test_zip_entry_escaping_the_target_is_refused(tmp_path, entry):
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations.xml", "<annotations/>")
        zf.writestr(zipfile.ZipInfo(entry), "owned")
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(UserError, match="outside the target"):
        extract_zip(archive, target)
    assert not list(tmp_path.rglob("evil*")) and not list(target.iterdir())


def test_zip_bomb_is_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations.xml", b"\0" * (8 * 2**20))  # 8 MiB of zeros deflate ~1000x
    with pytest.raises(UserError, match="zip bomb"):
        load_dataset([archive], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "prolog",
    [
        # billion laughs: internal entities expanding exponentially
        '<!DOCTYPE annotations [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>\n',
        # external entity: would read a local file into a label name
        '<!DOCTYPE annotations [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n',
        # external DTD
        '<!DOCTYPE annotations SYSTEM "http://example.com/evil.dtd">\n',
    ],
)
def test_xml_with_dtd_or_entities_is_refused(cvat_export, prolog):
    root = cvat_export(one_image(), files={"Train/x.png": (8, 8)}, prolog=prolog)
    with pytest.raises(UserError, match=r"annotations.xml: contains a DTD or entity declaration"):
        load_dataset([root])


def test_malformed_xml_names_the_file(cvat_export):
    root = cvat_export("<image id='0' name='x.png' width='8' height='8'><tag></image>")
    with pytest.raises(UserError, match=r"annotations\.xml: not well-formed XML"):
        load_dataset([root])


def test_shape_with_bad_coordinates_names_line_and_image(cvat_export):
    bad = one_image().replace('xtl="1"', 'xtl="left"')
    with pytest.raises(UserError, match=r"annotations.xml, line \d+: image 'x.png': invalid <box>"):
        load_dataset([cvat_export(bad, files={"Train/x.png": (8, 8)})])


def test_video_export_of_an_image_task_is_refused_with_advice(cvat_export):
    # An image task exported as "CVAT for video 1.1" has no <original_size> and no frame names
    # (cvat_exports memo, section 3): its frames cannot be found or sized.
    track = '<track id="0" label="a" source="manual"><box frame="0" keyframe="1" outside="0" '
    root = cvat_export(track + 'occluded="0" xtl="1" ytl="1" xbr="5" ybr="5" z_order="0"/></track>')
    with pytest.raises(UserError, match=r"CVAT for video 1\.1.*'CVAT for images 1\.1' instead"):
        load_dataset([root])


def test_unknown_export_format_says_what_was_found_and_expected(tmp_path):
    folder = tmp_path / "yolo"
    (folder / "labels").mkdir(parents=True)
    (folder / "data.yaml").write_text("names: [a]")
    with pytest.raises(UserError, match=r"found data.yaml, labels/; expected a CVAT export"):
        load_dataset([folder])
    with pytest.raises(UserError, match=r"is a .yaml file; expected a CVAT export"):
        load_dataset([folder / "data.yaml"])
    with pytest.raises(UserError, match="no such file or folder"):
        load_dataset([tmp_path / "nope.zip"])


def test_coco_file_with_unknown_category_names_the_annotation(tmp_path):
    ann_dir = tmp_path / "export" / "annotations"
    ann_dir.mkdir(parents=True)
    (ann_dir / "instances_Train.json").write_text(
        '{"categories": [{"id": 1, "name": "a"}], "images": [{"id": 1, "file_name": "x.png", '
        '"width": 8, "height": 8}], "annotations": [{"id": 7, "image_id": 1, "category_id": 9, '
        '"bbox": [1, 1, 2, 2], "segmentation": [], "iscrowd": 0}]}'
    )
    with pytest.raises(UserError, match=r"instances_Train.json: annotation id 7: unknown"):
        load_dataset([tmp_path / "export"])


def test_missing_images_are_named_and_counted(cvat_export):
    images = "".join(one_image(f"im{i}.png").replace('id="0"', f'id="{i}"') for i in range(7))
    root = cvat_export(images, files={"Train/im0.png": (8, 8)})
    with pytest.raises(UserError, match=r"6 of 7 image files are missing.*Train/im1.png") as err:
        load_dataset([root])
    assert "Train/im6.png" not in str(err.value)  # a few are listed, not all
    assert "--skip-missing" in str(err.value)
    data = load_dataset([root], skip_missing=True)
    assert [im.name for im in data.images] == ["im0.png"]
    assert data.skipped["missing image"] == 6


def test_images_dir_option_finds_images_elsewhere(cvat_export, tmp_path):
    root = cvat_export(one_image(), files={"Train/x.png": (8, 8)})
    moved = tmp_path / "elsewhere"
    shutil.move(root / "images", moved)
    data = load_dataset([root], images_dir=moved)
    assert data.images[0].path == moved / "Train" / "x.png"


def test_image_size_differing_from_annotation_is_an_error(cvat_export):
    root = cvat_export(one_image(width=8, height=8), files={"Train/x.png": (8, 6)})
    with pytest.raises(
        UserError, match=r"1 image files differ in size.*x.png is 8x6, annotated as 8x8"
    ):
        load_dataset([root])


def test_image_size_check_applies_exif_orientation(cvat_export):
    root = cvat_export(one_image(name="x.jpg", width=6, height=8))
    path = root / "images" / "Train" / "x.jpg"
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 8x6, displayed (and annotated in CVAT) 6x8
    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, "JPEG", exif=exif)
    path.write_bytes(buf.getvalue())
    assert load_dataset([root]).images[0].path == path


def test_image_name_escaping_the_export_is_refused(cvat_export):
    root = cvat_export(one_image(name="../../etc/passwd"), files={"Train/x.png": (8, 8)})
    with pytest.raises(UserError, match="points outside the export"):
        load_dataset([root])


# ---------------------------------------------------------------- odd identifiers


def coco_export(tmp_path, images: list[dict], annotations: list[dict] | None = None,
                categories: list[dict] | None = None):  # fmt: skip
    ann_dir = tmp_path / "coco" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    doc = {"categories": categories if categories is not None else [{"id": 1, "name": "a"}],
           "images": images, "annotations": annotations or []}  # fmt: skip
    (ann_dir / "instances_Train.json").write_text(json.dumps(doc))
    return tmp_path / "coco"


def ann(image_id, **extra) -> dict:
    return {"id": 1, "image_id": image_id, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": [],
            "iscrowd": 0, **extra}  # fmt: skip


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([{"id": None, "file_name": "x.png", "width": 8, "height": 8}], r"images\[0\] needs id"),
        ([{"id": 1, "file_name": "", "width": 8, "height": 8}], "file_name '' is empty"),
        ([{"id": 1, "file_name": "../x.png", "width": 8, "height": 8}], "file_name '../x.png' points out"),
        ([{"id": 1, "file_name": "a\x00.png", "width": 8, "height": 8}], r"file_name 'a\\x00.png' holds"),
        ([{"id": 1, "file_name": 7, "width": 8, "height": 8}], "file_name 7 is not text"),
        ([{"id": 1, "file_name": "x.png", "width": "wide", "height": 8}], r"images\[0\] needs .*width"),
        ([{"id": 1, "file_name": "x.png", "width": 8, "height": 8},
          {"id": 1, "file_name": "y.png", "width": 8, "height": 8}], r"images\[1\] \('y.png'\) has id 1"),
    ],
)  # fmt: skip
def test_odd_coco_image_entries_are_refused_naming_the_field(tmp_path, images, message):
    with pytest.raises(UserError, match=r"instances_Train.json: (images\[\d\] \(id 1\): )?" + message):
        load_dataset([coco_export(tmp_path, images, [ann(1)])])


def test_coco_string_ids_are_ids_and_odd_annotation_ids_are_not_file_names(tmp_path):
    images = [{"id": "frame-a", "file_name": "x.png", "width": 8, "height": 8}]
    root = coco_export(tmp_path, images, [ann("frame-a", id="../../evil")])
    data = load_dataset([root])
    assert data.images[0].shapes[0].box == (1, 1, 5, 5)
    assert data.images[0].shapes[0].object_id is None  # the crop file name uses the shape's index


@pytest.mark.parametrize(
    ("categories", "annotation", "message"),
    [
        ([{"id": 1, "name": ""}], ann(1), r"categories\[0\] \(id 1\) has an empty 'name'"),
        ([{"id": [1], "name": "a"}], ann(1), r"categories\[0\] needs a number 'id'"),
        ([{"id": 1, "name": "a"}], ann(1, category_id=2), "annotation id 1: unknown or missing"),
        ([{"id": 1, "name": "a"}], ann(1, bbox=[1, 1, "nan", 4]), "annotation id 1: bbox .* not finite"),
        ([{"id": 1, "name": "a"}], ann(1, attributes=[1]), "annotation id 1: 'attributes' must be an object"),
    ],
)
def test_odd_coco_categories_and_annotations_are_refused(tmp_path, categories, annotation, message):
    images = [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}]
    with pytest.raises(UserError, match=message):
        load_dataset([coco_export(tmp_path, images, [annotation], categories)])


@pytest.mark.parametrize(
    ("image_xml", "message"),
    [
        (one_image().replace('id="0"', 'id="first"'), r"line \d+: <image name='x.png'> needs whole"),
        (one_image().replace('task_id="1"', 'task_id=""').replace('width="8"', 'width="8.5"'), "needs whole"),
        (one_image(name=""), r"<image id='0'> name '' is empty"),
        (one_image(name="a&#9;b.png"), r"name 'a\\tb.png' holds control characters"),
        (one_image().replace('label="a"', 'label=""'), r"image 'x.png': invalid <box> \(it has no label\)"),
    ],
)
def test_odd_xml_identifiers_are_refused_naming_the_line(cvat_export, image_xml, message):
    with pytest.raises(UserError, match=message):
        load_dataset([cvat_export(image_xml, files={"Train/x.png": (8, 8)})])


def test_empty_label_name_in_meta_is_refused(tmp_path):
    (tmp_path / "annotations.xml").write_text(
        "<annotations><meta><task><labels><label><name> </name></label></labels></task></meta></annotations>"
    )
    with pytest.raises(UserError, match=r"line \d+: a <label> has an empty <name>"):
        load_dataset([tmp_path])
