"""Scores that survive in CVAT: the score attribute on every path into CVAT.

The truth each test is held to is CVAT's own code, cited where it is used:

- CVAT's lambda manager (cvat/apps/lambda_manager/views.py, ``LambdaFunction.invoke``) keeps an
  attribute a detector returns only when the function's spec declares it on the label and the
  task label has an attribute of that name; ``check_attr_value`` then judges the value by the
  TASK attribute's type: number -> ``value.isnumeric()``, text -> anything, checkbox -> "true" or
  "false", select/radio -> one of its values. :func:`cvat_keeps` is that function.
- cvat-sdk's ``cvat_sdk.attributes.attribute_value_validator`` (what ``cvat-cli`` and our upload
  validate with) and its auto-annotation driver (exact spec match, ``--allow-unmatched-labels``).
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace
from typing import Any

import nuclio_sdk
import numpy as np
import PIL.Image
import pytest
import yaml
from cvat_sdk import models
from cvat_sdk.attributes import attribute_value_validator
from cvat_sdk.auto_annotation import BadFunctionError
from nuclio_sdk.test import Platform

from serverless import main
from serverless.score_attribute import FORMAT_ENV, NAME_ENV, score_text
from tests.conftest import module_dir
from tests.factories import make_bundle
from tests.test_sdk_function import BrightObjects, frame_files, run_annotate_task
from tests.test_upload import FakeClient, FakeTask
from trainer.commands import main as cli
from trainer.cvat.sdk_function import create
from trainer.cvat.upload import UploadOptions, report_lines, upload_predictions

LABELS = ["cell", "debris"]


def cvat_keeps(value: str, task_attribute: dict[str, Any]) -> bool:
    """CVAT's ``check_attr_value`` (lambda_manager/views.py): may this value be stored?"""
    kind = task_attribute["input_type"]
    if kind == "number":
        return value.isnumeric()
    if kind == "checkbox":
        return value in ("true", "false")
    if kind == "text":
        return True
    return kind in ("select", "radio") and value in task_attribute["values"]


def sdk_attribute(attr_id: int, input_type: str, values: list[str], name: str = "score"):
    return models.Attribute._from_openapi_data(
        id=attr_id, name=name, mutable=False, input_type=input_type, default_value="",
        values=values,
    )  # fmt: skip


def task_label(label_id: int, name: str, *attributes) -> models.Label:
    return models.Label._from_openapi_data(
        id=label_id, name=name, type="any", attributes=list(attributes), sublabels=[],
        has_parent=False,
    )  # fmt: skip


TEXT = {"input_type": "text", "values": [""]}
PERCENT = {"input_type": "number", "values": ["0", "100", "1"]}


@pytest.mark.parametrize(
    ("score", "fmt", "text", "in_text", "in_percent"),
    [
        (0.87345, "decimal", "0.873", True, False),  # the trap: a decimal never fits a number
        (0.87345, "percent", "87", True, True),
        (0.0, "percent", "0", True, True),
        (1.0, "percent", "100", True, True),
        (0.995, "decimal", "0.995", True, False),
    ],
)
def test_score_values_and_where_cvat_keeps_them(score, fmt, text, in_text, in_percent):
    assert score_text(score, fmt) == text
    assert cvat_keeps(text, TEXT) is in_text
    assert cvat_keeps(text, PERCENT) is in_percent
    number = attribute_value_validator(models.AttributeRequest(
        name="score", input_type="number", values=PERCENT["values"], mutable=False))  # fmt: skip
    assert number(text) is in_percent


def test_fractional_number_attribute_cannot_be_validated():
    """The other trap, in cvat-sdk's terms: min/max/step must be integers."""
    with pytest.raises(ValueError, match="integers"):
        attribute_value_validator(sdk_attribute(9, "number", ["0", "1", "0.01"]))


# ---------------------------------------------------------------- packaging


@pytest.fixture(scope="module")
def run_dir(request):
    with module_dir(request, "run") as folder:
        yield make_bundle(folder, LABELS, threshold=0.0, min_size=96, max_size=128)


def _function_yaml(path) -> dict[str, Any]:
    return yaml.safe_load((path / "function.yaml").read_text())


