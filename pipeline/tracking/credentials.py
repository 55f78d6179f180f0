"""Credentials, redaction and the one-line errors of a refused login or an unreachable server
(docs: operations/outages.md, "Credentials").

Credentials reach MLflow only through its own environment variables, read by its REST client
per request; nothing here copies them into params, tags, artifacts or the spool. As a second
guard, every text the project logs has their values blanked, and tracking URIs are shown
without a ``user:password@``.
"""
from __future__ import annotations

import contextlib
import os
import re
import urllib.parse

import mlflow
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from ..config import UserError

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def public_uri(uri: str) -> str:
    """``uri`` without the ``user:password@`` part a URL may carry."""
    return _USERINFO.sub(r"\g<scheme>", uri or "")


def _secrets() -> list[str]:
    values = [os.environ.get(var) for var in _SECRET_VARS]
    with contextlib.suppress(Exception):
        values.append(urllib.parse.urlsplit(mlflow.get_tracking_uri()).password)
    return [v for v in values if v and len(v) >= 4]


def redact(text: str) -> str:
    """``text`` with credential values and URL user info replaced by ``***``."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


class TrackingError(UserError, RuntimeError):
    """The tracking server refused our credentials, or cannot be reached: one line, exit 2."""


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of a request the server answered, if ``error`` is one."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code
    if isinstance(error, RestException) or (isinstance(error, MlflowException)
                                            and "failed with error code" in str(error)):
        return error.get_http_status_code()
    return None


def chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server could not be reached or could not answer
    (refused or reset connection, timeout, HTTP 429 or 5xx): a later try may succeed. A
    request the server answered and refused (4xx: a bad value, no permission) is not one."""
    import requests
    import urllib3

    for e in chain(error):
        if isinstance(e, (requests.ConnectionError, requests.Timeout,
                          requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
                          urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        status = _http_status(e)
        if status is not None:
            return status in (429, 500, 502, 503, 504)
    return False


def access_error(error: BaseException, uri: str) -> TrackingError | None:
    """A one-line error for a refused login or an unreachable server, else None."""
    statuses = {_http_status(e) for e in chain(error)}
    where = public_uri(uri)
    if 401 in statuses:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            given = (f"it refused user {user!r} with the password in MLFLOW_TRACKING_PASSWORD; "
                     "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            given = "it refused the token in MLFLOW_TRACKING_TOKEN; check it"
        else:
            given = ("no credentials were given: set MLFLOW_TRACKING_USERNAME and "
                     "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        return TrackingError(f"tracking: authentication failed at {where}: {given} "
                             "(credentials are read from these variables only)")
    if 403 in statuses:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        return TrackingError(
            f"tracking: permission denied at {where}"
            + (f" for user {user!r}" if user else "")
            + ": ask the server's admin for access, or use another account "
              "(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)")
    if is_unreachable(error):
        return TrackingError(f"tracking: the tracking server at {where} cannot be reached "
                             f"({short(error)}); start it, or point MLFLOW_TRACKING_URI at "
                             "a running one")
    return None


_ACCESS_CHECKED: set[str] = set()


def refuse_file_store(uri: str) -> None:
    """MLflow 3 refuses its old file store (a folder or file: URI) with a paragraph inside
    a traceback, at the first call; here it is one line, before any data work."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    scheme = urllib.parse.urlparse(uri).scheme
    if (scheme == "file" or len(scheme) <= 1) and not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(f"tracking: MLFLOW_TRACKING_URI={uri} is MLflow's file store, which "
                            f"MLflow {mlflow.__version__} refuses; allowed: sqlite:///mlflow.db "
                            "(the default when it is unset), another database URI, or "
                            "http(s)://HOST:PORT (MLFLOW_ALLOW_FILE_STORE=true opts back in)")


def check_access() -> None:
    """One cheap authenticated read of a tracking server (not of a local store), so that a
    missing or wrong credential stops a run with one line before any data or device work.
    MLflow's own retries apply here: a server that is still starting is waited for."""
    uri = mlflow.get_tracking_uri()
    refuse_file_store(uri)
    if not uri.startswith(("http://", "https://")) or uri in _ACCESS_CHECKED:
        return
    no_url_with_credentials_on_stdout(uri)
    _check_answers(uri)
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is one of ours
        mine = access_error(e, uri)
        if mine is None:
            raise
        raise mine from None
    _ACCESS_CHECKED.add(uri)


def no_url_with_credentials_on_stdout(uri: str) -> None:
    """MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends; with a
    ``user:password@`` URI that line would carry the password, so it is turned off
    (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, unless set) for this process."""
    if public_uri(uri) != uri:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# Seconds one request may take once a run has started (spool.FAIL_FAST_ENV), and the one try
# a server that takes the connection gets to answer at the start of a run.
HTTP_REQUEST_TIMEOUT_S = 20


def _check_answers(uri: str) -> None:
    """A server that takes the connection and never answers: one line after one try of
    MLFLOW_HTTP_REQUEST_TIMEOUT (20 s unless set), where MLflow's client would wait 8 tries
    of 120 s (~20 min). A server that is still starting refuses the connection instead, and
    MLflow's retries in ``check_access`` wait for it; any answer at all (even an error page)
    passes, and refused, reset or TLS errors are left to MLflow's client."""
    import requests

    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or HTTP_REQUEST_TIMEOUT_S)
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).close()
    except requests.Timeout:
        raise TrackingError(f"tracking: the tracking server at {public_uri(uri)} took the "
                            f"connection but did not answer within {timeout:.0f} s "
                            "(MLFLOW_HTTP_REQUEST_TIMEOUT); check that it is running and not "
                            "overloaded, or point MLFLOW_TRACKING_URI at a running one") from None
    except requests.RequestException:
        pass


def short(error: BaseException) -> str:
    """The innermost cause of ``error``, in one short line."""
    inner = list(chain(error))[-1]
    text = " ".join(redact(str(inner)).split())
    return f"{type(inner).__name__}: {text[:160]}"
