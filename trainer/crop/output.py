"""The crop folder as one unit: staged beside OUT, put in place only when the whole run succeeded.

A re-run replaces the previous set entirely (no stale crops mixed in); ``--append`` adds files and
rows to it and refuses crop paths it already lists. A failed or interrupted run leaves OUT as it
was. Only folders that are empty or hold a ``metadata.csv`` are ever replaced, so a mistyped OUT
cannot wipe unrelated files.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from serverless.errors import UserError

METADATA = "metadata.csv"
#: metadata.csv columns, in order; one row per crop file.
COLUMNS = (
    "crop_path", "label", "subset", "source_image", "task_id", "frame", "object_id",
    "x1", "y1", "x2", "y2", "score", "rotation", "occluded", "attributes", "width", "height",
)  # fmt: skip


class CropOutput:
    """Stages crops and metadata in a hidden folder beside ``out``; :meth:`commit` publishes."""

    def __init__(self, out: str | Path, append: bool = False) -> None:
        self.out = Path(out)
        self.append = append and (self.out / METADATA).is_file()
        self._check_target()
        listed = _listed_paths(self.out / METADATA) if self.append else []
        self._listed = {p.casefold() for p in listed}  # crops OUT has already (--append)
        self._claimed: set[str] = set()  # crops of this run
        self.staging = self._make_staging()
        self._file = (self.staging / METADATA).open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(COLUMNS)

    def _check_target(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder; choose a folder for crops")
        if self.out.is_dir() and not (self.out / METADATA).is_file() and any(self.out.iterdir()):
            raise UserError(
                f"{self.out}: folder is not empty and holds no {METADATA}, so it is not a crop "
                "export this command may replace; choose a new or empty folder"
            )

    def _make_staging(self) -> Path:
        staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        blocker = next((p for p in self.out.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UserError(f"{self.out}: cannot write the crops there: {blocker} is a file")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        except OSError as exc:
            raise UserError(f"{self.out}: cannot write the crops there: {exc.strerror}") from exc
        return staging

    def claim(self, crop_path: str, source: str) -> None:
        """Reserve a crop path; a path listed already (or twice in this run) is an error."""
        key = crop_path.casefold()
        if key in self._listed:
            raise UserError(
                f"{source}: crop path {crop_path!r} is already listed in {self.out / METADATA}; "
                "append only new images"
            )
        if key in self._claimed:
            raise UserError(
                f"{source}: two objects would be written to {crop_path!r}; object ids in one "
                "image must be unique"
            )
        self._claimed.add(key)

    def make_dir(self, folder: str) -> None:
        (self.staging / folder).mkdir(parents=True, exist_ok=True)

    def write_rows(self, rows: Iterable[list[str]]) -> None:
        self._writer.writerows(rows)

    def commit(self) -> None:
        """Publish the staged crops: replace OUT, or merge into it with ``append``."""
        self._file.close()
        if self.append:
            self._merge()
            shutil.rmtree(self.staging)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
            os.rename(self.out, old)
        try:
            os.rename(self.staging, self.out)
        except OSError:
            if old is not None:
                os.rename(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old)

    def _merge(self) -> None:
        """Move the new files in, then swap in metadata.csv = old rows + new rows."""
        for folder, _, files in os.walk(self.staging):
            rel = Path(folder).relative_to(self.staging)
            (self.out / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                if rel != Path(".") or name != METADATA:
                    os.replace(Path(folder) / name, self.out / rel / name)
        merged = self.staging / f"{METADATA}.merged"
        with merged.open("wb") as dst:
            old = (self.out / METADATA).read_bytes()
            dst.write(old if old.endswith(b"\n") else old + b"\n")
            with (self.staging / METADATA).open("rb") as src:
                src.readline()  # header
                shutil.copyfileobj(src, dst)
        os.replace(merged, self.out / METADATA)

    def discard(self) -> None:
        self._file.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CropOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()


def _listed_paths(metadata: Path) -> list[str]:
    """The crop paths an existing metadata.csv lists; its header must be this version's."""
    with metadata.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise UserError(
                f"{metadata}: not a crop metadata file of this version (expected columns "
                f"{', '.join(COLUMNS)}); write to a new folder instead of --append"
            )
        return [row[0] for row in reader if row]