@pytest.mark.parametrize(
    ("flags", "attribute", "env"),
    [
        ([], {"name": "score", "input_type": "text", "values": []}, ("score", "decimal")),
        (["--score-format", "percent", "--score-attribute", "confidence %"],
         {"name": "confidence %", "input_type": "number", "values": ["0", "100", "1"]},
         ("confidence %", "percent")),
        (["--no-score"], None, None),
    ],
)  # fmt: skip
def test_package_declares_the_score_on_every_label(run_dir, tmp_path, flags, attribute, env):
    out = tmp_path / "fn"
    assert cli(["package", str(run_dir), "--out", str(out), "--cpu", *flags]) == 0
    config = _function_yaml(out)
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    assert [item["name"] for item in spec] == LABELS
    for item in spec:
        assert item.get("attributes", []) == ([attribute] if attribute else [])
    settings = {e["name"]: e["value"] for e in config["spec"]["env"]}
    assert settings.get(NAME_ENV) == (env[0] if env else None)
    assert settings.get(FORMAT_ENV) == (env[1] if env else None)
    if attribute:  # the declared attribute is one cvat-sdk can validate values against
        attribute_value_validator(models.AttributeRequest(mutable=False, **attribute))


def test_package_refuses_an_unusable_attribute_name(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["package", str(run_dir), "--out", str(tmp_path / "fn"), "--score-attribute", " score"])
    assert exit_info.value.code == 2
    assert "--score-attribute" in capsys.readouterr().err


# ---------------------------------------------------------------- the Nuclio function


def _shapes(monkeypatch, bundle, **env: str) -> list[dict[str, Any]]:
    """One frame through a fresh worker (init_context reads the environment) as Nuclio calls it."""
    for name, value in {"CVAT_DETECTOR_BUNDLE": str(bundle), **env}.items():
        monkeypatch.setenv(name, value)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    frame = io.BytesIO()
    PIL.Image.fromarray(rgb).save(frame, "PNG")
    body = {"image": base64.b64encode(frame.getvalue()).decode()}
    event = nuclio_sdk.Event(body=body, content_type="application/json")
    response = Platform().call_handler(main.handler, event)
    assert response.status_code == 200
    return json.loads(response.body)


@pytest.mark.parametrize(("fmt", "task_attribute"), [("decimal", TEXT), ("percent", PERCENT)])
def test_function_returns_each_score_as_the_attribute(monkeypatch, run_dir, fmt, task_attribute):
    shapes = _shapes(monkeypatch, run_dir, **{NAME_ENV: "score", FORMAT_ENV: fmt})
    assert shapes  # an untrained network at threshold 0 returns boxes
    for shape in shapes:
        [attribute] = shape["attributes"]
        assert attribute["name"] == "score" and isinstance(attribute["value"], str)
        expected = float(shape["confidence"]) * (100 if fmt == "percent" else 1)
        assert float(attribute["value"]) == pytest.approx(expected, abs=0.51 if fmt == "percent" else 6e-4)
        assert cvat_keeps(attribute["value"], task_attribute)


def test_function_without_the_setting_returns_no_attributes(monkeypatch, run_dir):
    monkeypatch.delenv(NAME_ENV, raising=False)
    shapes = _shapes(monkeypatch, run_dir)
    assert shapes and all(shape["attributes"] == [] for shape in shapes)


def test_a_bad_score_format_fails_the_worker_start_naming_the_variable(monkeypatch, run_dir):
    with pytest.raises(ValueError, match=FORMAT_ENV):
        _shapes(monkeypatch, run_dir, **{NAME_ENV: "score", FORMAT_ENV: "fraction"})


# ---------------------------------------------------------------- predict --server


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from serverless.detector import Detector
    from tests.test_upload import BrightObjects as Stand_in

    bundle = make_bundle(tmp_path_factory.mktemp("bundle"), LABELS, threshold=0.2)
    detector = Detector(bundle, "cpu")
    detector.model = Stand_in()  # cell 0.9, debris 0.3
    return detector


def _sent_attributes(task: FakeTask) -> list[tuple[int, list[tuple[int, str]]]]:
    updates = [c for c in task.calls if c[0] == "update_annotations"]
    return [
        (s.label_id, [(a.spec_id, a.value) for a in s.attributes])
        for _, data, _ in updates
        for s in data.shapes
    ]


