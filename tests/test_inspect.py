"""`inspect` reports what training would see, as a table or as JSON."""

from __future__ import annotations

import json

from trainer.commands import main


def test_json_summary_of_bccd(bccd_dir, capsys):
    assert main(["inspect", str(bccd_dir / "bccd_coco10.zip"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"images", "images_with_objects", "objects", "labels", "objects_per_label", "subsets",
            "skipped", "notes", "sources", "split"} <= set(summary)  # fmt: skip
    assert summary["images"] == 292 and summary["objects"] == 3941
    assert summary["objects_per_label"] == {"RBC": 3348, "WBC": 301, "Platelets": 292}
    assert summary["subsets"] == {"Train": 205, "Validation": 87}
    assert summary["split"] == {"train": 205, "val": 87, "test": 0}


def test_table_lists_subsets_labels_and_skips(synth_mixed_exports, capsys):
    assert main(["inspect", str(synth_mixed_exports["cvat"]), "--labels", "circle,square"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("images: ")
    for text in ("Train", "Validation", "circle", "square", "points", "tag",
                 "object of an unselected label", "rotated box"):  # fmt: skip
        assert text in out
    assert "triangle " not in out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.zip")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.zip: no such file" in err
    assert err.count("\n") == 1
