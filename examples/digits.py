"""Digit recognition on encrypted images: which digit is this 8x8 picture?

As the provider: train a small quantized MLP on scikit-learn's handwritten digits, compile it
to FHE, deploy it to a running cipherpool, start a worker and create an access token.
As the end user: encrypt three test images, let the platform compute on them, and decrypt
the ten class probabilities, printed beside the model's answer in the clear.

    cipherpool up                                   # in another shell
    export CIPHERPOOL_API_KEY=...                   # from `cipherpool admin account create NAME`
    python examples/digits.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.examples import train_digits

MODEL = "example-digits"
IMAGES = 3
TOLERANCE = 1e-3  # probabilities: FHE and clear agree within this


def main() -> None:
    provider = ManagementClient()  # the key from CIPHERPOOL_API_KEY, the gateway of `cipherpool up`
    with tempfile.TemporaryDirectory() as tmp:
        print("training and compiling the model ...")
        example = train_digits(Path(tmp) / "model")
        print(f"clear test accuracy {example.accuracy:.1%}")
        provider.deploy_model(MODEL, example.path, description="8x8 handwritten digits")
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
                images = example.x_test[:IMAGES]
                fhe = user.predict(images)  # one row of ten probabilities per image
        finally:
            if worker is not None:
                provider.stop_worker(worker.id)
            provider.delete_model(MODEL)

    clear = example.clear(images)
    disagree = []
    for i in range(IMAGES):
        digit_fhe, digit_clear = int(fhe[i].argmax()), int(clear[i].argmax())
        agree = digit_fhe == digit_clear and float(np.abs(fhe[i] - clear[i]).max()) <= TOLERANCE
        print(
            f"test image {i}: FHE digit {digit_fhe} | clear digit {digit_clear} | truth {example.y_test[i]}"
            + ("" if agree else "  DISAGREE")
        )
        if not agree:
            disagree.append(f"test image {i}")
    if disagree:
        sys.exit(f"FHE and clear disagree on: {', '.join(disagree)}")
    print(f"all {IMAGES} answers agree with the clear model")


if __name__ == "__main__":
    main()
