"""Safe, stable file names for crops: label and subset folders, image stems, crop paths.

Label, subset and image names come from untrusted exports and must never escape the output folder or
produce names a file system refuses. Names are sanitised and then made unique case-insensitively
(crops are often copied to Windows/macOS), in a fixed order so the same input always maps to the
same paths.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

#: Characters that are path separators, control characters or refused by Windows file systems.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
#: Windows device names, refused there with any extension ("CON.png", "com1"); prefixed with "_".
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)
MAX_NAME = 100  # characters; leaves room for "__<id>.png" under the usual 255-byte limit


def safe_component(name: str) -> str:
    """One path component that cannot traverse, hide or collide with a device name."""
    text = _UNSAFE.sub("_", name).strip(" .")
    text = text[:MAX_NAME].rstrip(" .") or "_"
    return "_" + text if _RESERVED.match(text) else text


def unique_names(names: Iterable[str]) -> dict[str, str]:
    """Map each distinct name to a safe component, unique ignoring case; earlier names win.

    A name whose sanitised form is taken gets ``_2``, ``_3``, ... in the order given, so callers
    pass names in a stable order (the export's label list, the subsets in order of appearance).
    """
    taken: set[str] = set()
    mapping: dict[str, str] = {}
    for name in names:
        if name in mapping:
            continue
        base = candidate = safe_component(name)
        n = 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate.casefold())
        mapping[name] = candidate
    return mapping


def image_stems(
    keys: Sequence[tuple[str, str]], by_subset: bool, identities: Sequence[str] | None = None
) -> list[str]:
    """File-name stems for images given as (subset, name), unique within each output folder.

    The stem is the image name without extension, folders flattened with ``_``. Images whose stems
    would clash in one folder (``a.jpg`` and ``a.png``; the same name in two subsets when subsets
    share a folder; ``img_001.jpg`` of two tasks) get a short hash of their identity (default
    "subset/name") appended, which stays the same across runs.
    """
    identities = identities or [f"{subset}/{name}" for subset, name in keys]
    stems = [_flat_stem(name) for _, name in keys]
    folder = [subset.casefold() if by_subset else "" for subset, _ in keys]
    counts = Counter((f, s.casefold()) for f, s in zip(folder, stems, strict=True))
    out = []
    for identity, f, stem in zip(identities, folder, stems, strict=True):
        if counts[(f, stem.casefold())] > 1:
            digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
            stem = f"{stem}-{digest}"
        out.append(stem)
    return out


def _flat_stem(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [p for p in path.parent.parts if p not in ("", ".", "..", "/")]
    return safe_component("_".join([*parts, path.stem or path.name]))
