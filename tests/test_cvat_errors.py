"""Every CVAT server failure a user can meet is one line with exit code 2, through the real cvat-sdk
against a stand-in server on loopback: a wrong id, refused credentials, a server that is down, an
address that is not CVAT's."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer.commands import main

ABOUT = {"name": "Computer Vision Annotation Tool", "description": "", "version": "2.64.1",
         "logo_url": "", "subtitle": ""}


def _server(answer) -> Iterator[str]:
    """A loopback HTTP server whose GET answers are ``answer(path) -> (status, body bytes, type)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, body, kind = answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _json(status: int, data: dict) -> tuple[int, bytes, str]:
    return status, json.dumps(data).encode(), "application/json"


@pytest.fixture
def cvat_without_project_3() -> Iterator[str]:
    def answer(path):
        if path.startswith("/api/server/about"):
            return _json(200, ABOUT)
        return _json(404, {"detail": "Not found."})

    yield from _server(answer)


@pytest.fixture
def cvat_refusing_everyone() -> Iterator[str]:
    yield from _server(lambda path: _json(401, {"detail": "Invalid token."}))


@pytest.fixture
def not_cvat() -> Iterator[str]:
    yield from _server(lambda path: (200, b"<html>a wiki</html>", "text/html"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


@pytest.mark.parametrize("command", [["inspect", "--project", "3"], ["train", "--tasks", "3"],
                                     ["crop", "--out", "crops", "--project", "3"]])
def test_a_wrong_id_says_which_and_what_to_check(cvat_without_project_3, command, monkeypatch,
                                                 tmp_path, capsys):
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "token")
    monkeypatch.chdir(tmp_path)
    assert main([command[0], "--server", cvat_without_project_3, *command[1:]]) == 2
    line = _one_error_line(capsys)
    assert "answered 404 Not Found" in line and "check the project or task id" in line
    assert ("project 3" if "--project" in command else "task 3") in line


@pytest.mark.parametrize("env", [{"CVAT_ACCESS_TOKEN": "expired"},
                                 {"CVAT_USER": "ann", "CVAT_PASSWORD": "wrong"}])
def test_refused_credentials_name_the_variables_to_check(cvat_refusing_everyone, env, monkeypatch,
                                                         capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["inspect", "--server", cvat_refusing_everyone, "--project", "3"]) == 2
    line = _one_error_line(capsys)
    assert "401 Unauthorized" in line and "CVAT_USER and CVAT_PASSWORD" in line


def test_a_server_that_is_down_is_one_line(monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CVAT_USER", "ann")
    monkeypatch.setenv("CVAT_PASSWORD", "secret")
    assert main(["inspect", "--server", f"http://127.0.0.1:{port}", "--tasks", "3"]) == 2
    assert "cannot reach the CVAT server" in _one_error_line(capsys)


def test_an_address_that_is_not_cvat_says_so(not_cvat, monkeypatch, capsys):
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "token")
    assert main(["inspect", "--server", not_cvat, "--project", "3"]) == 2
    assert "CVAT" in _one_error_line(capsys)


def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(tmp_path, shared_bundle, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    bundle = shared_bundle(["cell", "debris"])
    argv = ["predict", str(bundle), "--images", str(tmp_path / "images"), "--device", "cuda",
            "--out", str(tmp_path / "p.json")]
    assert main(argv) == 2
    assert "no CUDA GPU is visible" in _one_error_line(capsys)
