"""load_dataset on real and generated exports: both formats agree, options do what they say."""

from __future__ import annotations

from collections import Counter

import pytest

from serverless.errors import UserError
from trainer.data.readers import load_dataset
from trainer.data.readers.parsed import DEGENERATE, NOT_SELECTED, UNANNOTATED, UNSELECTED


def boxes_by_key(data) -> dict:
    return {im.key: sorted((s.label, s.box) for s in im.shapes) for im in data.images}


def test_bccd_both_formats_yield_the_same_dataset(bccd_dir, tmp_path):
    xml = load_dataset([bccd_dir / "bccd_cvat11.zip"], cache_dir=tmp_path)
    coco = load_dataset([bccd_dir / "bccd_coco10.zip"], cache_dir=tmp_path)
    for data in (xml, coco):
        summary = data.summary()
        assert data.labels == ["RBC", "WBC", "Platelets"]
        assert summary["subsets"] == {"Train": 205, "Validation": 87}
        # BCCD holds 3943 boxes, two of them zero-sized (xtl == xbr): dropped and counted
        assert summary["objects"] == 3941 and data.skipped[DEGENERATE] == 2
        per_subset = Counter(im.subset for im in data.images for _ in im.shapes)
        assert per_subset == {"Train": 2805 - 1, "Validation": 1138 - 1}
        assert all(im.path is not None and im.path.is_file() for im in data.images)
    assert boxes_by_key(xml) == boxes_by_key(coco)


def test_real_cvat_exports_in_both_formats_yield_the_same_dataset(bccd_subset, tmp_path):
    xml = load_dataset([bccd_subset["cvat"]], cache_dir=tmp_path)
    coco = load_dataset([bccd_subset["coco"]], cache_dir=tmp_path)
    for data in (xml, coco):
        assert data.labels == ["RBC", "WBC", "Platelets"]
        assert data.summary()["subsets"] == {"Train": 8, "Validation": 4}
        assert data.summary()["objects_per_label"] == {"RBC": 176, "WBC": 11, "Platelets": 11}
        assert data.skipped[DEGENERATE] == 2  # two zero-width boxes in the subset
        assert all(im.path is not None and im.path.is_file() for im in data.images)
    assert boxes_by_key(xml) == boxes_by_key(coco)
    only = load_dataset([bccd_subset["cvat"]], labels=["Platelets", "WBC"], cache_dir=tmp_path)
    assert only.skipped[NOT_SELECTED] == 176 and only.skipped[UNSELECTED] == 1  # RBCs only: 00228


def test_synthetic_box_export_both_formats_agree(synth_exports, tmp_path):
    xml = load_dataset([synth_exports["cvat"]], cache_dir=tmp_path)
    coco = load_dataset([synth_exports["coco"]], cache_dir=tmp_path)
    assert boxes_by_key(xml) == boxes_by_key(coco)
    assert len(xml.images) == 16 and xml.skipped[UNANNOTATED] == 2
    assert {s.kind for im in xml.images for s in im.shapes} == {"rectangle"}


def test_unpacked_folder_reads_like_the_zip(tmp_path):
    from trainer.data.synth import generate

    zipped = generate(tmp_path / "z", train=3, val=1, empty=0, size=(96, 96))
    folder = generate(tmp_path / "f", train=3, val=1, empty=0, size=(96, 96), zipped=False)
    for fmt in ("cvat", "coco"):
        a = load_dataset([zipped[fmt]], cache_dir=tmp_path / "cache")
        b = load_dataset([folder[fmt]])
        assert boxes_by_key(a) == boxes_by_key(b)
        assert all(im.path.is_relative_to(folder[fmt]) for im in b.images)


def test_mixed_shapes_become_objects_and_non_objects_are_counted(synth_mixed_exports, tmp_path):
    xml = load_dataset([synth_mixed_exports["cvat"]], cache_dir=tmp_path)
    coco = load_dataset([synth_mixed_exports["coco"]], cache_dir=tmp_path)
    kinds = Counter(s.kind for im in xml.images for s in im.shapes)
    assert set(kinds) == {"rectangle", "polygon", "mask", "ellipse"}
    # one points shape and one tag per annotated image: skipped, counted per kind
    assert xml.skipped["points"] == xml.skipped["tag"] == 12
    assert xml.notes["rotated box (trained on its envelope)"] >= 1
    assert xml.notes["grouped shapes merged into one object"] >= 1
    # CVAT's COCO export turns masks and ellipses into iscrowd RLE: still ordinary objects
    assert xml.summary()["objects_per_label"] == coco.summary()["objects_per_label"]
    assert {s.kind for im in coco.images for s in im.shapes} == {"rectangle", "polygon", "mask"}
    for a, b in zip(xml.images, coco.images, strict=True):
        assert a.key == b.key
        for sa, sb in zip(sorted(a.shapes, key=_pos), sorted(b.shapes, key=_pos), strict=True):
            assert sa.label == sb.label
            ma, mb = sa.to_mask(a.width, a.height), sb.to_mask(b.width, b.height)
            assert (ma & mb).sum() / (ma | mb).sum() > 0.8


