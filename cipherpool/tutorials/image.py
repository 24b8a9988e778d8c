"""Image sharpening: a fixed 3x3 sharpen convolution, compiled from torch, run on an encrypted
photo. The end user downscales one of scikit-learn's sample photos to a small grayscale image,
encrypts every pixel, and decrypts the sharpened image; it is written as PNG beside the
original and the clear convolution.

The kernel is identity + a*Laplacian with a = 5/6, which 5-bit weights represent exactly
(concrete-ml quantizes the kernel's range [-5/6, 13/3] in steps of 1/6), and 8-bit gray levels
are the input's 8-bit quantization: the encrypted computation is exact integer arithmetic, so
the decrypted image equals the clear float convolution up to the last rounding. (The common
kernel with a = 1 has no exact 5-bit form: rounded it is off by up to 40 gray levels.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cipherpool.examples import save_deployment
from cipherpool.files import private_dir, write_private
from cipherpool.tutorials.base import Case, Reading, Trained, Tutorial

SIDE = 64  # pixels: the decrypted output is one ciphertext per pixel, ~8.6 kB each
AMOUNT = 5 / 6
KERNEL = [[0.0, -AMOUNT, 0.0], [-AMOUNT, 1 + 4 * AMOUNT, -AMOUNT], [0.0, -AMOUNT, 0.0]]
BITS = {"model_inputs": 8, "op_inputs": 8, "op_weights": 5, "model_outputs": 8}
PHOTO = 0  # china.jpg among scikit-learn's sample images
SCALE = 4  # the side-by-side PNG is enlarged this many times, so that pixels show


def grayscale_photo(index: int = PHOTO, side: int = SIDE) -> NDArray[Any]:
    """One of scikit-learn's sample photos, center-cropped square, downscaled to side x side
    gray levels in [0, 1] (float32)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[index]).convert("L")
    w, h = photo.size
    crop = min(w, h)
    photo = photo.crop(((w - crop) // 2, (h - crop) // 2, (w + crop) // 2, (h + crop) // 2))
    return np.asarray(photo.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def pad(image: NDArray[Any]) -> NDArray[Any]:
    """Repeat the border pixels (done by the client, in the clear): the convolution then keeps
    the image's size and its edges are not darkened by zero padding."""
    return np.pad(image, 1, mode="edge")[np.newaxis]  # (1, side + 2, side + 2): one channel


def sharpen_module() -> Any:
    import torch

    class Sharpen(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, bias=False)
            self.conv.weight.data = torch.tensor(KERNEL, dtype=torch.float32).view(1, 1, 3, 3)

        def forward(self, x: Any) -> Any:
            return self.conv(x)

    return Sharpen()


def train_sharpen(path: Path, side: int = SIDE) -> tuple[Any, Any]:
    """Compile the sharpen convolution for side x side images; returns (torch module,
    quantized module). Nothing is learned: the kernel is fixed; the calibration set only has
    to span the gray levels 0..1."""
    from concrete.ml.torch.compile import compile_torch_model

    module = sharpen_module()
    rng = np.random.default_rng(0)
    shape = (1, side + 2, side + 2)
    calibration = np.stack([np.zeros(shape), np.ones(shape), *rng.random((8, *shape))]).astype(np.float32)
    quantized = compile_torch_model(module, calibration, n_bits=BITS)
    save_deployment(quantized, path)
    return module, quantized


def to_pixels(output: NDArray[Any]) -> NDArray[np.uint8]:
    """A model output (any shape holding side x side values in gray units) as 8-bit pixels."""
    image = np.asarray(output, dtype=np.float64).reshape(output.shape[-2], output.shape[-1])
    pixels: NDArray[np.uint8] = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return pixels


class Sharpening(Tutorial):
    name = "image"
    title = "image sharpening: a 3x3 sharpen convolution on an encrypted photo"
    model = f"torch Conv2d 3x3 sharpen (fixed kernel), 8-bit pixels, 5-bit weights, {SIDE}x{SIDE} gray"
    writes_files = True

    def train(self, path: Path) -> Trained:
        import torch

        self.module, quantized = train_sharpen(path)
        self.photo = grayscale_photo()

        def clear(xs: NDArray[Any]) -> NDArray[Any]:
            result: NDArray[Any] = quantized.forward(xs, fhe="disable")
            return result

        def float_conv(x: NDArray[Any]) -> NDArray[Any]:  # the clear float convolution of one padded image
            result: NDArray[Any] = self.module(torch.tensor(x[np.newaxis])).detach().numpy()
            return result

        self.float_conv = float_conv
        return Trained(
            path,
            clear,
            f"fixed kernel, sharpening amount {AMOUNT:.3f}; no training",
            {"side": SIDE, "kernel": [[round(v, 4) for v in row] for row in KERNEL]},
        )

    def cases(self) -> list[Case]:
        return [Case(f"china.jpg, {SIDE}x{SIDE} gray", pad(self.photo))]

    def read(self, case: Case, decrypted: NDArray[Any], clear: NDArray[Any]) -> Reading:
        fhe, quantized = to_pixels(decrypted), to_pixels(clear)
        reference = to_pixels(self.float_conv(case.x))  # the clear float convolution
        error = np.abs(fhe.astype(int) - reference.astype(int))
        mse = float((error.astype(float) ** 2).mean())
        psnr = None if mse == 0 else float(10 * np.log10(255.0**2 / mse))  # None: identical (infinite PSNR)
        differing = int((fhe != quantized).sum())
        values = {
            "pixels": int(fhe.size),
            "pixels_differing_from_clear_model": differing,
            "max_error_vs_float_convolution": int(error.max()),
            "mean_error_vs_float_convolution": float(error.mean()),
            "psnr_db_vs_float_convolution": psnr,
        }
        return Reading(
            f"{fhe.size} pixels; vs float convolution: max error {int(error.max())}, mean {error.mean():.3f} gray levels",
            f"{quantized.size} pixels",
            differing == 0,
            values,
        )

    def finish(self, cases: list[Case], decrypted: list[NDArray[Any]], out_dir: Path | None) -> dict[str, str]:
        if out_dir is None or not decrypted:
            return {}
        from PIL import Image

        private_dir(out_dir)
        images = {
            "original": to_pixels(self.photo),
            "sharpened_fhe": to_pixels(decrypted[0]),
            "sharpened_clear": to_pixels(self.float_conv(cases[0].x)),
        }
        files: dict[str, str] = {}
        for role, pixels in images.items():
            files[role] = str(write_png(out_dir / f"{role}.png", Image.fromarray(pixels, mode="L")))
        gap = 4 * SCALE
        side = SIDE * SCALE
        strip = Image.new("L", (3 * side + 2 * gap, side), color=255)
        for i, pixels in enumerate(images.values()):
            strip.paste(Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.NEAREST), (i * (side + gap), 0))
        files["side_by_side"] = str(write_png(out_dir / "side_by_side.png", strip))
        return files


def write_png(path: Path, image: Any) -> Path:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_private(path, buffer.getvalue())
    return path
