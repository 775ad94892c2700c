"""The compute dtype on every GPU a lab has, with the GPU faked: what torch.cuda reports for a T4,
a V100, an A100, an H100 or a GTX 1080 (compute capabilities from NVIDIA's CUDA GPU list; bf16 is
native from 8.0 on, tensor cores from 7.0 on), and what PyTorch's ``is_bf16_supported`` answers
there: True on a T4 too by default, because it counts emulation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from serverless import main
from serverless.errors import DeviceError
from serverless.precision import choose_precision
from tests.conftest import module_dir
from tests.factories import make_bundle
from trainer.commands import main as cli
from trainer.commands.train import add_arguments, options
from trainer.training.engine import Precision

GPUS = {  # name: compute capability
    "Tesla T4": (7, 5),
    "Tesla V100-SXM2-16GB": (7, 0),
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA H100 80GB HBM3": (9, 0),
    "NVIDIA GeForce GTX 1080": (6, 1),
}
CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(name)`` makes torch.cuda describe that GPU; ``keyword=False`` fakes a torch older than
    2.4, whose is_bf16_supported takes no argument."""

    def fake(name: str, keyword: bool = True) -> None:
        capability = GPUS[name]

        def is_bf16_supported(including_emulation: bool = True) -> bool:
            return capability >= (8, 0) or including_emulation  # torch emulates bf16 on any GPU

        def old_is_bf16_supported() -> bool:
            return capability >= (8, 0)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", is_bf16_supported if keyword else old_is_bf16_supported
        )

    return fake


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Tesla T4", "fp16"),
        ("Tesla V100-SXM2-16GB", "fp16"),
        ("NVIDIA A100-SXM4-80GB", "bf16"),
        ("NVIDIA H100 80GB HBM3", "bf16"),
        ("NVIDIA GeForce GTX 1080", "fp32"),
    ],
)
@pytest.mark.parametrize("keyword", [True, False])
def test_auto_follows_native_support_not_emulation(gpu, name, expected, keyword):
    gpu(name, keyword=keyword)
    assert torch.cuda.is_bf16_supported() or not keyword  # torch's default answer is yes even on a T4
    choice = choose_precision(CUDA)
    assert choice.name == expected
    assert name in choice.reason and "compute capability" in choice.reason
    assert choice.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[expected]
    assert choice.autocast == (expected != "fp32")


@pytest.mark.parametrize("requested", ["auto", "bf16", "fp16", "off"])
def test_the_cpu_always_computes_in_fp32(requested):
    choice = choose_precision(torch.device("cpu"), requested)
    assert choice.name == "fp32" and not choice.autocast


@pytest.mark.parametrize(
    "name, requested, expected",
    [
        ("NVIDIA A100-SXM4-80GB", "fp16", "fp16"),
        ("NVIDIA A100-SXM4-80GB", "off", "fp32"),
        ("NVIDIA H100 80GB HBM3", "bf16", "bf16"),
        ("Tesla T4", "off", "fp32"),
        ("NVIDIA GeForce GTX 1080", "fp16", "fp16"),
    ],
)
def test_a_requested_dtype_overrides_the_choice(gpu, name, requested, expected):
    gpu(name)
    choice = choose_precision(CUDA, requested)
    assert choice.name == expected and f"asked for {requested}" in choice.reason


@pytest.mark.parametrize("name", ["Tesla T4", "Tesla V100-SXM2-16GB"])
def test_bf16_is_refused_where_it_would_be_emulated(gpu, name):
    gpu(name)
    with pytest.raises(DeviceError, match=rf"precision bf16: the GPU \({name}.*use fp16, off or auto"):
        choose_precision(CUDA, "bf16")


def test_an_unknown_mode_is_refused():
    with pytest.raises(DeviceError, match="expected one of auto, bf16, fp16, off"):
        choose_precision(torch.device("cpu"), "fp8")


@pytest.mark.parametrize(
    "name, dtype, scaled",
    [("Tesla T4", torch.float16, True), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False)],
)
def test_training_scales_gradients_only_in_fp16(gpu, name, dtype, scaled):
    gpu(name)
    precision = Precision(CUDA)
    assert precision.enabled and precision.dtype == dtype
    assert precision.scaler.is_enabled() == scaled
    assert not Precision(CUDA, "off").enabled and not Precision(CUDA, "off").scaler.is_enabled()
    assert Precision(CUDA, "fp16").scaler.is_enabled()


def test_training_on_the_cpu_has_no_autocast_and_no_scaler():
    precision = Precision(torch.device("cpu"))
    assert not precision.enabled and precision.dtype == torch.float32
    assert not precision.scaler.is_enabled()


def _train_options(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options(parser.parse_args(argv))[1]


@pytest.mark.parametrize(
    "argv, yaml_text, expected",
    [
        ([], "", "auto"),
        (["--amp", "fp16"], "", "fp16"),
        (["--amp", "off"], "amp: bf16\n", "off"),
        ([], "amp: false\n", "off"),  # configs written before --amp took a mode
        ([], "amp: true\n", "auto"),
        ([], "amp: bf16\n", "bf16"),
    ],
)
def test_amp_option_from_flags_and_config(tmp_path, argv, yaml_text, expected):
    config = tmp_path / "train.yaml"
    config.write_text(yaml_text)
    assert _train_options([*argv, "--config", str(config)]).amp == expected


def test_a_bad_amp_value_is_one_line(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("amp: fp8\n")
    assert cli(["train", "x.zip", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == "error: amp: 'fp8' is not one of auto, bf16, fp16, off"
    with pytest.raises(SystemExit):
        cli(["train", "x.zip", "--amp", "fp8"])
    assert "--amp: 'fp8' is not one of auto, bf16, fp16, off" in capsys.readouterr().err


class _Logger:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def info_with(self, message: str, **kw) -> None:
        self.records.append((message, kw))


class _Context:
    def __init__(self) -> None:
        self.logger = _Logger()
        self.user_data = type("UserData", (), {})()


@pytest.fixture(scope="module")
def bundle(request):
    with module_dir(request, "bundle") as folder:
        yield make_bundle(folder, ["cell"], min_size=64, max_size=96)


def test_the_function_logs_its_precision_and_decoder_at_start(bundle, monkeypatch):
    monkeypatch.setenv("CVAT_DETECTOR_BUNDLE", str(bundle))
    monkeypatch.setenv("CVAT_DETECTOR_DEVICE", "cpu")
    monkeypatch.setenv("CVAT_DETECTOR_PRECISION", "fp16")
    context = _Context()
    main.init_context(context)
    (message, fields), = context.logger.records
    assert message == "cvat-detector model loaded"
    assert fields["precision"].startswith("fp32 (cpu:")  # the CPU ignores a GPU dtype
    assert context.user_data.detector.precision.name == "fp32"
    assert fields["gpu_jpeg"] == "off" and not context.user_data.decoder.on_gpu  # no GPU here


def test_the_function_refuses_an_unknown_precision(bundle, monkeypatch):
    monkeypatch.setenv("CVAT_DETECTOR_BUNDLE", str(bundle))
    monkeypatch.setenv("CVAT_DETECTOR_PRECISION", "half")
    with pytest.raises(ValueError) as error:
        main.init_context(_Context())
    assert str(error.value) == (
        "environment variable CVAT_DETECTOR_PRECISION: expected one of auto, bf16, fp16, off, got 'half'"
    )
