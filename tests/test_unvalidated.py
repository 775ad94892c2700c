"""Pre-annotations stay out of training until a person validated them; server runs say where and
when their annotations were read."""

from __future__ import annotations

import json

from tests.factories import write_task_export
from trainer.commands import main
from trainer.cvat import server as cvat_server
from trainer.data.options import DataOptions, load_from_args, split_options

NV = {2: "cell_NV", 3: "cell_NV"}  # frames predict --nv wrote and nobody validated yet


def load(*sources, **options):
    return load_from_args(DataOptions(data=[str(s) for s in sources], **options))


def test_unvalidated_shapes_and_their_images_are_left_out_and_counted(tmp_path):
    data = load(write_task_export(tmp_path / "e", range(6), labels=NV))
    assert data.labels == ["cell"]
    assert sorted(im.name for im in data.images) == [f"img_00{i}.png" for i in (0, 1, 4, 5)]
    assert data.skipped["unvalidated pre-annotation (label suffix _NV)"] == 2
    assert data.skipped["image still holding unvalidated pre-annotations"] == 2


def test_an_image_with_any_unvalidated_shape_is_left_out_whole(cvat_export):
    boxes = "".join(
        f'<box label="{name}" source="manual" occluded="0" xtl="{x}" ytl="2" xbr="{x + 5}" ybr="8" '
        'z_order="0"></box>' for name, x in (("a", 1), ("a_NV", 10))
    )
    xml = (f'<image id="0" name="x.png" subset="Train" task_id="1" width="20" height="10">{boxes}</image>'
           '<image id="1" name="y.png" subset="Train" task_id="1" width="20" height="10">'
           f'{boxes.split("</box>")[0]}</box></image>')
    root = cvat_export(xml, labels=("a", "a_NV"), files={"Train/x.png": (20, 10), "Train/y.png": (20, 10)})
    data = load(root)
    assert [im.name for im in data.images] == ["y.png"]  # x.png's validation is unfinished


def test_included_they_count_as_their_validated_label(tmp_path):
    export = write_task_export(tmp_path / "e", range(6), labels=NV)
    data = load(export, include_unvalidated=True)
    assert data.labels == ["cell"] and len(data.images) == 6
    assert {s.label for im in data.images for s in im.shapes} == {"cell"}
    merged = load(export, include_unvalidated=True, merge_label=[("thing", ["cell"])])
    assert merged.labels == ["thing"] and len(merged.images) == 6


def test_the_suffix_is_an_option_and_is_recorded(tmp_path):
    export = write_task_export(tmp_path / "e", range(4), labels={1: "cell_pre"})
    assert load(export).labels == ["cell", "cell_pre"]  # not the default suffix: a label like any
    options = DataOptions(data=[str(export)], unvalidated_suffix="_pre")
    assert load_from_args(options).labels == ["cell"]
    recorded = split_options(options, seed=3).to_dict()
    assert recorded["unvalidated_suffix"] == "_pre" and recorded["include_unvalidated"] is False


def test_inspect_says_how_many_were_left_out(tmp_path, capsys):
    assert main(["inspect", str(write_task_export(tmp_path / "e", range(6), labels=NV))]) == 0
    out = capsys.readouterr().out
    assert "left out 2 unvalidated pre-annotation(s) (labels ending in _NV) and the 2 image(s)" in out


def test_a_server_source_is_recorded_without_credentials(monkeypatch, tmp_path):
    export = write_task_export(tmp_path / "e", range(3))
    monkeypatch.setattr(cvat_server, "connect", lambda url: "client")
    monkeypatch.setattr(cvat_server, "download_exports", lambda client, **kw: [export])
    url = "https://ann:secret@cvat.example.com:8443/?token=abc"
    data = load_from_args(DataOptions(server=url, project=4))
    server = data.summary()["server"]
    assert server["url"] == "https://cvat.example.com:8443/"
    assert (server["project"], server["tasks"], server["exports"]) == (4, None, ["e"])
    assert server["read_at"].startswith("20") and server["read_at"].endswith("+00:00")
    assert "secret" not in json.dumps(data.summary()) and "abc" not in json.dumps(data.summary())
