"""The dtype the network computes in, chosen by what the GPU really supports.

One decision for the trainer and the function alike. ``torch.cuda.is_bf16_supported()`` alone says
yes on a T4 or V100, where bf16 is only emulated and cuDNN has no bf16 convolutions, so:

- bf16 autocast on a GPU of compute capability 8.0 or newer (A100, L4, H100, RTX 30xx...) that
  PyTorch confirms runs bf16 natively (``including_emulation=False`` where torch has the keyword);
- fp16 autocast on older GPUs with tensor cores (7.x: V100, T4, RTX 20xx); training adds a gradient
  scaler, since fp16 gradients underflow;
- fp32 on GPUs without tensor cores (6.x: a GTX 1080 runs fp16 at 1/64 of its fp32 rate) and on the
  CPU, where autocast gains nothing for these detectors.

``requested`` overrides the choice for users who know better: ``bf16`` or ``fp16`` forces that dtype
on any GPU (bf16 is refused where it is not native, since it would be emulated), ``off`` is fp32.
torch is imported where a device is looked at, so that the trainer's option parser can list
:data:`MODES` without loading it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serverless.errors import DeviceError

if TYPE_CHECKING:
    import torch

#: What a user may ask for: ``auto`` lets :func:`choose_precision` decide.
MODES = ("auto", "bf16", "fp16", "off")
#: Environment variable of the Nuclio function holding its mode (MODES; default auto).
PRECISION_ENV = "CVAT_DETECTOR_PRECISION"
#: First compute capability with native bf16 (Ampere).
BF16_CAPABILITY = (8, 0)
#: First compute capability with tensor cores (Volta): below it fp16 is not faster than fp32.
FP16_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class PrecisionChoice:
    """The chosen compute dtype and why, as the start-up logs print it."""

    name: str  # "bf16", "fp16" or "fp32"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def autocast(self) -> bool:
        """Whether the forward pass runs under autocast (fp32 runs without it)."""
        return self.name != "fp32"

    def context(self, device: torch.device) -> torch.autocast:
        """The autocast context of a forward pass on ``device``."""
        import torch

        return torch.autocast(device.type, dtype=self.dtype, enabled=self.autocast)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def choose_precision(device: torch.device, requested: str = "auto") -> PrecisionChoice:
    """The compute dtype for ``device`` (see the module docstring); ``requested`` is one of MODES."""
    if requested not in MODES:
        raise DeviceError(f"precision {requested!r}: expected one of {', '.join(MODES)}")
    if device.type != "cuda":
        return PrecisionChoice("fp32", f"{device.type}: autocast is used on CUDA GPUs only")
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    native = native_bf16(device)
    if requested == "off":
        return PrecisionChoice("fp32", f"{gpu}; asked for off")
    if requested == "fp16":
        return PrecisionChoice("fp16", f"{gpu}; asked for fp16")
    if requested == "bf16":
        if not native:
            raise DeviceError(
                f"precision bf16: the GPU ({gpu}) has no native bf16 (needs compute capability "
                f"{BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]}+); use fp16, off or auto"
            )
        return PrecisionChoice("bf16", f"{gpu}; asked for bf16")
    if native:
        return PrecisionChoice("bf16", f"{gpu}: native bf16")
    if (major, minor) >= FP16_CAPABILITY:
        return PrecisionChoice("fp16", f"{gpu}: no native bf16, fp16 tensor cores")
    return PrecisionChoice("fp32", f"{gpu}: no tensor cores, fp16 would not be faster")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware, not by emulation."""
    import torch

    if torch.cuda.get_device_capability(device) < BF16_CAPABILITY:
        return False
    supported = torch.cuda.is_bf16_supported
    with torch.cuda.device(device):  # it answers for the current device
        if "including_emulation" in inspect.signature(supported).parameters:  # torch >= 2.4
            return bool(supported(including_emulation=False))
        return bool(supported())  # older torch: past the capability check, a CUDA 11+ build
