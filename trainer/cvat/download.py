"""Download training data from a CVAT server with cvat-sdk (the only module that does so).

Credentials come from the environment or cvat-sdk's saved profiles, never from the command line
(where they would end up in shell history and process listings). Exports are cached per
project/task and its ``updated_date``: re-running a training does not re-export an unchanged
project, and any annotation change makes CVAT bump the date and the export is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from serverless.errors import UserError

EXPORT_FORMAT = "CVAT for images 1.1"


def connect(url: str):
    """A logged-in ``cvat_sdk.Client`` for ``url``.

    Credentials, first found wins: $CVAT_ACCESS_TOKEN (a personal access token), $CVAT_USER with
    $CVAT_PASSWORD, or a cvat-sdk profile saved for this server (``cvat-cli profile``).
    """
    from cvat_sdk import make_client
    from cvat_sdk.core.auth import AuthStore, make_client_from_profile
    from cvat_sdk.core.exceptions import AuthStoreError

    token = os.environ.get("CVAT_ACCESS_TOKEN")
    user, password = os.environ.get("CVAT_USER"), os.environ.get("CVAT_PASSWORD")
    try:
        if token:
            return make_client(url, access_token=token)
        if user and password:
            return make_client(url, credentials=(user, password))
        for profile in AuthStore().list_profiles().values():
            if profile.server.rstrip("/") == url.rstrip("/"):
                return make_client_from_profile(profile)
    except AuthStoreError as exc:
        raise UserError(f"cvat-sdk profile store: {exc}") from exc
    except Exception as exc:  # connection and HTTP errors of several libraries
        raise UserError(f"{url}: cannot log in to the CVAT server ({exc})") from exc
    raise UserError(
        f"{url}: no CVAT credentials; set CVAT_ACCESS_TOKEN (a personal access token), or "
        "CVAT_USER and CVAT_PASSWORD, in the environment, or save a cvat-cli profile for it"
    )


def download_exports(
    client, *, project: int | None = None, tasks: list[int] | None = None, cache_dir: Path
) -> list[Path]:
    """Export ``project`` and/or ``tasks`` as CVAT for images 1.1 with images; cached zips.

    A cached zip is reused while the project's/task's ``updated_date`` is unchanged; older
    exports of the same project/task are removed once a newer one is complete.
    """
    if project is None and not tasks:
        raise UserError("--server needs --project ID or --tasks ID,ID to know what to download")
    host = hashlib.sha256(str(client.api_map.host).encode()).hexdigest()[:8]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = [("project", project)] if project is not None else []
    wanted += [("task", t) for t in tasks or []]
    return [_download(client, kind, obj_id, cache_dir, host) for kind, obj_id in wanted]


def _download(client, kind: str, obj_id: int, cache_dir: Path, host: str) -> Path:
    from cvat_sdk.core.proxies.types import Location

    repo = client.projects if kind == "project" else client.tasks
    try:
        entity = repo.retrieve(obj_id)
    except Exception as exc:  # cvat-sdk raises ApiException subclasses, or connection errors
        raise UserError(f"cannot read {kind} {obj_id} on the CVAT server ({exc})") from exc
    stamp = re.sub(r"[^0-9A-Za-z]+", "-", str(entity.updated_date)).strip("-")
    prefix = f"{host}-{kind}-{obj_id}-"
    target = cache_dir / f"{prefix}{stamp}.zip"
    if target.is_file():
        return target
    partial = cache_dir / f".{target.name}.partial"
    try:
        entity.export_dataset(EXPORT_FORMAT, partial, include_images=True, location=Location.LOCAL)
        os.replace(partial, target)
    except Exception as exc:  # idem
        raise UserError(f"exporting {kind} {obj_id} from the CVAT server failed ({exc})") from exc
    finally:
        partial.unlink(missing_ok=True)
    for old in cache_dir.glob(f"{prefix}*.zip"):
        if old != target:
            old.unlink(missing_ok=True)
    return target
