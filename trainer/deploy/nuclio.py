"""A trained run → a self-contained Nuclio function directory that CVAT lists and calls.

    DIR/function.yaml   from the template serverless/function.yaml: name, labels, description, image
    DIR/main.py         the entry point Nuclio loads (spec.handler main:handler)
    DIR/serverless/     the runtime package (its Python files)
    DIR/bundle/         model.json, weights.pt, labels.txt (CVAT_DETECTOR_BUNDLE=/opt/nuclio/bundle);
                        a CPU function served by OpenVINO has engine.xml/.bin/.json instead of weights.pt

A CPU function (``cpu=True``) is served by the bundle's OpenVINO export (serverless/engine.py), made
and verified here (trainer/deploy/export.py), on an image without torch; a bundle whose export does
not reproduce PyTorch is served by PyTorch on the CPU instead, and :attr:`Packaged.note` says why.

The directory is built under a temporary name beside DIR and renamed into place, so DIR is either
the previous function or the complete new one. Several models live side by side under their names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import serverless
from serverless.bundle import (
    ENGINE_FILES,
    LABELS_TXT,
    MODEL_JSON,
    WEIGHTS,
    BundleError,
    BundleInfo,
    load_info,
    load_model,
)
from serverless.engine import ENGINE_ENV, ENGINES
from serverless.errors import UserError
from serverless.precision import PRECISION_ENV
from serverless.score_attribute import DEFAULT_SCORE, ScoreAttribute

if TYPE_CHECKING:
    from trainer.deploy.export import Frame

#: Nuclio makes Kubernetes names "nuclio-<name>" that must fit in 63 characters.
MAX_NAME = 56
#: The GPU base image of serverless/function.yaml, and the torch/torchvision it ships (the serverless
#: runtime must import and serve on exactly these: tests/test_function_image.py).
GPU_BASE_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
IMAGE_TORCH = {GPU_BASE_IMAGE: ("2.5.1", "0.20.1")}
#: The CPU variant: same torch/torchvision as the GPU base image, CPU wheels.
CPU_BASE_IMAGE = "python:3.11-slim"
CPU_TORCH = (
    "pip install --no-cache-dir torch=={} torchvision=={} "
    "--index-url https://download.pytorch.org/whl/cpu".format(*IMAGE_TORCH[GPU_BASE_IMAGE])
)
CPU_EVENT_TIMEOUT = "120s"
#: The OpenVINO CPU function installs the runtime its engine was exported with, and no torch.
CPU_OPENVINO = "pip install --no-cache-dir openvino=={}"
#: Python inside the base images we name, which spec.runtime must match.
IMAGE_PYTHON = {
    GPU_BASE_IMAGE: "3.11",
    CPU_BASE_IMAGE: "3.11",
}
ENTRY_POINT = '''"""Nuclio entry point (spec.handler main:handler): the serverless package's."""

from serverless.main import handler, init_context

