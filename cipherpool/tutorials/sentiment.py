"""Sentiment analysis: is a sentence positive or negative? A logistic regression over a bag of
words, trained without any download on the VADER sentiment lexicon (7,500 words rated by
people, shipped by the ``vaderSentiment`` package). The end user turns a sentence into the
bag of words on their own machine, encrypts it, and decrypts the model's score.

Training data: every lexicon word alone, labelled by the sign of its rating, and 30,000
random short "sentences" of lexicon words, labelled by the sign of their summed rating; the
classifier learns a weight per word. It reads words, not grammar: "not good" counts "good".

The platform computes a dot product of encrypted word indicators with the weights: no table
lookup, so no evaluation key to speak of. Concrete sizes the integers from a calibration set;
it holds the most positive and the most negative texts of up to ``MAX_WORDS`` lexicon words,
so any text with at most that many distinct sentiment words is computed exactly. Longer texts
are refused on the client, before anything is encrypted.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cipherpool.errors import InvalidInput
from cipherpool.examples import save_deployment
from cipherpool.tutorials.base import Case, Reading, Trained, Tutorial

SEED = 0
SENTENCES = 30_000
HELD_OUT = 2_000
MAX_WORDS = 32  # distinct lexicon words in one text
BITS = {"op_inputs": 2, "op_weights": 8}
TOLERANCE = 1e-3
WORD = re.compile(r"[a-z][a-z'-]*")
TEXTS = [
    "I love this wonderful movie, the actors were brilliant!",
    "A boring, awful film. I hated the ending.",
    "The food was fine but the service was slow and rude.",
    "What a great day: everyone was kind and helpful.",
]


@cache
def lexicon() -> dict[str, float]:
    """VADER's word ratings (mean of ten raters, -4..4), words only (no emoticons)."""
    from importlib.resources import files

    ratings: dict[str, float] = {}
    text = files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        word, rating = line.split("\t")[:2]
        if WORD.fullmatch(word):
            ratings[word] = float(rating)
    return ratings


class Vocabulary:
    """The lexicon's words, in a fixed order: a text becomes a 0/1 vector (word present or not)."""

    def __init__(self, words: list[str]):
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    def words_of(self, text: str) -> list[str]:
        seen: dict[str, None] = {}
        for word in WORD.findall(text.lower()):
            if word in self.index:
                seen[word] = None
        return list(seen)

    def check(self, text: str) -> list[str]:
        """The text's lexicon words, or a typed error saying why the model cannot read it: an
        empty bag carries no sentiment, and more words than the circuit was compiled for would
        leave its calibrated range."""
        if not text.strip():
            raise InvalidInput("An empty text has no sentiment to read; pass a sentence with --text.")
        words = self.words_of(text)
        if not words:
            raise InvalidInput(
                f"{text!r} holds no word of the VADER lexicon, so the model sees an empty bag; "
                "use words that carry sentiment (good, awful, love, boring …)."
            )
        if len(words) > MAX_WORDS:
            raise InvalidInput(
                f"This text holds {len(words)} sentiment words; the model was compiled for at most "
                f"{MAX_WORDS}. Split it into shorter texts."
            )
        return words

    def vector(self, text: str) -> NDArray[np.float32]:
        words = self.check(text)
        x = np.zeros(len(self.words), dtype=np.float32)
        x[[self.index[w] for w in words]] = 1.0
        return x


def random_sentences(ratings: NDArray[Any], count: int, rng: np.random.Generator) -> tuple[Any, NDArray[Any]]:
    """Sparse bags of 1-6 distinct random lexicon words, labelled (1: positive) by the sign of
    their summed rating; ties are left out."""
    from scipy.sparse import csr_matrix

    lengths = rng.integers(1, 7, count)
    rows = np.repeat(np.arange(count), lengths)
    cols = np.concatenate([rng.choice(len(ratings), k, replace=False) for k in lengths])
    sentences = csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(count, len(ratings)))
    scores = sentences @ ratings
    keep = scores != 0
    return sentences[keep], (scores[keep] > 0).astype(np.int64)


