"""The packaged function imports and serves in an environment holding what its image holds, and
nothing else: the base image's Python, torch and torchvision versions (PyPI's wheels of exactly those
versions run on a CPU), plus what function.yaml's build directives install. No trainer, no cvat-sdk.

The environment is built once (about 3 minutes and 5 GB: the CUDA wheels torch needs to import) and
cached under ~/.cache/cvat-detector, keyed by the image, the versions and the directives; a change to
any of them builds a new one. ``pytest -m "not image"`` leaves this test out.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serverless.detector import Detector
from serverless.imageio import decode_image
from trainer.deploy import nuclio as package

pytestmark = pytest.mark.image

LABELS = ["RBC", "WBC", "Platelets"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvat-detector"
#: Disk the environment's build needs: 5.2 GB installed, pip's unpacking besides.
BUILD_GB = 7
#: Modules of the workstation side that must never load in the function.
FORBIDDEN = ["trainer", "cvat_sdk", "faster_coco_eval", "matplotlib", "tqdm"]

SERVE = r"""
import base64, json, sys
sys.path.insert(0, ".")  # as Nuclio's wrapper does: the function's directory
import nuclio_sdk, torch, torchvision
from nuclio_sdk.test import Platform
import main
body = {"image": sys.stdin.read(), "threshold": 0.0}
response = Platform().call_handler(main.handler, nuclio_sdk.Event(body=body, content_type="application/json"))
print(json.dumps({"status": response.status_code, "body": json.loads(response.body),
                  "versions": [torch.__version__, torchvision.__version__, sys.version.split()[0]],
                  "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def _template() -> dict:
    return yaml.safe_load(package.template_text())


def _image_venv() -> Path:
    """A virtualenv of the base image's Python with its torch/torchvision and the build directives."""
    build = _template()["spec"]["build"]
    image = build["baseImage"]
    python = package.IMAGE_PYTHON[image]
    torch_version, vision_version = package.IMAGE_TORCH[image]
    runs = [d["value"] for d in build["directives"]["preCopy"] if d["kind"] == "RUN"]
    key = hashlib.sha256(json.dumps([image, python, torch_version, vision_version, runs]).encode())
    venv = CACHE / f"function-image-{key.hexdigest()[:12]}"
    if (venv / "complete").exists():
        return venv
    interpreter = shutil.which(f"python{python}")
    if interpreter is None:
        pytest.skip(f"python{python}, the Python of {image}, is not installed here")
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free / 1e9
    if free < BUILD_GB:
        pytest.fail(f"{CACHE}: {free:.1f} GB free; building the function image's environment needs about "
                    f"{BUILD_GB} GB (set XDG_CACHE_HOME to a folder on a disk with more room)", pytrace=False)
    tmp = venv.with_name(f"{venv.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip"]
    subprocess.run([interpreter, "-m", "venv", str(tmp)], check=True)
    subprocess.run([*pip, "install", "--quiet", f"torch=={torch_version}", f"torchvision=={vision_version}"],
                   check=True)
    for run in runs:  # exactly the image's build steps
        words = shlex.split(run)
        assert words[:2] == ["pip", "install"], f"unexpected build directive {run!r}"
        subprocess.run([*pip, *words[1:], "--quiet"], check=True)
    (tmp / "complete").touch()
    shutil.rmtree(venv, ignore_errors=True)
    os.rename(tmp, venv)
    return venv


def test_template_names_the_image_whose_versions_are_checked():
    assert _template()["spec"]["build"]["baseImage"] == package.GPU_BASE_IMAGE
    torch_version, vision_version = package.IMAGE_TORCH[package.GPU_BASE_IMAGE]
    assert f"torch=={torch_version} torchvision=={vision_version} " in package.CPU_TORCH  # --cpu alike


def _imports(path: Path) -> set[str]:
    """Top-level modules a Python file imports anywhere (inside functions too); relative ones aside."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.partition(".")[0])
    return names - {"__future__"}


#: Imports the GPU function's files hold for the other engine: serverless/engine.py (and the
#: bf16x3.py it alone imports) import OpenVINO only when CVAT_DETECTOR_ENGINE=openvino, which only
#: ``package --cpu`` sets, in an image that installs it (tests/test_package.py).
OTHER_ENGINE = {"serverless/engine.py": {"openvino"}, "serverless/bf16x3.py": {"openvino"}}


def test_every_import_of_the_function_names_a_module_of_its_image(shared_bundle, tmp_path):
    """Imports that serving a frame does not reach (lazy ones, other code paths) must exist in the
    image too: each import statement of the packaged function, run or not, names a module the image
    Python can find (or one of the function's own files)."""
    listing = ("import json, pkgutil, sys\n"
               "print(json.dumps([*sys.stdlib_module_names, *(m.name for m in pkgutil.iter_modules())]))")
    found = subprocess.run([str(_image_venv() / "bin" / "python"), "-I", "-c", listing],
                           capture_output=True, text=True, check=True)  # fmt: skip
    fn = package.package_function(shared_bundle(LABELS, min_size=96, max_size=128), tmp_path / "fn").out
    local = {p.stem for p in fn.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    allowed = set(json.loads(found.stdout)) | local
    assert not set(FORBIDDEN) & allowed
    for path in fn.rglob("*.py"):
        name = path.relative_to(fn).as_posix()
        missing = _imports(path) - allowed - OTHER_ENGINE.get(name, set())
        assert not missing, f"{name} imports {missing}"


def test_packaged_function_serves_with_only_what_its_image_holds(shared_bundle, tmp_path):
    venv = _image_venv()
    run = shared_bundle(LABELS, min_size=96, max_size=128)
    fn = tmp_path / "fn"
    package.package_function(run, fn)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", SERVE],
        input=base64.b64encode(buf.getvalue()).decode("ascii"),
        cwd=fn, capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "CVAT_DETECTOR_DEVICE": "cpu"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    torch_version, vision_version = package.IMAGE_TORCH[package.GPU_BASE_IMAGE]
    assert [v.split("+")[0] for v in result["versions"][:2]] == [torch_version, vision_version]
    assert result["versions"][2].startswith(package.IMAGE_PYTHON[package.GPU_BASE_IMAGE] + ".")
    assert not set(FORBIDDEN) & set(result["modules"])
    assert result["status"] == 200, result["body"]
    # the same weights give the same detections under the image's torch as under ours
    expected = Detector(run, "cpu").detect(decode_image(buf.getvalue()), 0.0)
    shapes = result["body"]
    assert len(shapes) == len(expected) > 0
    for box, score, label in list(zip(expected.boxes, expected.scores, expected.labels, strict=True))[:10]:
        assert any(
            s["label"] == label and abs(float(s["confidence"]) - score) < 2e-3
            and np.allclose(s["points"], box, atol=0.5) for s in shapes
        ), f"{label} {box} {score} not served by torch {torch_version}"