def test_upload_writes_scores_by_the_task_attribute_id_in_its_type(detector):
    labels = [
        task_label(1, "cell", sdk_attribute(41, "number", ["0", "100", "1"])),
        task_label(2, "debris", sdk_attribute(42, "text", [""])),
    ]
    task = FakeTask(15, labels)
    [report] = upload_predictions(FakeClient([task]), detector, [task], UploadOptions())
    sent = _sent_attributes(task)
    assert sent[:2] == [(1, [(41, "90")]), (2, [(42, "0.300")])]
    assert len(sent) == 6 and report.scores == 6 and report.score_notes == []
    assert "  scores kept in 6 shape(s)" in report_lines(report, dry_run=False)


def test_unsuitable_values_are_never_sent_and_shapes_still_are(detector):
    labels = [
        task_label(1, "cell", sdk_attribute(41, "number", ["0", "50", "1"])),  # 90 is out of range
        task_label(2, "debris", sdk_attribute(42, "number", ["0", "1", "0.01"])),  # the trap
    ]
    task = FakeTask(15, labels)
    [report] = upload_predictions(FakeClient([task]), detector, [task], UploadOptions())
    assert _sent_attributes(task) == [(1, []), (2, [])] * 3
    notes = " | ".join(report.score_notes)
    assert "'debris' cannot hold scores" in notes and "3 score(s) refused" in notes


def test_a_task_without_the_attribute_gets_its_shapes_as_before(detector):
    task = FakeTask(15, [task_label(1, "cell"), task_label(2, "debris")])
    [report] = upload_predictions(FakeClient([task]), detector, [task], UploadOptions())
    assert _sent_attributes(task) == [(1, []), (2, [])] * 3
    assert "no task label has an attribute 'score'" in report.score_notes[0]


def test_suggestion_tags_leave_a_frame_eligible(detector):
    """A frame whose only annotation is an 'annotate-next' tag still gets pre-annotations."""
    task = FakeTask(15, [task_label(1, "cell"), task_label(2, "debris"),
                         models.Label._from_openapi_data(id=9, name="annotate-next", type="tag",
                                                         attributes=[], sublabels=[], has_parent=False)])
    task.annotations.tags = [SimpleNamespace(frame=1, label_id=9)]
    [report] = upload_predictions(FakeClient([task]), detector, [task], UploadOptions())
    assert sorted({c[1] for c in task.calls if c[0] == "get_frame"}) == [0, 1, 2, 4, 7]
    assert report.skipped == 3  # 3 (shape), 5 and 6 (track)


# ---------------------------------------------------------------- cvat-cli (cvat-sdk driver)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return frame_files(tmp_path_factory.mktemp("frames"))[:1]


def _function(run_dir, **params):
    """What cvat-cli builds from ``-p`` parameters, with the stand-in network."""
    function = create(str(run_dir), device="cpu", **params)
    function.detector.model = BrightObjects(False)  # cell 0.9, debris 0.3
    return function


def test_sdk_function_offers_the_score_as_an_option(monkeypatch, run_dir, frames):
    function = _function(run_dir, score_attribute="score", score_format="percent")
    labels = [task_label(11, "cell", sdk_attribute(71, "number", ["0", "100", "1"])),
              task_label(12, "debris", sdk_attribute(72, "number", ["0", "100", "1"]))]  # fmt: skip
    shapes = run_annotate_task(monkeypatch, function, frames, labels, conf_threshold=0.2)
    assert [(s.label_id, [(a.spec_id, a.value) for a in s.attributes]) for s in shapes] == [
        (11, [(71, "90")]), (12, [(72, "30")])
    ]  # fmt: skip


def test_sdk_driver_needs_allow_unmatched_labels_without_the_attribute(monkeypatch, run_dir, frames):
    function = _function(run_dir, score_attribute="score")
    labels = [task_label(11, "cell"), task_label(12, "debris")]
    with pytest.raises(BadFunctionError, match="not in dataset"):
        run_annotate_task(monkeypatch, function, frames, labels, conf_threshold=0.2)
    shapes = run_annotate_task(
        monkeypatch, function, frames, labels, conf_threshold=0.2, allow_unmatched_labels=True
    )
    assert [(s.label_id, s.attributes) for s in shapes] == [(11, []), (12, [])]


def test_sdk_function_without_the_option_declares_no_attribute(run_dir):
    function = create(str(run_dir), device="cpu")
    assert all(not getattr(label, "attributes", []) for label in function.spec.labels)
