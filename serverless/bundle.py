"""The model bundle: the self-describing directory the trainer writes and the function loads.

``model.json`` says what the network is (architecture, labels, preprocessing, calibrated thresholds,
provenance); ``weights.pt`` is a plain state_dict loaded with ``weights_only=True`` so that a bundle
can never run code. This module must not import ``trainer``: bundles load where only the runtime is.
torch is imported where weights are read or written, so that reading a bundle's description (and
writing files atomically) stays light for the commands that never run a model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serverless.architectures import build_model, check_anchors, get_architecture, infer_structure
from serverless.errors import BundleError

if TYPE_CHECKING:
    import torch

FORMAT = "cvat-detector-bundle"
FORMAT_VERSION = 1

# The run directory: the bundle (the first three, all a function needs) and what training leaves
# beside it. Every file name is defined here once.
MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
LABELS_TXT = "labels.txt"
RESULTS_TXT = "results.txt"
METRICS_JSON = "metrics.json"
HISTORY_CSV = "history.csv"
CONFIG_YAML = "config.yaml"
PLOTS = "plots"
#: The run's images by role (identities of train, val and test images): what evaluate and a
#: retraining read to stay off the images the model was trained on.
SPLIT_JSON = "split.json"
LAST_CHECKPOINT = "checkpoints/last.pt"
BEST_CHECKPOINT = "checkpoints/best.pt"
BUNDLE_FILES = (MODEL_JSON, WEIGHTS, LABELS_TXT)
# The CPU engine's export of the weights (serverless.engine), beside them once exported.
ENGINE_XML = "engine.xml"
ENGINE_BIN = "engine.bin"
ENGINE_JSON = "engine.json"
ENGINE_FILES = (ENGINE_XML, ENGINE_BIN, ENGINE_JSON)


@dataclass
class BundleInfo:
    """The content of ``model.json``."""

    architecture: str
    labels: list[str]  # class id = index + 1; 0 is background
    shape_type: str = "rectangle"  # CVAT shape the function returns: "rectangle" or "mask"
    min_size: int | None = None  # shorter side the model resizes to
    max_size: int | None = None
    detections_per_img: int = 300
    tile_size: int | None = None  # sliced inference for large frames when set
    tile_overlap: int = 128
    #: Priors fitted to the training data (sizes and aspect ratios, as torchvision's anchor generator
    #: takes them); None: the architecture's defaults, as in bundles written before they existed.
    anchors: dict[str, list] | None = None
    #: How the network is shaped beyond its name (architectures.Architecture.structure: norm
    #: layers, trainable backbone layers, SSDlite's tail); {} in bundles older than the field.
    structure: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5  # default score threshold (max F1 on validation)
    class_thresholds: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def build(self) -> torch.nn.Module:
        """The untrained network this bundle's weights belong to."""
        return build_model(
            self.architecture,
            len(self.labels),
            min_size=self.min_size,
            max_size=self.max_size,
            detections_per_img=self.detections_per_img,
            anchors=self.anchors,
            structure=self.structure,
        )

    def score_floors(self, threshold: float | None = None) -> np.ndarray:
        """Per-class score thresholds: ``threshold`` for every class, else the calibrated ones."""
        if threshold is not None:
            return np.full(len(self.labels), float(threshold), dtype=np.float32)
        return np.array(
            [self.class_thresholds.get(name, self.threshold) for name in self.labels], dtype=np.float32
        )

    def check_tiles(self, source: str) -> None:
        """Refuse a tiling the detectors cannot serve: the overlap must fit inside a tile."""
        tile, overlap = self.tile_size, self.tile_overlap
        if tile is not None and not 0 <= overlap < tile:
            raise BundleError(
                f"{source}: tile_overlap must be >= 0 and smaller than tile_size ({tile}), got {overlap}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MODEL_JSON) -> BundleInfo:
        if data.get("format") != FORMAT:
            raise BundleError(f"{source}: not a cvat-detector bundle (format={data.get('format')!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(
                f"{source}: bundle format version {version!r} is newer than this runtime supports "
                f"({FORMAT_VERSION}); update cvat-detector"
            )
        known = set(cls.__dataclass_fields__)
        info = cls(**{k: v for k, v in data.items() if k in known})
        spec = get_architecture(info.architecture)
        if info.anchors is not None:
            try:
                check_anchors(spec.priors, info.anchors)
            except ValueError as exc:
                raise BundleError(f"{source}: anchors: {exc}") from None
        if not info.labels or len(set(info.labels)) != len(info.labels):
            raise BundleError(f"{source}: labels must be a non-empty list of unique names")
        return info


class ServedBundle:
    """What every detector serving a bundle answers from its model.json: the PyTorch Detector and
    the OpenVINO EngineDetector inherit it, so the function treats both alike."""

    info: BundleInfo

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def has_masks(self) -> bool:
        return self.info.shape_type == "mask"

    def warmup(self, size: tuple[int, int] = (480, 640)) -> None:
        """Run one dummy frame so the first real request does not pay for lazy initialisation."""
        self.detect(np.zeros((*size, 3), dtype=np.uint8))  # type: ignore[attr-defined]

    def thresholds(self, threshold: float | None) -> np.ndarray:
        """Per-class score thresholds: the caller's for every class, else the calibrated ones."""
        return self.info.score_floors(threshold)


def load_info(bundle_dir: str | Path) -> BundleInfo:
    path = Path(bundle_dir) / MODEL_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no {MODEL_JSON}; expected a trained run directory") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON: {exc}") from exc
    return BundleInfo.from_dict(data, str(path))


def load_model(
    bundle_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[BundleInfo, torch.nn.Module]:
    """Rebuild the network and load its weights without unpickling code; eval mode on ``device``."""
    info = load_info(bundle_dir)
    path = Path(bundle_dir) / WEIGHTS
    if not path.exists():
        raise BundleError(f"{bundle_dir}: no {WEIGHTS}")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not info.structure:
        info.structure = infer_structure(info.architecture, state)
    model = info.build()
    model.load_state_dict(state)
    return info, model.eval().to(device)


def save_bundle(bundle_dir: str | Path, info: BundleInfo, state_dict: dict[str, torch.Tensor]) -> None:
    """Write weights then model.json, each atomically, so a reader never sees a half bundle."""
    import torch

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(bundle_dir / WEIGHTS, lambda f: torch.save(weights, f))
    atomic_write(bundle_dir / MODEL_JSON, lambda f: f.write(info.to_json().encode()))
    atomic_write(
        bundle_dir / LABELS_TXT, lambda f: f.write(("\n".join(info.labels) + "\n").encode())
    )


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(binary_file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