def _pos(shape):
    return (round(shape.box[0] / 4), round(shape.box[1] / 4))


def test_labels_option_keeps_only_those_in_export_order(bccd_dir, tmp_path):
    data = load_dataset(
        [bccd_dir / "bccd_cvat11.zip"], labels=["Platelets", "WBC"], cache_dir=tmp_path
    )
    assert data.labels == ["WBC", "Platelets"]
    assert data.summary()["objects_per_label"] == {"WBC": 301, "Platelets": 292}
    assert data.skipped[NOT_SELECTED] == 3348
    assert data.skipped[UNSELECTED] == 1  # one image has only RBCs


def test_unknown_label_is_refused_listing_the_known_ones(bccd_dir, tmp_path):
    with pytest.raises(UserError, match=r"'Neutrophil'.*known labels: RBC, WBC, Platelets"):
        load_dataset([bccd_dir / "bccd_coco10.zip"], labels=["Neutrophil"], cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown label 'rbc'"):
        load_dataset([bccd_dir / "bccd_coco10.zip"], merge={"cell": ["rbc"]}, cache_dir=tmp_path)


def test_merge_renames_labels_into_one(bccd_dir, tmp_path):
    data = load_dataset(
        [bccd_dir / "bccd_coco10.zip"], merge={"cell": ["RBC", "WBC"]}, cache_dir=tmp_path
    )
    assert data.labels == ["cell", "Platelets"]
    assert data.summary()["objects_per_label"] == {"cell": 3348 + 301, "Platelets": 292}


def test_several_sources_merge_labels_in_first_seen_order(bccd_dir, synth_exports, tmp_path):
    data = load_dataset([bccd_dir / "bccd_cvat11.zip", synth_exports["coco"]], cache_dir=tmp_path)
    assert data.labels == ["RBC", "WBC", "Platelets", "circle", "square", "triangle"]
    assert len(data.images) == 292 + 16
    assert data.sources == [str(bccd_dir / "bccd_cvat11.zip"), str(synth_exports["coco"])]


def test_the_same_image_in_two_sources_is_refused(synth_exports, tmp_path):
    with pytest.raises(UserError, match=r"Train/synth_00001.jpg appears in both .*cvat11.*coco10"):
        load_dataset([synth_exports["cvat"], synth_exports["coco"]], cache_dir=tmp_path)


def test_keep_empty_keeps_unannotated_images(synth_exports, tmp_path):
    data = load_dataset([synth_exports["cvat"]], keep_empty=True, cache_dir=tmp_path)
    assert len(data.images) == 18 and sum(1 for im in data.images if not im.shapes) == 2
    assert UNANNOTATED not in data.skipped


def test_nothing_left_after_filtering_is_an_error(cvat_export):
    root = cvat_export(
        '<image id="0" name="x.png" subset="Train" width="8" height="8"></image>',
        files={"Train/x.png": (8, 8)},
    )
    with pytest.raises(UserError, match=r"no images with objects left.*unannotated image: 1"):
        load_dataset([root])


def test_zip_is_extracted_once_and_again_when_it_changes(synth_exports, tmp_path):
    import os
    import shutil

    source = tmp_path / "copy.zip"
    shutil.copy(synth_exports["cvat"], source)
    cache = tmp_path / "cache"
    first = load_dataset([source], cache_dir=cache).images[0].path
    stamp = first.stat().st_mtime_ns
    assert load_dataset([source], cache_dir=cache).images[0].path.stat().st_mtime_ns == stamp
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    load_dataset([source], cache_dir=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_wrapped_zip_and_bare_annotation_file_are_read(synth_exports, tmp_path):
    import zipfile

    wrapped = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(synth_exports["cvat"]) as src, zipfile.ZipFile(wrapped, "w") as dst:
        for info in src.infolist():
            dst.writestr("my export/" + info.filename, src.read(info))
    data = load_dataset([wrapped], cache_dir=tmp_path / "cache")
    assert len(data.images) == 16 and data.images[0].path.is_file()
    folder = next((tmp_path / "cache").glob("wrapped-*")) / "my export"
    bare = load_dataset([folder / "annotations.xml"])
    assert boxes_by_key(bare) == boxes_by_key(data)
