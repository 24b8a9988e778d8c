"""Health analysis on encrypted data: is a breast tumour malignant?

As the provider: train a small XGBoost model on scikit-learn's breast-cancer table, compile
it to FHE, deploy it to a running cipherpool, start a worker and create an access token.
As the end user: encrypt three patients' measurements (one malignant tumour, two benign), let
the platform compute on them, and decrypt the probability of malignancy, printed beside the
model's answer in the clear.

    cipherpool up                                   # in another shell
    export CIPHERPOOL_API_KEY=...                   # from `cipherpool admin account create NAME`
    python examples/health.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.tutorials.health import train_health

MODEL = "example-health"
PATIENTS = 3
TOLERANCE = 1e-3  # probabilities: FHE and clear agree within this


def main() -> None:
    provider = ManagementClient()  # the key from CIPHERPOOL_API_KEY, the gateway of `cipherpool up`
    with tempfile.TemporaryDirectory() as tmp:
        print("training and compiling the model ...")
        model, x_test, y_test, accuracy = train_health(Path(tmp) / "model")
        print(f"clear test accuracy {accuracy:.1%}")
        # One malignant patient and two benign ones (in scikit-learn's table, 0 is malignant).
        chosen = [*np.flatnonzero(y_test == 0)[:1], *np.flatnonzero(y_test == 1)[: PATIENTS - 1]]
        patients = x_test[chosen]
        provider.deploy_model(MODEL, Path(tmp) / "model", description="breast cancer: P(malignant)")
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
                fhe = user.predict(patients)[:, 0]  # class 0: malignant
        finally:
            if worker is not None:
                provider.stop_worker(worker.id)
            provider.delete_model(MODEL)

    clear = model.predict_proba(patients, fhe="disable")[:, 0]
    disagree = []
    for i, p_fhe, p_clear in zip(chosen, fhe, clear):
        agree = abs(p_fhe - p_clear) <= TOLERANCE and (p_fhe >= 0.5) == (p_clear >= 0.5)
        truth = "malignant" if y_test[i] == 0 else "benign"
        print(
            f"patient {i}: FHE P(malignant) {p_fhe:.3f} | clear {p_clear:.3f} | truth {truth}" + ("" if agree else "  DISAGREE")
        )
        if not agree:
            disagree.append(f"patient {i}")
    if disagree:
        sys.exit(f"FHE and clear disagree on: {', '.join(disagree)}")
    print(f"all {len(fhe)} answers agree with the clear model")


if __name__ == "__main__":
    main()
