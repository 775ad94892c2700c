"""The session with a CVAT server: logging in, its errors as one line, and export downloads.

Credentials come from the environment or cvat-sdk's saved profiles, never from the command line
(where they would end up in shell history and process listings). Every server call of a command
runs inside :func:`server_errors`, so a wrong id, a bad token or a server that is down is one line
that says what to check, never cvat-sdk's multi-line dump of HTTP headers. Exports are cached per
project/task and its ``updated_date``: re-running a training does not re-export an unchanged
project, and any annotation change makes CVAT bump the date and the export is fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serverless.errors import UserError

#: What to check, by HTTP status of a failed call.
HINTS = {
    400: "the server refused the request as sent (for a login: wrong user name or password)",
    401: "check CVAT_ACCESS_TOKEN, or CVAT_USER and CVAT_PASSWORD",
    403: "your CVAT user may not do this; ask an owner of the project or task for access",
    404: "check the project or task id, and that your CVAT user can see it",
}

EXPORT_FORMAT = "CVAT for images 1.1"


def connect(url: str):
    """A logged-in ``cvat_sdk.Client`` for ``url``.

    Credentials, first found wins: $CVAT_ACCESS_TOKEN (a personal access token), $CVAT_USER with
    $CVAT_PASSWORD, or a cvat-sdk profile saved for this server (``cvat-cli profile``).
    """
    from cvat_sdk import make_client
    from cvat_sdk.core.auth import AuthStore, make_client_from_profile
    from cvat_sdk.core.exceptions import AuthStoreError

    logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # its warnings dump HTTP headers
    token = os.environ.get("CVAT_ACCESS_TOKEN")
    user, password = os.environ.get("CVAT_USER"), os.environ.get("CVAT_PASSWORD")
    with server_errors(url, "cannot log in"):
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
        except (TypeError, ValueError) as exc:  # cvat-sdk could not read the answer as CVAT's
            raise UserError(
                f"{url}: does not answer like a CVAT server ({type(exc).__name__}); give the address "
                "CVAT's web page opens at, e.g. https://cvat.example.org"
            ) from exc
    raise UserError(
        f"{url}: no CVAT credentials; set CVAT_ACCESS_TOKEN (a personal access token), or "
        "CVAT_USER and CVAT_PASSWORD, in the environment, or save a cvat-cli profile for it"
    )


@contextmanager
def server_errors(url: str, doing: str = "", then: str = "") -> Iterator[None]:
    """CVAT's HTTP and connection errors as one line: what failed, the status, what to check.

    ``doing`` names the action ("cannot log in"); ``then`` is appended (what the user can do).
    """
    from cvat_sdk.api_client.exceptions import ApiException, OpenApiException
    from urllib3.exceptions import HTTPError

    prefix = f"{url}: {doing + ': ' if doing else ''}"
    suffix = f"; {then}" if then else ""
    try:
        yield
    except ApiException as exc:
        hint = HINTS.get(exc.status, "")
        status = f"{exc.status} {exc.reason}".strip() if exc.status else str(exc.reason or "no answer")
        raise UserError(
            f"{prefix}the CVAT server answered {status}" + (f" ({hint})" if hint else "") + suffix
        ) from exc
    except OpenApiException as exc:  # an answer cvat-sdk cannot read: not this CVAT's API
        raise UserError(
            f"{prefix}unexpected answer from the CVAT server ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}){suffix}"
        ) from exc
    except (HTTPError, OSError) as exc:  # refused, timed out, TLS, DNS: urllib3 and socket errors
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:200]
        raise UserError(
            f"{prefix}cannot reach the CVAT server ({reason}); check the URL and that the server "
            f"is up{suffix}"
        ) from exc


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
    url = str(client.api_map.host)
    with server_errors(url, f"cannot read {kind} {obj_id}"):
        entity = repo.retrieve(obj_id)
    stamp = re.sub(r"[^0-9A-Za-z]+", "-", str(entity.updated_date)).strip("-")
    prefix = f"{host}-{kind}-{obj_id}-"
    target = cache_dir / f"{prefix}{stamp}.zip"
    if target.is_file():
        return target
    partial = cache_dir / f".{target.name}.partial"
    try:
        with server_errors(url, f"exporting {kind} {obj_id} from the server failed"):
            entity.export_dataset(EXPORT_FORMAT, partial, include_images=True, location=Location.LOCAL)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    for old in cache_dir.glob(f"{prefix}*.zip"):
        if old != target:
            old.unlink(missing_ok=True)
    return target
