"""Data options shared by the commands, and server downloads through a fake cvat-sdk client."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
from cvat_sdk.api_client.exceptions import NotFoundException

from serverless.errors import UserError
from trainer.commands import add_options, read_options
from trainer.cvat import server as cvat_server
from trainer.data.options import DataOptions, load_from_args, split_from_args


def parse(*argv: str) -> DataOptions:
    parser = argparse.ArgumentParser()
    add_options(parser, DataOptions, "data")
    return read_options(DataOptions, parser.parse_args(list(argv)))


def test_options_parse_into_what_load_dataset_takes():
    args = parse("a.zip", "b", "--labels", "RBC, WBC", "--merge-label", "cell=RBC,WBC",
                 "--merge-label", "cell=Platelets", "--subset-map", "batch 2=train",
                 "--tasks", "15,16", "--keep-empty", "--skip-missing")  # fmt: skip
    assert args.data == ["a.zip", "b"] and args.labels == ["RBC", "WBC"]
    assert args.merge_label == [("cell", ["RBC", "WBC"]), ("cell", ["Platelets"])]
    assert args.subset_map == [("batch 2", "train")] and args.tasks == [15, 16]
    assert args.keep_empty and args.skip_missing and args.val_fraction == 0.2


@pytest.mark.parametrize(
    "argv", [["--merge-label", "cell"], ["--subset-map", "b=holdout"], ["--tasks", "x"]]
)
def test_malformed_options_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "expected" in capsys.readouterr().err


def test_load_and_split_from_args(bccd_dir):
    args = parse(str(bccd_dir / "bccd_cvat11.zip"), "--merge-label", "cell=RBC,WBC")
    data = load_from_args(args)
    assert data.labels == ["cell", "Platelets"]
    assert {k: len(v) for k, v in split_from_args(args, data).items()} == {
        "train": 205, "val": 87, "test": 0}  # fmt: skip


def test_no_data_and_server_only_options_are_errors():
    with pytest.raises(UserError, match="no data given"):
        load_from_args(parse())
    with pytest.raises(UserError, match="--project and --tasks need --server"):
        load_from_args(parse("--project", "3"))


def test_annotations_only_export_is_refused_for_training(tmp_path):
    (tmp_path / "annotations.xml").write_text(
        "<annotations><meta><project><labels><label><name>a</name></label></labels></project>"
        '</meta><image id="0" name="x.jpg" subset="Train" width="9" height="9">'
        '<box label="a" xtl="1" ytl="1" xbr="5" ybr="5"/></image></annotations>'
    )
    assert load_from_args(parse(str(tmp_path)), require_images=False).images[0].path is None
    with pytest.raises(UserError, match="1 images have no image file"):
        load_from_args(parse(str(tmp_path)))


# ---------------------------------------------------------------- server (fake cvat-sdk client)


class FakeEntity:
    def __init__(self, export_bytes: bytes, updated: str):
        self.updated_date, self.export_bytes, self.exports = updated, export_bytes, []

    def export_dataset(self, format_name, filename, *, include_images, location):
        self.exports.append((format_name, include_images, str(location)))
        with open(filename, "wb") as fh:
            fh.write(self.export_bytes)


class FakeRepo:
    def __init__(self, entities):
        self.entities = entities

    def retrieve(self, obj_id):
        if obj_id not in self.entities:
            raise NotFoundException(status=404, reason="Not Found")
        return self.entities[obj_id]


def fake_client(export_bytes: bytes) -> SimpleNamespace:
    return SimpleNamespace(
        api_map=SimpleNamespace(host="https://cvat.example.com"),
        projects=FakeRepo({4: FakeEntity(export_bytes, "2024-05-01 10:00:00+00:00")}),
        tasks=FakeRepo({15: FakeEntity(export_bytes, "2024-05-02 11:00:00+00:00")}),
    )


def test_download_exports_with_images_and_reuses_unchanged_ones(synth_exports, tmp_path):
    client = fake_client(synth_exports["cvat"].read_bytes())
    paths = cvat_server.download_exports(client, project=4, tasks=[15], cache_dir=tmp_path)
    project, task = client.projects.entities[4], client.tasks.entities[15]
    assert project.exports == [("CVAT for images 1.1", True, "local")]
    assert len(task.exports) == 1 and [p.read_bytes() for p in paths] == [
        synth_exports["cvat"].read_bytes()] * 2  # fmt: skip
    again = cvat_server.download_exports(client, project=4, cache_dir=tmp_path)
    assert again == paths[:1] and len(project.exports) == 1  # unchanged: not exported again
    project.updated_date = "2024-06-01 09:00:00+00:00"
    newer = cvat_server.download_exports(client, project=4, cache_dir=tmp_path)
    assert newer != paths[:1] and len(project.exports) == 2
    assert not paths[0].exists()  # the outdated export is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([newer[0].name, paths[1].name])


def test_failed_or_unknown_downloads_are_clear_errors(tmp_path):
    client = fake_client(b"")
    with pytest.raises(UserError, match="cannot read project 99"):
        cvat_server.download_exports(client, project=99, cache_dir=tmp_path)

    def fail(*_args, **_kwargs):
        raise ConnectionError("connection reset")

    client.tasks.entities[15].export_dataset = fail
    with pytest.raises(UserError, match=r"exporting task 15 .* failed"):
        cvat_server.download_exports(client, tasks=[15], cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(UserError, match="needs --project"):
        cvat_server.download_exports(client, cache_dir=tmp_path)


def test_connect_takes_credentials_from_the_environment_only(monkeypatch, tmp_path):
    import cvat_sdk

    calls = []
    monkeypatch.setattr(cvat_sdk, "make_client", lambda url, **kw: calls.append((url, kw)) or "c")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no saved cvat-sdk profiles
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CVAT_ACCESS_TOKEN", "CVAT_USER", "CVAT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="no CVAT credentials; set CVAT_ACCESS_TOKEN"):
        cvat_server.connect("https://cvat.example.com")
    monkeypatch.setenv("CVAT_USER", "ann")
    monkeypatch.setenv("CVAT_PASSWORD", "secret")
    assert cvat_server.connect("https://cvat.example.com") == "c"
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "pat")
    cvat_server.connect("https://cvat.example.com")
    assert calls == [
        ("https://cvat.example.com", {"credentials": ("ann", "secret")}),
        ("https://cvat.example.com", {"access_token": "pat"}),
    ]


def test_server_sources_are_downloaded_then_read(monkeypatch, synth_exports, tmp_path):
    seen = {}

    def download(client, *, project, tasks, cache_dir):
        seen.update(client=client, project=project, tasks=tasks)
        return [synth_exports["cvat"]]

    monkeypatch.setattr(cvat_server, "connect", lambda url: f"client of {url}")
    monkeypatch.setattr(cvat_server, "download_exports", download)
    data = load_from_args(parse("--server", "https://cvat.example.com", "--project", "4"))
    assert seen == {"client": "client of https://cvat.example.com", "project": 4, "tasks": None}
    assert data.sources == [str(synth_exports["cvat"])]