__all__ = ["handler", "init_context"]
'''


#: What ``package --engine-precision`` may ask the OpenVINO engine to compute in.
ENGINE_PRECISIONS = ("auto", "f32", "bf16")


@dataclass
class Packaged:
    """What :func:`package_function` wrote."""

    out: Path
    name: str  # Nuclio function name (metadata.name), CVAT's function id
    display_name: str  # what CVAT shows
    info: BundleInfo
    cpu: bool
    runtime_files: list[str]
    score: ScoreAttribute | None = None
    engine: str = "pytorch"  # what serves the bundle: "openvino" (CPU only) or "pytorch"
    note: str | None = None  # why a CPU function is served by PyTorch, or in f32, after all
    engine_precision: str = "f32"  # what the OpenVINO engine computes in: f32, bf16x3 or bf16 when verified


def package_function(
    run: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    cpu: bool = False,
    engine: str | None = None,
    frames: Sequence[Frame] | None = None,
    overwrite: bool = False,
    score: ScoreAttribute | None = DEFAULT_SCORE,
    engine_precision: str = "auto",
) -> Packaged:
    """Write the function directory ``out`` for the bundle in ``run``; refuses an existing ``out``
    unless ``overwrite``. ``score`` is the attribute each detection's score is returned as
    (None: no attribute). ``engine``: ``openvino`` (default with ``cpu``; verified on ``frames``,
    generated ones when None) or ``pytorch``. ``engine_precision`` (:data:`ENGINE_PRECISIONS`): what
    the OpenVINO engine computes in (:func:`_engine_arithmetic`)."""
    run, out = Path(run), Path(out)
    _check_target(run, out, overwrite)
    info = _load_checked(run)
    engine, note, openvino = _choose_engine(run, cpu, engine, frames)
    engine_precision, precision_note = _engine_arithmetic(run, cpu, engine, engine_precision, frames)
    display_name = name or run.resolve().name
    config = function_config(info, function_name(display_name), display_name, cpu=cpu, score=score,
                             openvino=openvino, engine_precision=engine_precision)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        runtime_files = _write_function(tmp, run, info, config)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Packaged(out, config["metadata"]["name"], display_name, info, cpu, runtime_files, score, engine,
                    note or precision_note, engine_precision)  # fmt: skip


def _choose_engine(
    run: Path, cpu: bool, engine: str | None, frames: Sequence[Frame] | None
) -> tuple[str, str | None, str | None]:
    """(engine, why PyTorch serves a CPU function after all, OpenVINO version the image installs)."""
    engine = engine or ("openvino" if cpu else "pytorch")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "pytorch":
        return engine, None, None
    if not cpu:
        raise UserError("--engine openvino is a CPU engine; add --cpu")
    from trainer.deploy.export import EngineUnfaithful, ensure_engine

    try:
        exported = ensure_engine(run, frames)
    except EngineUnfaithful as exc:
        return "pytorch", f"{exc}; the function serves the bundle with PyTorch on the CPU instead", None
    return engine, None, exported.exported_with["openvino"]


def _engine_arithmetic(
    run: Path, cpu: bool, engine: str, precision: str, frames: Sequence[Frame] | None
) -> tuple[str, str | None]:
    """(what the OpenVINO engine computes in, why not what was asked for). ``auto``: f32, or bf16x3
    where this CPU has AMX and it finds PyTorch's detections faster (export.verify_bf16x3); ``f32``;
    ``bf16``: only when it finds PyTorch's detections at the thresholds (export.verify_bf16)."""
    if precision not in ENGINE_PRECISIONS:
        raise UserError(f"--engine-precision {precision}: expected one of {', '.join(ENGINE_PRECISIONS)}")
    if precision == "f32" or (precision == "auto" and not (cpu and engine == "openvino")):
        return "f32", None
    if precision == "auto":
        from serverless.bf16x3 import cpu_has_amx
        from trainer.deploy.export import verify_bf16x3

        return ("bf16x3" if cpu_has_amx() and verify_bf16x3(run, frames)["chosen"] else "f32"), None
    if not cpu:
        raise UserError("--engine-precision bf16 is for the OpenVINO CPU function; add --cpu")
    if engine != "openvino":
        return "f32", "--engine-precision bf16 is for the OpenVINO engine; PyTorch serves this one in fp32"
    from trainer.deploy.export import verify_bf16

    agreement = verify_bf16(run, frames)
    if agreement.same:
        return "bf16", None
    return "f32", (f"in bf16 the engine's detections differ from PyTorch's ({agreement.summary()}); "
                   "it computes in f32")


def function_name(text: str) -> str:
    """A Nuclio/Kubernetes function name from free text: lowercase letters, digits and '-',
    starting with a letter, at most :data:`MAX_NAME` characters."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if name and not name[0].isalpha():
        name = f"detector-{name}"
    name = name[:MAX_NAME].rstrip("-")
    if not name:
        raise UserError(
            f"function name {text!r}: has no letters or digits to build a Nuclio name from; "
            "pass --name"
        )
    return name


def function_config(
    info: BundleInfo, name: str, display_name: str, *, cpu: bool = False,
    score: ScoreAttribute | None = None, openvino: str | None = None, engine_precision: str = "f32",
) -> dict[str, Any]:
    """The template's configuration filled in for one bundle (see serverless/function.yaml); with
    ``score``, every label declares the score attribute and the function is told to return it;
    ``openvino``: the version of the OpenVINO runtime that serves a CPU function instead of torch."""
    config = yaml.safe_load(template_text())
    annotations = config["metadata"]["annotations"]
    spec = config["spec"]
    build = spec["build"]
    config["metadata"]["name"] = name
    annotations["name"] = display_name
    annotations["spec"] = label_spec(info, score)
    if score is not None:
        spec["env"] = [*spec.get("env", []), *score.env()]
    spec["description"] = _description(info, display_name, cpu, openvino)
    build["image"] = f"cvat.detector.{name}"
    if cpu:
        build["baseImage"] = CPU_BASE_IMAGE
        runtime = CPU_OPENVINO.format(openvino) if openvino else CPU_TORCH
        build["directives"]["preCopy"].insert(0, {"kind": "RUN", "value": runtime})
        if openvino:
            spec["env"].append({"name": ENGINE_ENV, "value": "openvino"})
            if engine_precision == "bf16":
                spec["env"].append({"name": PRECISION_ENV, "value": "bf16"})
            elif engine_precision == "f32":  # pinned: never bf16x3, even where a check chose it
                spec["env"].append({"name": PRECISION_ENV, "value": "off"})
        spec["eventTimeout"] = CPU_EVENT_TIMEOUT
        limits = spec["resources"]["limits"]
        del limits["nvidia.com/gpu"]
        if not limits:
            del spec["resources"]
    python = IMAGE_PYTHON.get(build["baseImage"])
    if python and spec["runtime"] != f"python:{python}":
        raise UserError(
            f"function.yaml template: spec.runtime {spec['runtime']!r} does not match the "
            f"Python {python} of base image {build['baseImage']}"
        )
    return config


def template_text() -> str:
    """serverless/function.yaml, read as package data (works from a wheel as from the repo)."""
    return resources.files("serverless").joinpath("function.yaml").read_text(encoding="utf-8")


def label_spec(info: BundleInfo, score: ScoreAttribute | None = None) -> str:
    """The ``spec`` annotation CVAT parses: a JSON list of {"id", "name", "type"}, one per line;
    with ``score``, each label also declares it in ``attributes`` (name, input_type and values:
    a spec attribute lacking one of them makes CVAT's whole function list fail)."""
    if info.shape_type not in ("rectangle", "mask"):
        raise UserError(
            f"model.json: shape_type {info.shape_type!r} is not one CVAT detectors return "
            "(expected 'rectangle' or 'mask')"
        )
    extra = {"attributes": [score.spec()]} if score is not None else {}
    items = [
        json.dumps({"id": i, "name": label, "type": info.shape_type, **extra}, ensure_ascii=False)
        for i, label in enumerate(info.labels, start=1)
    ]
    return "[\n" + ",\n".join(f"  {item}" for item in items) + "\n]\n"


def render_yaml(config: dict[str, Any], source: str) -> str:
    """function.yaml text: the label spec as a readable block, keys in the template's order."""
    header = (
        f"# Generated by `python -m trainer package` from {source}.\n"
        "# To change every future function, edit the template serverless/function.yaml instead.\n"
    )
    return header + yaml.dump(
        config, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=1 << 16
    )


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, as hand-written function.yaml files do."""


_BlockDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def _description(info: BundleInfo, display_name: str, cpu: bool, openvino: str | None) -> str:
    shown = ", ".join(info.labels[:6]) + (", …" if len(info.labels) > 6 else "")
    device = ("CPU (OpenVINO)" if openvino else "CPU") if cpu else "GPU"
    return (
        f"{display_name}: {info.architecture} {info.shape_type} detector for "
        f"{len(info.labels)} labels ({shown}), trained with cvat-detector; {device}"
    )


def _check_target(run: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    resolved = out.resolve()
    if resolved == run.resolve() or resolved in run.resolve().parents:
        raise UserError(f"--out {out}: would replace the run directory {run} itself")


def _load_checked(run: Path) -> BundleInfo:
    """The bundle's description, after checking that its weights load into its architecture."""
    info = load_info(run)
    try:
        load_model(run, "cpu")
    except BundleError:
        raise
    except Exception as exc:  # torch reports corrupt or mismatched weights in many types
        raise UserError(
            f"{run / WEIGHTS}: does not load into {info.architecture}: {exc}".splitlines()[0]
        ) from exc
    return info


def _write_function(tmp: Path, run: Path, info: BundleInfo, config: dict[str, Any]) -> list[str]:
    """Fill ``tmp`` with the function; returns the runtime modules copied."""
    (tmp / "function.yaml").write_text(render_yaml(config, str(run)), encoding="utf-8")
    (tmp / "main.py").write_text(ENTRY_POINT, encoding="utf-8")
    runtime = tmp / "serverless"
    runtime.mkdir()
    modules = sorted(Path(serverless.__file__).parent.glob("*.py"))
    for module in modules:
        shutil.copy2(module, runtime / module.name)
    bundle = tmp / "bundle"
    bundle.mkdir()
    served_by_openvino = any(e["name"] == ENGINE_ENV for e in config["spec"]["env"])
    for file in (MODEL_JSON, *(ENGINE_FILES if served_by_openvino else (WEIGHTS,))):
        shutil.copy2(run / file, bundle / file)
    (bundle / LABELS_TXT).write_text("\n".join(info.labels) + "\n", encoding="utf-8")
    return [m.name for m in modules]


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is swapped out only after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old)
