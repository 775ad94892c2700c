"""`python -m trainer package`: the function directory, checked field by field as CVAT's lambda
manager and Nuclio read it, and run as Nuclio runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serverless.bundle import ENGINE_FILES, BundleInfo
from serverless.engine import ENGINE_ENV, load_engine_info
from serverless.errors import UserError
from serverless.precision import PRECISION_ENV
from tests.conftest import module_dir
from tests.factories import make_bundle
from trainer.commands import main
from trainer.deploy import nuclio as package
from trainer.deploy.export import generated_frames
from trainer.deploy.nuclio import function_name, label_spec, package_function

REPO = Path(__file__).resolve().parents[1]
CAPTURES = Path(__file__).parent / "data" / "cvat_captures"  # a copy of ../shared/cvat-captures
LABELS = ["RBC", "WBC", "Platelets"]
#: Python inside the CUDA PyTorch image (pytorch/pytorch 2.5.1 images ship Python 3.11.10).
IMAGE_PYTHON = {"pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime": "3.11"}


def lambda_listing(data: dict[str, Any]) -> dict[str, Any]:
    """What CVAT's lambda manager (cvat/apps/lambda_manager/views.py, LambdaFunction) makes of a
    Nuclio function, in the shape of CVAT's own listing (cvat-captures/...listing.json)."""
    annotations = data["metadata"]["annotations"]
    spec = json.loads(annotations.get("spec") or "[]")
    names = [item["name"] for item in spec]
    assert len(names) == len(set(names)), "non-unique labels: CVAT refuses the function"
    for item in spec:
        attributes = [a["name"] for a in item.get("attributes", [])]
        assert len(attributes) == len(set(attributes))
    return {
        "id": data["metadata"]["name"],
        "kind": annotations.get("type"),
        "labels_v2": [
            {"name": i["name"], "type": i.get("type"), "attributes": i.get("attributes", [])}
            for i in spec
        ],
        "description": data["spec"]["description"],  # a KeyError here breaks CVAT's model list
        "name": annotations.get("name", data["metadata"]["name"]),
        "version": int(annotations.get("version", "1")),
    }


