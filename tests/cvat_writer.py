"""Exports built the way a CVAT 2.x server writes them, for tests.

Every layout follows CVAT's own exporter code, as summarised with citations in the project's export
memo (cvat/apps/dataset_manager/bindings.py, formats/cvat.py, datumaro's COCO exporter):

- annotations.xml: ``<annotations><version>1.1</version><meta>`` with ``<task>`` (task export:
  TaskData.meta_for_task), ``<job>`` (job export: JobData._init_meta, a video job's
  ``<original_size>`` directly under ``<meta>``) or ``<project>`` (ProjectData._init_meta), then
  ``<image>`` elements ("CVAT for images 1.1", dump_as_cvat_annotation) or ``<track>`` elements
  ("CVAT for video 1.1", dump_as_cvat_interpolation); numbers as ``%.2f``;
- video frames named ``frame_{n:06d}`` in XML, their files ``images/frame_{n:06d}.PNG``
  (``VIDEO_FRAME_EXT``), in COCO (CVAT >= 2.32) ``file_name`` ``frame_{n:06d}.png``;
- COCO: ``annotations/instances_<subset>.json`` (compact, keys licenses, info, categories, images,
  annotations), images in ``images/<subset>/``; category ids 1..N over every label, sub-labels with
  ``supercategory`` = their skeleton.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from PIL import Image

DATE = "2025-01-01 00:00:00.000000+00:00"


def labels_xml(labels: list[dict]) -> str:
    """``<labels>`` as _convert_db_labels writes them: name, color, type, attributes[, parent]."""
    out = []
    for label in labels:
        attributes = "".join(
            f"<attribute><name>{a}</name><mutable>False</mutable><input_type>text</input_type>"
            f"<default_value></default_value><values></values></attribute>"
            for a in label.get("attributes", ())
        )
        parent = f"<parent>{label['parent']}</parent>" if label.get("parent") else ""
        out.append(
            f"<label><name>{label['name']}</name><color>#fa3253</color>"
            f"<type>{label.get('type', 'rectangle')}</type><attributes>{attributes}</attributes>"
            f"{parent}</label>"
        )
    return "<labels>" + "".join(out) + "</labels>"


def unit_xml(
    tag: str, ident: int, *, size: int, subset: str = "default", mode: str = "annotation",
    start: int = 0, step: int = 1, video_size: tuple[int, int] | None = None, labels: str = "",
) -> str:
    """A ``<task>`` or ``<job>`` element (fields in CVAT's order); ``labels`` "" for project tasks."""
    stop = start + (size - 1) * step
    frame_filter = f"step={step}" if step > 1 else ""
    name = "" if tag == "job" else f"<name>task {ident}</name>"
    original = ""
    if video_size and tag == "task":
        original = (f"<original_size><width>{video_size[0]}</width><height>{video_size[1]}</height>"
                    "</original_size><source>video.mp4</source>")  # fmt: skip
    return (
        f"<{tag}><id>{ident}</id>{name}<size>{size}</size><mode>{mode}</mode><overlap>0</overlap>"
        f"<bugtracker></bugtracker><created>{DATE}</created><updated>{DATE}</updated>"
        f"<subset>{subset}</subset><start_frame>{start}</start_frame><stop_frame>{stop}</stop_frame>"
        f"<frame_filter>{frame_filter}</frame_filter><segments><segment><id>{ident}</id><start>0</start>"
        f"<stop>{size - 1}</stop><url>http://localhost:8080/api/jobs/{ident}</url></segment></segments>"
        f"<owner><username>admin</username><email>a@b.c</email></owner><assignee></assignee>"
        f"{labels}{original}</{tag}>"
    )


def task_meta(task_id: int, labels: list[dict], **unit) -> str:
    task = unit_xml("task", task_id, labels=labels_xml(labels), **unit)
    return f"<meta>{task}<dumped>{DATE}</dumped></meta>"


def job_meta(job_id: int, labels: list[dict], video_size: tuple[int, int] | None = None, **unit) -> str:
    original = ""
    if video_size:
        original = (f"<original_size><width>{video_size[0]}</width><height>{video_size[1]}</height>"
                    "</original_size>")  # fmt: skip
    job = unit_xml("job", job_id, labels=labels_xml(labels), **unit)
    return f"<meta>{job}<dumped>{DATE}</dumped>{original}</meta>"


def project_meta(tasks: list[str], labels: list[dict], subsets: str = "default") -> str:
    return (
        f"<meta><project><id>1</id><name>p</name><bugtracker></bugtracker><created>{DATE}</created>"
        f"<updated>{DATE}</updated><tasks>{''.join(tasks)}</tasks><subsets>{subsets}</subsets>"
        f"<owner><username>admin</username><email>a@b.c</email></owner><assignee></assignee>"
        f"{labels_xml(labels)}</project><dumped>{DATE}</dumped></meta>"
    )


def annotations_xml(meta: str, body: str) -> str:
    head = '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>'
    return f"{head}{meta}{body}</annotations>\n"


def shape(tag: str, label: str | None = None, *, attributes: dict | None = None, **attrs) -> str:
    """One shape element; attributes in the order given (label and source first, as CVAT)."""
    head = {"label": label, "source": "manual"} if label is not None else {}
    items = {**head, **attrs}
    text = " ".join(f'{k}="{v}"' for k, v in items.items() if v is not None)
    children = "".join(f'<attribute name="{k}">{v}</attribute>' for k, v in (attributes or {}).items())
    return f"<{tag} {text}>{children}</{tag}>"


def image(ident: int, name: str, size: tuple[int, int], shapes: str = "", **extra) -> str:
    """``<image>``: id name [subset task_id] width height, as dump_as_cvat_annotation orders them."""
    attrs = {"id": ident, "name": name, **extra, "width": size[0], "height": size[1]}
    text = " ".join(f'{k}="{v}"' for k, v in attrs.items())
    return f"<image {text}>{shapes}</image>"


def png(size: tuple[int, int], colour: tuple[int, int, int] = (90, 120, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def coco_json(categories: list[tuple[str, str]], images: list[dict], annotations: list[dict]) -> str:
    """One instances_<subset>.json as CVAT writes it (ids 1..N over all labels)."""
    doc = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": dict.fromkeys(("contributor", "date_created", "description", "url", "version", "year"), ""),
        "categories": [
            {"id": i + 1, "name": n, "supercategory": sup} for i, (n, sup) in enumerate(categories)
        ],
        "images": [
            {"id": im["id"], "width": im["width"], "height": im["height"], "file_name": im["file_name"],
             "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0}
            for im in images
        ],
        "annotations": [{"id": i + 1, **ann} for i, ann in enumerate(annotations)],
    }  # fmt: skip
    return json.dumps(doc, separators=(",", ":"))


def write(target: Path, files: dict[str, str | bytes], zipped: bool = False) -> Path:
    """The export's files as a folder, or as a zip with file entries only (make_zip_archive)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(target, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return target
    for name, data in files.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return target
