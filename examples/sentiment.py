"""Sentiment analysis on encrypted text: is a sentence positive or negative?

As the provider: train a logistic regression over a bag of words (the VADER lexicon), compile
it to FHE, deploy it to a running cipherpool, start a worker and create an access token.
As the end user: turn each sentence into its bag of words, encrypt it, let the platform
compute on it, and decrypt the probability that it is positive, printed beside the model's
answer in the clear. Sentences come from the command line, else three defaults.

    cipherpool up                                   # in another shell
    export CIPHERPOOL_API_KEY=...                   # from `cipherpool admin account create NAME`
    python examples/sentiment.py "What a lovely day." "The service was awful."
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from cipherpool.client import ManagementClient, QueryClient
from cipherpool.tutorials.sentiment import train_sentiment

MODEL = "example-sentiment"
SENTENCES = [
    "I love this wonderful movie, the actors were brilliant!",
    "A boring, awful film. I hated the ending.",
    "What a great day: everyone was kind and helpful.",
]
TOLERANCE = 1e-3  # probabilities: FHE and clear agree within this


def main() -> None:
    sentences = sys.argv[1:] or SENTENCES
    provider = ManagementClient()  # the key from CIPHERPOOL_API_KEY, the gateway of `cipherpool up`
    with tempfile.TemporaryDirectory() as tmp:
        print("training and compiling the model ...")
        model, vocabulary, _ = train_sentiment(Path(tmp) / "model")
        provider.deploy_model(MODEL, Path(tmp) / "model", description="sentence sentiment: P(positive)")
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
                words = np.stack([vocabulary.vector(s) for s in sentences])  # one row of 0/1 per sentence
                fhe = user.predict(words)[:, 1]  # class 1: positive
        finally:
            if worker is not None:
                provider.stop_worker(worker.id)
            provider.delete_model(MODEL)

    clear = model.predict_proba(words, fhe="disable")[:, 1]
    disagree = []
    for sentence, p_fhe, p_clear in zip(sentences, fhe, clear):
        agree = abs(p_fhe - p_clear) <= TOLERANCE and (p_fhe >= 0.5) == (p_clear >= 0.5)
        verdict = "positive" if p_fhe >= 0.5 else "negative"
        print(f"{sentence!r}: FHE {verdict} (P {p_fhe:.3f}) | clear P {p_clear:.3f}" + ("" if agree else "  DISAGREE"))
        if not agree:
            disagree.append(repr(sentence))
    if disagree:
        sys.exit(f"FHE and clear disagree on: {', '.join(disagree)}")
    print(f"all {len(sentences)} answers agree with the clear model")


if __name__ == "__main__":
    main()
