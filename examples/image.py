"""Image sharpening on an encrypted photo: a 3x3 sharpen convolution, computed in FHE.

As the provider: compile a fixed sharpen convolution (torch) to FHE for 64x64 gray images,
deploy it to a running cipherpool, start a worker and create an access token.
As the end user: encrypt every pixel of a small gray photo, let the platform sharpen it, and
decrypt the result; write original.png, sharpened_fhe.png and sharpened_clear.png to --out
(default ./example-output), compare the pixels with the model's answer in the clear, and
report the pixel error against the exact (float) convolution.

    cipherpool up                                   # in another shell
    export CIPHERPOOL_API_KEY=...                   # from `cipherpool admin account create NAME`
    python examples/image.py --out example-output
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.tutorials.image import grayscale_photo, pad, to_pixels, train_sharpen

MODEL = "example-image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("example-output"), help="where the PNGs go")
    out = parser.parse_args().out

    provider = ManagementClient()  # the key from CIPHERPOOL_API_KEY, the gateway of `cipherpool up`
    with tempfile.TemporaryDirectory() as tmp:
        print("compiling the model ...")
        module, quantized = train_sharpen(Path(tmp) / "model")
        provider.deploy_model(MODEL, Path(tmp) / "model", description="3x3 sharpen, 64x64 gray")
        worker = None
        try:
            provider.activate_model(MODEL)
            worker = provider.start_worker(MODEL)
            print(f"worker {worker.id} serves {MODEL!r} on node {worker.node}")
            token = provider.create_token(f"{MODEL}-user", model=MODEL)

            # The end user: the secret key stays in key_dir; only the evaluation key is uploaded.
            with QueryClient(token, key_dir=Path(tmp) / "keys") as user:
                user.generate_keys()
                user.upload_evaluation_keys()
                photo = grayscale_photo()
                image = pad(photo)  # one image, one channel, border repeated: (1, 66, 66)
                print("sharpening the encrypted photo ...")
                sharpened = to_pixels(user.predict(image))
        finally:
            if worker is not None:
                provider.stop_worker(worker.id)
            provider.delete_model(MODEL)

    # The pixels are the user's: what this script writes only its owner may read.
    os.umask(0o077)
    out.mkdir(parents=True, exist_ok=True)
    clear = to_pixels(quantized.forward(image[np.newaxis], fhe="disable"))  # the compiled model, in the clear
    exact = to_pixels(module(torch.tensor(image[np.newaxis])).detach().numpy())  # the float convolution
    for name, pixels in (("original", to_pixels(photo)), ("sharpened_fhe", sharpened), ("sharpened_clear", clear)):
        Image.fromarray(pixels).save(out / f"{name}.png")
    print(f"wrote original.png, sharpened_fhe.png and sharpened_clear.png to {out}")

    error = np.abs(sharpened.astype(int) - exact.astype(int))
    print(
        f"pixel error against the float convolution: max {error.max()} gray levels, "
        f"{int((error > 0).sum())} of {error.size} pixels off, mean {error.mean():.3f}"
    )
    difference = int(np.abs(sharpened.astype(int) - clear.astype(int)).max())
    print(f"{sharpened.size} pixels: max difference from the clear model {difference} gray levels")
    if difference != 0:
        sys.exit(f"FHE and clear disagree on {int((sharpened != clear).sum())} pixels")
    print("all 1 answers agree with the clear model")


if __name__ == "__main__":
    main()
