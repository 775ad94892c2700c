"""Frame bytes → what :meth:`Detector.detect` takes, decoding JPEGs on the GPU where that gives the
shared decoder's pixels.

A whole-task run sends JPEG frames one after another; decoding a 1920x1080 one takes PIL tens of
milliseconds of one CPU core, and its pixels then cross PCIe at 6 MB a frame. nvJPEG through
``torchvision.io.decode_jpeg(device="cuda")`` moves the compressed bytes and decodes on the device.
Whether that wins is measured on a GPU (benchmarks/gpu_suite.py); what it must never do is serve
other pixels than :func:`serverless.imageio.decode_image`, which training read (train/serve parity).
So the GPU decodes a frame only when:

- the device is a CUDA GPU and torchvision's ``decode_jpeg`` takes ``device=``;
- at start-up, probe JPEGs of the frame's chroma subsampling (4:4:4, 4:2:2, 4:2:0, as PIL writes
  them) decoded on the GPU were within :data:`MAX_DIFFERENCE` of PIL's pixels everywhere;
- the frame's header (read by PIL without decoding pixels) says: an 8-bit, 3-component YCbCr JPEG,
  sequential (not progressive), EXIF orientation absent or 1, within the pixel limit.

Anything else (PNG, grayscale, CMYK/YCCK, progressive, rotated, a JPEG nvJPEG refuses) is decoded
by ``decode_image`` as before.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

from serverless.imageio import MAX_PIXELS, decode_image

#: Largest per-pixel difference from PIL's pixels accepted in the probe (gray levels): the last-bit
#: rounding of an integer IDCT; chroma upsampled another way differs by far more and is refused.
MAX_DIFFERENCE = 1
#: PIL's names of the chroma subsamplings (JpegImagePlugin.get_sampling, ``subsampling=`` of save).
SUBSAMPLINGS = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}

Decode = Callable[[bytes], torch.Tensor]  # JPEG bytes -> 3xHxW uint8 RGB on the device


class FrameDecoder:
    """Decodes request frames: on the GPU for the JPEGs it may (module docstring), else with PIL.

    ``decode_jpeg`` replaces torchvision's GPU decoder (tests); ``enabled=False`` never uses it.
    """

    def __init__(self, device: torch.device, enabled: bool = True, decode_jpeg: Decode | None = None):
        self.device = device
        self._gpu_decode = decode_jpeg or (gpu_decoder(device) if enabled else None)
        #: Probe result per subsampling name: largest difference from PIL's pixels.
        self.differences: dict[str, int] = {}
        if self._gpu_decode is not None:
            self.differences = {name: self._probe(code) for code, name in SUBSAMPLINGS.items()}
        self.subsamplings = {
            code for code, name in SUBSAMPLINGS.items() if self.differences.get(name, 256) <= MAX_DIFFERENCE
        }

    @property
    def on_gpu(self) -> bool:
        return bool(self.subsamplings)

    def decode(
        self, data: bytes, source: str = "image", max_pixels: int = MAX_PIXELS
    ) -> np.ndarray | torch.Tensor:
        """A 3xHxW uint8 tensor on the GPU when it may decode ``data``, else ``decode_image``'s
        HxWx3 array (which raises ImageDecodeError for what is not an image)."""
        if self.subsamplings and self.accepts(data, max_pixels):
            decoded = self._try_gpu(data)
            if decoded is not None:
                return decoded
        return decode_image(data, source, max_pixels)

    def accepts(self, data: bytes, max_pixels: int = MAX_PIXELS) -> bool:
        """Whether ``data`` is a JPEG the GPU decodes to PIL's pixels (from its header alone)."""
        if data[:2] != b"\xff\xd8":
            return False
        try:
            with Image.open(io.BytesIO(data)) as img:
                if not isinstance(img, JpegImagePlugin.JpegImageFile) or img.mode != "RGB":
                    return False  # grayscale, CMYK/YCCK
                w, h = img.size
                return (
                    img.bits == 8
                    and not img.info.get("progressive")
                    and img.info.get("adobe_transform", 1) != 0  # 0: stored as RGB, not YCbCr
                    and img.getexif().get(0x0112, 1) == 1
                    and JpegImagePlugin.get_sampling(img) in self.subsamplings
                    and w * h <= max_pixels
                )
        except Exception:  # a header PIL cannot read: decode_image says why
            return False

    def _try_gpu(self, data: bytes) -> torch.Tensor | None:
        try:
            return self._gpu_decode(data)
        except RuntimeError:  # what nvJPEG refuses (or has no memory for), PIL decodes
            return None

    def _probe(self, subsampling: int) -> int:
        """Largest difference between GPU and PIL pixels of a probe JPEG (256: the GPU failed)."""
        data = probe_jpeg(subsampling)
        expected = decode_image(data)
        decoded = self._try_gpu(data)
        if decoded is None or tuple(decoded.shape) != (3, *expected.shape[:2]):
            return 256
        pixels = decoded.permute(1, 2, 0).cpu().numpy().astype(np.int16)
        return int(np.abs(pixels - expected).max())


def gpu_decoder(device: torch.device) -> Decode | None:
    """torchvision's nvJPEG decoder on ``device``, or None where there is none."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # a torchvision without image decoding (deprecated in 0.29 for torchcodec)
        return None
    if "device" not in inspect.signature(decode_jpeg).parameters:
        return None

    def decode(data: bytes) -> torch.Tensor:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    return decode


def probe_jpeg(subsampling: int, size: tuple[int, int] = (192, 256)) -> bytes:
    """A camera-like JPEG (gradients, hard edges, noise) with PIL's ``subsampling`` code."""
    h, w = size
    rng = np.random.default_rng(subsampling)
    y, x = np.mgrid[:h, :w].astype(np.float32)
    image = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    image[h // 4 : h // 2, w // 3 : w // 2] = (250, 20, 60)  # saturated edges stress chroma upsampling
    image += rng.normal(0, 8, image.shape)
    buf = io.BytesIO()
    pixels = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    pixels.save(buf, "JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue()
