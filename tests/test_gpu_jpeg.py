"""Which frames the GPU may decode, tested on the CPU with stand-ins for nvJPEG: the shared decoder
(PIL) is the truth; a GPU decoder that differs from it anywhere beyond the last bit is not used for
that chroma subsampling, and every frame its header does not vouch for goes to PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.io import ImageReadMode, decode_jpeg

from serverless.gpu_jpeg import FrameDecoder
from serverless.imageio import decode_image

CPU = torch.device("cpu")


def _frame(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    noisy = np.stack([x * 4, y * 5, x + y], -1) + rng.integers(0, 30, (h, w, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray | None = None, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frame() if array is None else array).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


class PilOnTheDevice:
    """A GPU decoder that returns exactly PIL's pixels, optionally off by ``error`` for 4:2:0."""

    def __init__(self, error: int = 0) -> None:
        self.error, self.calls = error, 0

    def __call__(self, data: bytes) -> torch.Tensor:
        self.calls += 1
        pixels = decode_image(data).astype(np.int16)
        with Image.open(io.BytesIO(data)) as img:
            if JpegImagePlugin.get_sampling(img) == 2:  # 4:2:0
                pixels = (pixels + self.error).clip(0, 255)
        return torch.from_numpy(pixels.astype(np.uint8)).permute(2, 0, 1)


def test_without_a_gpu_every_frame_is_decoded_by_pil():
    decoder = FrameDecoder(CPU)
    assert not decoder.on_gpu and decoder.differences == {}
    data = _jpeg()
    np.testing.assert_array_equal(decoder.decode(data), decode_image(data))


def test_a_decoder_with_pils_pixels_is_used_for_plain_jpegs():
    fake = PilOnTheDevice()
    decoder = FrameDecoder(CPU, decode_jpeg=fake)
    assert decoder.differences == {"4:4:4": 0, "4:2:2": 0, "4:2:0": 0}
    for subsampling in (0, 1, 2):
        data = _jpeg(subsampling=subsampling)
        calls = fake.calls
        decoded = decoder.decode(data)
        assert isinstance(decoded, torch.Tensor) and fake.calls == calls + 1
        np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), decode_image(data))


def test_a_subsampling_decoded_to_other_pixels_stays_with_pil():
    fake = PilOnTheDevice(error=2)
    decoder = FrameDecoder(CPU, decode_jpeg=fake)
    assert decoder.differences["4:2:0"] == 2 and decoder.subsamplings == {0, 1}
    assert isinstance(decoder.decode(_jpeg(subsampling=2)), np.ndarray)
    assert isinstance(decoder.decode(_jpeg(subsampling=0)), torch.Tensor)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(exif=exif.tobytes())


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frame()).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_png(), id="png"),
        pytest.param(_jpeg(mode="L"), id="grayscale"),
        pytest.param(_jpeg(mode="CMYK"), id="cmyk"),
        pytest.param(_jpeg(progressive=True), id="progressive"),
        pytest.param(_exif_rotated(), id="exif-rotated"),
    ],
)
def test_frames_the_header_does_not_vouch_for_go_to_pil(data):
    fake = PilOnTheDevice()
    decoder = FrameDecoder(CPU, decode_jpeg=fake)
    calls = fake.calls
    assert not decoder.accepts(data)
    decoded = decoder.decode(data)
    assert fake.calls == calls and isinstance(decoded, np.ndarray)
    np.testing.assert_array_equal(decoded, decode_image(data))  # EXIF rotation and CMYK included


def test_a_frame_over_the_pixel_limit_is_refused_by_the_shared_decoder():
    decoder = FrameDecoder(CPU, decode_jpeg=PilOnTheDevice())
    data = _jpeg()
    assert decoder.accepts(data, max_pixels=48 * 64) and not decoder.accepts(data, max_pixels=48 * 64 - 1)
    with pytest.raises(ValueError, match="over the limit of 3071"):
        decoder.decode(data, "image", max_pixels=48 * 64 - 1)


def test_a_jpeg_the_gpu_refuses_is_decoded_by_pil():
    fake = PilOnTheDevice()
    decoder = FrameDecoder(CPU, decode_jpeg=fake)

    def refuse(data: bytes) -> torch.Tensor:
        raise RuntimeError("nvjpegDecode failed (simulated)")

    decoder._gpu_decode = refuse
    data = _jpeg()
    np.testing.assert_array_equal(decoder.decode(data), decode_image(data))


def test_the_probe_measures_a_real_decoder():
    """torchvision's own JPEG decoder (libjpeg on the CPU) stands in for nvJPEG: the probe compares
    its pixels with PIL's as it will compare nvJPEG's. Without chroma upsampling (4:4:4) two
    libjpeg decoders agree to the last bit."""
    decoder = FrameDecoder(CPU, decode_jpeg=lambda data: decode_jpeg(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
    assert set(decoder.differences) == {"4:4:4", "4:2:2", "4:2:0"} and decoder.differences["4:4:4"] <= 1
    data = _jpeg(subsampling=0)
    decoded = decoder.decode(data)
    assert isinstance(decoded, torch.Tensor)
    difference = decoded.permute(1, 2, 0).numpy().astype(np.int16) - decode_image(data)
    assert np.abs(difference).max() <= 1
