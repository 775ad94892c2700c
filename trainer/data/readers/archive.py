"""Safe, cached extraction of export zips.

Export zips come from servers and colleagues: an entry may try to escape the target folder, a small
file may inflate to terabytes, a download may be truncated. Each zip is extracted once into a cache
folder keyed by its name, size and modification time, through a temporary folder renamed into place,
so an interrupted extraction never leaves a half-written export behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from serverless.errors import UserError

#: Largest total uncompressed size accepted (bytes).
MAX_TOTAL_BYTES = 64 * 2**30
#: Largest number of entries accepted.
MAX_ENTRIES = 2_000_000
#: Largest compression ratio accepted for an entry bigger than RATIO_MIN_BYTES.
MAX_RATIO = 200
RATIO_MIN_BYTES = 2**20


def default_cache_dir() -> Path:
    """$CVAT_DETECTOR_CACHE, else ~/.cache/cvat-detector/exports."""
    env = os.environ.get("CVAT_DETECTOR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cvat-detector" / "exports"


def open_export(path: Path, cache_dir: str | Path | None = None) -> Path:
    """Folder holding the export at ``path``: the folder itself, or the zip extracted (cached)."""
    if path.is_dir():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a CVAT export zip or folder)")
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".zip":
            raise UserError(f"{path}: corrupt zip archive (no zip directory found; truncated?)")
        return path  # a bare annotation file; format detection decides
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    target = cache / f"{path.stem}-{key[:16]}"
    if target.is_dir():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    except OSError as exc:
        raise UserError(
            f"cannot write the export cache {cache} ({exc.strerror}); "
            "set CVAT_DETECTOR_CACHE to a writable folder"
        ) from exc
    try:
        extract_zip(path, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent extraction of the same zip
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def extract_zip(path: Path, target: Path) -> None:
    """Extract every file of ``path`` under ``target`` after checking all entries first."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            _check_members(path, members, target)
            for member in members:
                out = target / _safe_name(path, member.filename)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 2**20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise UserError(f"{path}: corrupt zip archive, or unsupported compression ({exc})") from exc


def _check_members(path: Path, members: list[zipfile.ZipInfo], target: Path) -> None:
    if len(members) > MAX_ENTRIES:
        raise UserError(f"{path}: {len(members)} entries, more than the limit of {MAX_ENTRIES}")
    total = 0
    for m in members:
        _safe_name(path, m.filename)
        if stat.S_ISLNK(m.external_attr >> 16):
            raise UserError(f"{path}: entry {m.filename!r} is a symbolic link; refusing it")
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size > RATIO_MIN_BYTES and ratio > MAX_RATIO:
            raise UserError(
                f"{path}: entry {m.filename!r} inflates {ratio:.0f}x ({m.file_size} bytes); "
                f"refusing it as a likely zip bomb (limit {MAX_RATIO}x)"
            )
        total += m.file_size
    if total > MAX_TOTAL_BYTES:
        raise UserError(
            f"{path}: would extract {total} bytes, over the limit of {MAX_TOTAL_BYTES} bytes"
        )
    free = shutil.disk_usage(target).free
    if total > free:
        raise UserError(f"{path}: needs {total} bytes to extract, only {free} free in {target}")


def _safe_name(path: Path, name: str) -> PurePosixPath:
    """The entry's relative path, refused when it is absolute or climbs out of the target."""
    posix = PurePosixPath(name.replace("\\", "/"))
    parts = posix.parts
    if not parts or posix.is_absolute() or ".." in parts or ":" in parts[0]:
        raise UserError(f"{path}: entry {name!r} would be written outside the target; refusing it")
    return posix