def training_set(ratings: NDArray[Any], rng: np.random.Generator) -> tuple[Any, NDArray[Any]]:
    """Each rated word alone, labelled by its sign, then random sentences."""
    from scipy.sparse import csr_matrix, vstack

    rated = np.flatnonzero(ratings)
    singles = csr_matrix((np.ones(len(rated), np.float32), (np.arange(len(rated)), rated)), shape=(len(rated), len(ratings)))
    sentences, labels = random_sentences(ratings, SENTENCES, rng)
    return vstack([singles, sentences]).tocsr(), np.concatenate([(ratings[rated] > 0).astype(np.int64), labels])


def vocabulary_of_lexicon() -> Vocabulary:
    return Vocabulary(sorted(lexicon()))


def check_texts(texts: list[str]) -> None:
    """Refuse unreadable texts before anything starts (no stack, no training)."""
    vocabulary = vocabulary_of_lexicon()
    for text in texts:
        vocabulary.check(text)


def train_sentiment(path: Path) -> tuple[Any, Vocabulary, float]:
    """Fit the classifier (scikit-learn, on sparse data), convert it to concrete-ml's 8-bit
    logistic regression, compile it and save the deployment; returns (model, vocabulary,
    accuracy on held-out random sentences against the lexicon's own sign)."""
    from concrete.ml.sklearn import LogisticRegression
    from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

    ratings_by_word = lexicon()
    vocabulary = vocabulary_of_lexicon()
    ratings = np.array([ratings_by_word[w] for w in vocabulary.words])
    rng = np.random.default_rng(SEED)
    x, y = training_set(ratings, rng)
    test_x, test_y = random_sentences(ratings, HELD_OUT, rng)  # drawn after, never trained on
    classifier = SklearnLogisticRegression(C=10.0, max_iter=2000).fit(x, y)
    weights = classifier.coef_[0]
    extremes = np.zeros((2, len(ratings)), np.float32)  # the highest and the lowest reachable scores
    extremes[0, np.argsort(weights)[-MAX_WORDS:]] = 1.0
    extremes[1, np.argsort(weights)[:MAX_WORDS]] = 1.0
    calibration = np.concatenate([x[-500:].toarray(), extremes, np.zeros((1, len(ratings)), np.float32)])
    model = LogisticRegression.from_sklearn_model(classifier, calibration, n_bits=BITS)
    model.compile(calibration)
    save_deployment(model, path)
    accuracy = float((model.predict(test_x.toarray()) == test_y).mean())
    return model, vocabulary, accuracy


class Sentiment(Tutorial):
    name = "sentiment"
    title = "sentiment analysis: is this sentence positive or negative?"
    model = "logistic regression over a bag of words (the VADER lexicon's words), 8-bit weights"

    def __init__(self, texts: list[str] | None = None):
        self.texts = list(texts) if texts else list(TEXTS)

    def train(self, path: Path) -> Trained:
        self.fitted, self.vocabulary, accuracy = train_sentiment(path)
        return Trained(
            path,
            lambda xs: self.fitted.predict_proba(xs, fhe="disable"),
            f"{len(self.vocabulary.words)} words; agrees with the lexicon's sign on {accuracy:.1%} of held-out random sentences",
            {"accuracy": accuracy, "vocabulary": len(self.vocabulary.words), "max_words": MAX_WORDS},
        )

    def cases(self) -> list[Case]:
        return [Case(text, self.vocabulary.vector(text)) for text in self.texts]

    def read(self, case: Case, decrypted: NDArray[Any], clear: NDArray[Any]) -> Reading:
        fhe_p, clear_p = float(decrypted.ravel()[-1]), float(clear.ravel()[-1])  # class 1: positive

        def verdict(p: float) -> str:
            return f"{'positive' if p >= 0.5 else 'negative'} (P {p:.3f})"

        agree = abs(fhe_p - clear_p) <= TOLERANCE and (fhe_p >= 0.5) == (clear_p >= 0.5)
        return Reading(
            verdict(fhe_p),
            verdict(clear_p),
            agree,
            {"fhe_p_positive": fhe_p, "clear_p_positive": clear_p, "words": self.vocabulary.words_of(case.label)},
        )