def check_function_config(
    config: dict[str, Any], labels: list[str], shape: str, gpu: bool, engine: str = "pytorch"
) -> None:
    """Every field CVAT and Nuclio rely on, as docs/design.md's contract states it."""
    meta = config["metadata"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", meta["name"]) and len(meta["name"]) <= 56
    annotations = meta["annotations"]
    assert annotations["type"] == "detector" and annotations["framework"] == "pytorch"
    assert type(annotations["version"]) is int
    spec = json.loads(annotations["spec"])
    assert [item["id"] for item in spec] == list(range(1, len(labels) + 1))
    assert [item["name"] for item in spec] == labels
    assert {item["type"] for item in spec} == {shape}

    listing = lambda_listing({**config, "status": {"state": "ready"}})
    with open(CAPTURES / "cvat_lambda_functions_listing.json", encoding="utf-8") as f:
        captured = json.load(f)[0]
    assert set(listing) == set(captured) and listing["kind"] == "detector"
    assert set(listing["labels_v2"][0]) == set(captured["labels_v2"][0])
    assert listing["description"].strip()

    spec_ = config["spec"]
    assert spec_["handler"] == "main:handler"
    assert re.fullmatch(r"[1-9]\d*s", spec_["eventTimeout"])
    assert {"name": "CVAT_DETECTOR_BUNDLE", "value": "/opt/nuclio/bundle"} in spec_["env"]
    build = spec_["build"]
    base = build["baseImage"]
    python = IMAGE_PYTHON.get(base) or re.fullmatch(r"python:(\d+\.\d+)(-.*)?", base).group(1)
    assert spec_["runtime"] == f"python:{python}"
    assert re.fullmatch(r"[a-z0-9][a-z0-9._/-]*", build["image"])
    commands = " ".join(d["value"] for d in build["directives"]["preCopy"] if d["kind"] == "RUN")
    for requirement in ("nuclio-sdk", "Pillow", "PyYAML"):
        assert requirement in commands
    assert ("torch==" in commands) == (not gpu and engine == "pytorch")  # the CUDA image has torch
    assert ("openvino==" in commands) == (engine == "openvino")
    assert ({"name": ENGINE_ENV, "value": "openvino"} in spec_["env"]) == (engine == "openvino")

    trigger = spec_["triggers"]["myHttpTrigger"]
    assert trigger["kind"] == "http" and trigger["maxWorkers"] == 1
    assert trigger["workerAvailabilityTimeoutMilliseconds"] > 0
    assert trigger["attributes"]["maxRequestBodySize"] >= 32 * 1024 * 1024
    limits = spec_.get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (1 if gpu else None)
    platform = spec_["platform"]["attributes"]
    assert platform["restartPolicy"] == {"name": "always", "maximumRetryCount": 3}
    assert platform["mountMode"] == "volume"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run_dir(shared_bundle) -> Path:
    return shared_bundle(LABELS, name="bccd-v2", min_size=96, max_size=128)


@pytest.fixture(scope="module")
def cpu_run(request) -> Iterator[Path]:
    """A run whose OpenVINO export verifies on FRAMES: scores that differ (make_bundle's
    feature_gain), so that the 50-detection cap does not choose among ties."""
    with module_dir(request, "runs") as folder:
        yield make_bundle(folder / "bccd-cpu", LABELS, min_size=128, max_size=192, threshold=0.05,
                          detections_per_img=50, feature_gain=1e8)  # fmt: skip


#: Small verification frames, one of a size at which float32 resize arithmetic is off.
FRAMES = generated_frames(((160, 120), (301, 100), (90, 160)), seed=1)


def test_top_level_template_is_the_packaged_one():
    assert (REPO / "function.yaml").read_bytes() == (
        REPO / "serverless" / "function.yaml"
    ).read_bytes()
    assert package.template_text() == (REPO / "function.yaml").read_text(encoding="utf-8")


def test_template_itself_describes_a_deployable_function():
    check_function_config(_load(REPO / "function.yaml"), ["object"], "rectangle", gpu=True)


def test_packaged_gpu_function_is_what_cvat_reads(run_dir, tmp_path):
    done = package_function(run_dir, tmp_path / "fn")
    config = _load(tmp_path / "fn" / "function.yaml")
    check_function_config(config, LABELS, "rectangle", gpu=True)
    assert done.name == config["metadata"]["name"] == "bccd-v2"
    assert config["metadata"]["annotations"]["name"] == "bccd-v2"
    assert "fasterrcnn_mobilenet_v3_large_fpn" in config["spec"]["description"]
    assert sorted(p.name for p in (tmp_path / "fn" / "bundle").iterdir()) == [
        "labels.txt", "model.json", "weights.pt",
    ]  # fmt: skip
    assert (tmp_path / "fn" / "bundle" / "labels.txt").read_text().split() == LABELS
    runtime = {p.name for p in (tmp_path / "fn" / "serverless").iterdir()}
    assert {"main.py", "detector.py", "cvat_shapes.py", "mask_polygon.py", "imageio.py"} <= runtime
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


def test_cpu_function_is_served_by_its_verified_openvino_export_without_torch(cpu_run, tmp_path):
    done = package_function(cpu_run, tmp_path / "fn", name="BCCD cells (CPU)", cpu=True, frames=FRAMES)
    config = _load(tmp_path / "fn" / "function.yaml")
    check_function_config(config, LABELS, "rectangle", gpu=False, engine="openvino")
    assert done.engine == "openvino" and done.note is None
    assert config["metadata"]["name"] == "bccd-cells-cpu"
    assert config["metadata"]["annotations"]["name"] == "BCCD cells (CPU)"
    assert sorted(p.name for p in (tmp_path / "fn" / "bundle").iterdir()) == sorted(
        ["labels.txt", "model.json", *ENGINE_FILES]
    )  # the weights stay behind: nothing in the image reads them


def test_cpu_function_of_an_unfaithful_export_is_served_by_pytorch(run_dir, tmp_path, monkeypatch):
    from trainer.deploy import export

    def unfaithful(run: Path, frames: Any) -> None:
        raise export.EngineUnfaithful("fasterrcnn_mobilenet_v3_large_fpn: the OpenVINO export differs")

    monkeypatch.setattr(export, "ensure_engine", unfaithful)
    done = package_function(run_dir, tmp_path / "fn", cpu=True)
    check_function_config(_load(tmp_path / "fn" / "function.yaml"), LABELS, "rectangle", gpu=False)
    assert done.engine == "pytorch" and "export differs" in done.note and "PyTorch" in done.note
    assert (tmp_path / "fn" / "bundle" / "weights.pt").is_file()
    package_function(run_dir, tmp_path / "torch", cpu=True, engine="pytorch")
    check_function_config(_load(tmp_path / "torch" / "function.yaml"), LABELS, "rectangle", gpu=False)
    with pytest.raises(UserError, match="--cpu"):
        package_function(run_dir, tmp_path / "gpu", engine="openvino")


def test_a_bf16_cpu_function_computes_in_bf16_only_where_that_keeps_the_detections(cpu_run, tmp_path,
                                                                                    monkeypatch):
    from trainer.deploy import export

    run = shutil.copytree(cpu_run, tmp_path / "run")
    bf16_env = {"name": PRECISION_ENV, "value": "bf16"}
    done = package_function(run, tmp_path / "measured", cpu=True, frames=FRAMES, engine_precision="bf16")
    record = load_engine_info(run).verification["bf16"]  # measured on this CPU
    assert record["frames"] == [name for name, _ in FRAMES]
    assert done.engine_precision == ("bf16" if record["same"] else "f32")
    assert (bf16_env in _load(done.out / "function.yaml")["spec"]["env"]) == record["same"]

    monkeypatch.setattr(export, "verify", lambda *args: export.Agreement(frames=3, reference=5))
    kept = package_function(run, tmp_path / "kept", cpu=True, frames=FRAMES, engine_precision="bf16")
    assert kept.engine_precision == "bf16" and kept.note is None
    config = _load(kept.out / "function.yaml")
    check_function_config(config, LABELS, "rectangle", gpu=False, engine="openvino")
    assert bf16_env in config["spec"]["env"]
    assert len(_serve_captured_request(kept.out, block_torch=True)) > 0  # as Nuclio loads it, in bf16

    monkeypatch.setattr(export, "verify", lambda *args: export.Agreement(frames=3, reference=5, extra=1))
    changed = package_function(run, tmp_path / "changed", cpu=True, frames=FRAMES, engine_precision="bf16")
    assert changed.engine_precision == "f32" and "0 missing, 1 extra" in changed.note
    assert bf16_env not in _load(changed.out / "function.yaml")["spec"]["env"]
    with pytest.raises(UserError, match="add --cpu"):
        package_function(run, tmp_path / "gpu", engine_precision="bf16")
    torch_served = package_function(run, tmp_path / "torch", cpu=True, engine="pytorch",
                                    engine_precision="bf16")
    assert torch_served.engine_precision == "f32" and "PyTorch serves this one in fp32" in torch_served.note


def test_a_cpu_function_computes_in_bf16x3_only_where_its_check_found_it_faithful_and_faster(
    cpu_run, tmp_path, monkeypatch
):
    from serverless import bf16x3
    from trainer.deploy import export

    run = shutil.copytree(cpu_run, tmp_path / "run")
    off = {"name": PRECISION_ENV, "value": "off"}
    done = package_function(run, tmp_path / "measured", cpu=True, frames=FRAMES)  # --engine-precision auto
    record = load_engine_info(run).verification.get("bf16x3")  # measured where this CPU has AMX
    if bf16x3.cpu_has_amx():
        assert record["frames"] == [name for name, _ in FRAMES] and record["agreement"]["missing"] == 0
        assert record["chosen"] == (record["same"] and record["ms"]["bf16x3"] < record["ms"]["f32"])
    assert done.engine_precision == ("bf16x3" if record and record["chosen"] else "f32")
    assert (off in _load(done.out / "function.yaml")["spec"]["env"]) == (done.engine_precision == "f32")

    monkeypatch.setattr(bf16x3, "cpu_has_amx", lambda: True)
    timed = {"bf16x3": 50.0, "f32": 90.0}  # ms a frame
    monkeypatch.setattr(export, "_best_ms", lambda network, *args: timed[network.precision])
    faster = package_function(run, tmp_path / "faster", cpu=True, frames=FRAMES)
    assert faster.engine_precision == "bf16x3" and faster.note is None
    record = load_engine_info(faster.out / "bundle").verification["bf16x3"]
    assert record["same"] and record["chosen"] and record["ms"] == {"f32": 90.0, "bf16x3": 50.0}
    config = _load(faster.out / "function.yaml")
    check_function_config(config, LABELS, "rectangle", gpu=False, engine="openvino")
    assert not any(item["name"] == PRECISION_ENV for item in config["spec"]["env"])  # auto: bf16x3 with AMX
    assert len(_serve_captured_request(faster.out, block_torch=True)) > 0

    monkeypatch.setattr(export, "verify", lambda *args: export.Agreement(frames=3, reference=5, extra=1))
    changed = package_function(run, tmp_path / "changed", cpu=True, frames=FRAMES)
    assert changed.engine_precision == "f32" and off in _load(changed.out / "function.yaml")["spec"]["env"]
    pinned = package_function(run, tmp_path / "pinned", cpu=True, frames=FRAMES, engine_precision="f32")
    assert pinned.engine_precision == "f32" and off in _load(pinned.out / "function.yaml")["spec"]["env"]


def test_mask_bundles_declare_mask_labels():
    info = BundleInfo(
        architecture="maskrcnn_resnet50_fpn_v2", labels=["cell", "nucleus"], shape_type="mask"
    )
    assert json.loads(label_spec(info)) == [
        {"id": 1, "name": "cell", "type": "mask"},
        {"id": 2, "name": "nucleus", "type": "mask"},
    ]
    info.shape_type = "polygon"
    with pytest.raises(UserError, match="shape_type"):
        label_spec(info)


@pytest.mark.parametrize(
    "text, name",
    [
        ("bccd", "bccd"),
        ("BCCD cells (v2)!", "bccd-cells-v2"),
        ("2024_run.final", "detector-2024-run-final"),
        ("Zellkerne: größer", "zellkerne-gr-er"),
        ("x" * 80, "x" * 56),
    ],
)
def test_function_names_are_valid_nuclio_and_kubernetes_names(text, name):
    assert function_name(text) == name


def test_a_name_without_letters_or_digits_is_refused():
    with pytest.raises(UserError, match="--name"):
        function_name("!!! ???")


def _serve_captured_request(fn: Path, block_torch: bool = False) -> list[dict[str, Any]]:
    """Import main.py from the function directory ``fn``, not the repository, with the default
    bundle path, and answer the captured CVAT request through nuclio-sdk's Platform."""
    script = f"""
import json, sys
if {block_torch}:
    sys.modules["torch"] = None  # the OpenVINO function's image has no torch
import nuclio_sdk
from nuclio_sdk.test import Platform
import main, serverless
assert serverless.__file__.startswith({str(fn)!r}), serverless.__file__
body = json.loads(open({str(CAPTURES / "interactive_request_body.json")!r}, "rb").read())
body["threshold"] = 0.0
event = nuclio_sdk.Event(body=body, content_type="application/json")
response = Platform().call_handler(main.handler, event)
print("RESULT", response.status_code, response.body)
bad = nuclio_sdk.Event(body={{"image": body["image"], "threshold": 2}}, content_type="application/json")
response = Platform().call_handler(main.handler, bad)
print("BAD", response.status_code, response.body)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("CVAT_DETECTOR_BUNDLE", "PYTHONPATH")}
    for item in _load(fn / "function.yaml")["spec"]["env"]:  # as Nuclio sets them, but the bundle path
        if item["name"] != "CVAT_DETECTOR_BUNDLE":
            env[item["name"]] = item["value"]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=fn, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "/opt/nuclio/bundle" not in done.stdout and str(fn / "bundle") in done.stdout
    status, body = re.search(r"^RESULT (\d+) (.*)$", done.stdout, re.M).groups()
    assert status == "200", body
    bad = re.search(r"^BAD (\d+) (.*)$", done.stdout, re.M).groups()  # CVAT shows this JSON's error
    assert bad[0] == "400" and json.loads(bad[1])["error"].startswith("threshold: expected a number")
    return json.loads(body)


def test_packaged_function_runs_on_its_own_as_nuclio_loads_it(run_dir, tmp_path):
    assert len(_serve_captured_request(package_function(run_dir, tmp_path / "fn").out)) > 0


def test_openvino_function_answers_cvat_as_the_pytorch_function_does(cpu_run, tmp_path):
    expected = _serve_captured_request(package_function(cpu_run, tmp_path / "gpu").out)
    cpu = package_function(cpu_run, tmp_path / "cpu", cpu=True, frames=FRAMES)
    shapes = _serve_captured_request(cpu.out, block_torch=True)
    assert [s["label"] for s in shapes] == [s["label"] for s in expected] and len(shapes) > 0
    for got, want in zip(shapes, expected, strict=True):
        assert got["type"] == want["type"] == "rectangle"
        assert max(abs(a - b) for a, b in zip(got["points"], want["points"], strict=True)) <= 1.0
        assert abs(float(got["confidence"]) - float(want["confidence"])) <= 1e-3


def test_existing_directory_is_refused_then_replaced_whole(run_dir, tmp_path):
    out = tmp_path / "fn"
    package_function(run_dir, out)
    (out / "stale.txt").write_text("from an older package")
    with pytest.raises(UserError, match="--overwrite"):
        package_function(run_dir, out)
    assert (out / "stale.txt").exists()
    package_function(run_dir, out, name="renamed", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert _load(out / "function.yaml")["metadata"]["name"] == "renamed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fn"]


def test_a_failure_while_writing_leaves_nothing_behind(run_dir, tmp_path, monkeypatch):
    def failing(tmp: Path, *args: Any) -> list[str]:
        (tmp / "function.yaml").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(package, "_write_function", failing)
    with pytest.raises(OSError, match="disk full"):
        package_function(run_dir, tmp_path / "fn")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_the_run_and_unloadable_weights(run_dir, tmp_path):
    with pytest.raises(UserError, match="run directory"):
        package_function(run_dir, run_dir, overwrite=True)
    with pytest.raises(UserError, match="run directory"):
        package_function(run_dir, run_dir.parent, overwrite=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_bytes((run_dir / "model.json").read_bytes())
    (broken / "weights.pt").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match=r"weights\.pt"):
        package_function(broken, tmp_path / "fn")
    assert not (tmp_path / "fn").exists()


def test_cli_packages_models_side_by_side_and_prints_the_next_step(run_dir, tmp_path, capsys):
    for name in ("bccd", "bccd-cpu"):
        args = ["package", str(run_dir), "--out", str(tmp_path / name), "--name", name]
        assert main([*args, "--cpu", "--engine", "pytorch"] if name.endswith("cpu") else args) == 0
        out = capsys.readouterr().out
        assert f"Nuclio function '{name}'" in out and str(tmp_path / name / "function.yaml") in out
        assert re.search(rf"next: \S*deploy_gpu\.sh {re.escape(str(tmp_path / name))}$", out, re.M)
    names = {
        _load(tmp_path / n / "function.yaml")["metadata"]["name"] for n in ("bccd", "bccd-cpu")
    }
    assert names == {"bccd", "bccd-cpu"}

    assert main(["package", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.json" in err and not (tmp_path / "x").exists()


def test_the_demo_serves_its_cpu_package_with_the_environment_nuclio_gives_it(cpu_run, tmp_path, monkeypatch,
                                                                               capsys):
    """The demo's handler step calls the function it packaged with --cpu: an OpenVINO bundle
    without weights.pt, which serves only with function.yaml's environment (the engine)."""
    from PIL import Image

    from trainer.commands.demo import _call_handler

    fn = package_function(cpu_run, tmp_path / "cpu", cpu=True, frames=FRAMES).out
    assert not (fn / "bundle" / "weights.pt").exists()
    frame = tmp_path / "frame.jpg"
    Image.effect_noise((160, 120), 60).convert("RGB").save(frame)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    _call_handler(fn, frame)
    assert "HTTP 200" in capsys.readouterr().out
    assert os.environ["CVAT_DETECTOR_ENGINE"] == "openvino"
