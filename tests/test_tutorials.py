"""The tutorials' parts that need no stack: choosing them, reading answers, the vocabulary,
pixels, the traffic log, and what the reports print. The demo itself runs end to end in
tests/integration/test_demo.py."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from cipherpool.cli import cli
from cipherpool.client.traffic import SECRET_WINDOW, UNCHECKED, TrafficLog
from cipherpool.demo import as_json, choose, run_demo
from cipherpool.errors import InvalidInput
from cipherpool.tutorials import TUTORIALS
from cipherpool.tutorials.base import Case
from cipherpool.tutorials.digits import Digits
from cipherpool.tutorials.health import Health
from cipherpool.tutorials.image import KERNEL, pad, to_pixels
from cipherpool.tutorials.present import explain, summary
from cipherpool.tutorials.runner import CaseReport, Step, TutorialReport, size
from cipherpool.tutorials.sentiment import MAX_WORDS, Sentiment, Vocabulary, lexicon


def test_choose_runs_digits_by_default_and_all_in_order():
    assert choose(()) == ["digits"]
    assert choose(("all",)) == ["digits", "health", "image", "sentiment"] == list(TUTORIALS)
    assert choose(("sentiment", "health")) == ["health", "sentiment"]


def test_text_without_the_sentiment_tutorial_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(InvalidInput, match="--text is for the sentiment tutorial"):
        run_demo(None, tmp_path, names=["digits"], texts=["great"])  # type: ignore[arg-type]
    assert not (tmp_path / "platform").exists()


def test_cli_demo_names_and_options():
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    for word in ("digits", "health", "image", "sentiment", "all", "--text", "--explain", "--json", "--out"):
        assert word in result.output
    assert CliRunner().invoke(cli, ["demo", "faces"]).exit_code == 2  # not a tutorial
    refused = CliRunner().invoke(cli, ["demo", "digits", "--text", "nice"])
    assert refused.exit_code == InvalidInput.exit_code, refused.output


# reading answers: agreement is the tutorial's own test, and it can fail


def test_digits_agree_only_on_the_same_digit_and_close_probabilities():
    clear = np.full((1, 10), 0.01)
    clear[0, 3] = 0.91
    case = Case("test image 0", np.zeros(64), "3")
    assert Digits().read(case, clear.copy(), clear).agree
    shifted = clear.copy()
    shifted[0, 3] -= 0.01
    assert not Digits().read(case, shifted, clear).agree
    other = np.roll(clear, 1, axis=1)
    reading = Digits().read(case, other, clear)
    assert not reading.agree and reading.fhe == "digit 4" and reading.clear == "digit 3"


def test_health_reads_the_probability_of_malignancy_within_tolerance():
    case = Case("patient 0", np.zeros(30), "malignant")
    clear = np.array([[0.9712, 0.0288]])  # class 0: malignant
    reading = Health().read(case, clear + np.array([[0.0002, -0.0002]]), clear)
    assert reading.agree and "P(malignant) 0.971 (malignant)" in reading.fhe
    assert not Health().read(case, clear + np.array([[0.002, -0.002]]), clear).agree
    near = np.array([[0.5004, 0.4996]])
    assert not Health().read(case, np.array([[0.4999, 0.5001]]), near).agree  # within 1e-3, other side of 0.5


def test_sentiment_vocabulary_and_reading():
    words = lexicon()
    assert len(words) > 7000 and words["love"] > 0 > words["hate"]
    vocabulary = Vocabulary(sorted(words))
    assert vocabulary.words_of("I LOVE love this, but hate the ending!") == ["love", "hate"]
    x = vocabulary.vector("Love, love, LOVE.")
    assert x.sum() == 1.0 and x[vocabulary.index["love"]] == 1.0
    with pytest.raises(InvalidInput, match="no word of the VADER lexicon"):
        vocabulary.vector("the table and a chair")  # an empty bag: the intercept alone, no reading
    with pytest.raises(InvalidInput, match="empty text"):
        vocabulary.vector("   ")
    too_many = " ".join(sorted(words)[: MAX_WORDS + 1])
    with pytest.raises(InvalidInput, match=f"at most {MAX_WORDS}"):
        vocabulary.vector(too_many)
    tutorial = Sentiment(["great"])
    tutorial.vocabulary = vocabulary
    case = Case("a great day", vocabulary.vector("a great day"))
    clear = np.array([[0.1, 0.9]])
    reading = tutorial.read(case, clear.copy(), clear)
    assert reading.agree and reading.fhe == "positive (P 0.900)" and reading.values["words"] == ["great"]
    assert not tutorial.read(case, np.array([[0.6, 0.4]]), clear).agree


def test_image_pixels_padding_and_kernel():
    assert to_pixels(np.array([[[[-0.2, 0.5, 1.3]]]])).tolist() == [[0, 128, 255]]
    image = np.arange(9, dtype=np.float32).reshape(3, 3)
    padded = pad(image)
    assert padded.shape == (1, 5, 5) and padded[0, 0, 0] == image[0, 0] and padded[0, 4, 4] == image[2, 2]
    assert sum(map(sum, KERNEL)) == pytest.approx(1.0)  # sharpening keeps the brightness


# the traffic log: what crossed the network, and that a guarded secret never did


def _client(log: TrafficLog) -> httpx.Client:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b"x" * 10))
    return httpx.Client(transport=transport, base_url="http://gateway", event_hooks=log.hooks())


def test_traffic_log_counts_bytes_per_step_and_finds_a_guarded_secret():
    log = TrafficLog()
    secret = np.random.default_rng(1).integers(0, 2, 2000, dtype=np.uint64).tobytes()  # binary coefficients
    assert log.guard("the secret key", secret) == 16
    with _client(log) as http:
        http.put("/v1/client/keys/k", content=b"e" * 1000)
        mark = log.mark()
        http.post("/v1/queries", content=b"c" * 300)
        assert log.since(mark).sent == 300 and log.since(mark).received == 10 and log.since(0).requests == 2
        assert log.found == []
        http.post("/v1/queries", content=b"head" + secret[SECRET_WINDOW * 3 : SECRET_WINDOW * 5] + b"tail")
    assert log.found == ["the secret key"]
    assert log.checked_bodies == 3


def test_traffic_log_guards_a_whole_input():
    log = TrafficLog()
    x = np.linspace(0, 1, 64, dtype=np.float32).tobytes()
    log.guard("the clear input", x, whole=True)
    with _client(log) as http:
        http.post("/v1/queries", content=x[:-4])
        assert log.found == []
        http.post("/v1/queries", content=b"{" + x + b"}")
    assert log.found == ["the clear input"]


def test_a_streamed_body_cannot_be_vouched_for():
    log = TrafficLog()
    with _client(log) as http:
        http.post("/v1/queries", content=iter([b"chunk", b"chunk"]))  # a generator: streamed, unreadable here
    assert log.found == [UNCHECKED] and log.unchecked_bodies == 1 and log.checked_bodies == 0


def test_a_clients_transport_reports_what_it_sent(tmp_path):
    from cipherpool.client.transport import Transport
    from cipherpool.config.settings import Settings

    transport = Transport(Settings(data_dir=tmp_path, url="http://gateway"), "cpt_token", "no token")
    transport._http._transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b"{}"))
    log = TrafficLog()
    transport.observe(log.hooks())
    transport.request("PUT", "/v1/client/keys", content=b"k" * 4096)
    transport.request("GET", "/v1/client/model")
    assert log.since(0).requests == 2 and log.checked_bodies == 2
    assert log.since(0).sent == 4096 and log.since(0).received == 4
    assert [e.path for e in log.exchanges] == ["/v1/client/keys", "/v1/client/model"]


# reports


def _report() -> TutorialReport:
    report = TutorialReport("health", "health analysis", "XGBoost", "clear test accuracy 93.0%", {"accuracy": 0.93})
    report.steps = [
        Step("end user", "generate keys", 5.9, "end user's machine", "nothing"),
        Step(
            "end user",
            "upload the evaluation key (once) and warm it on the node",
            12.6,
            "end user → gateway → store; pool node",
            "the evaluation key",
            sent=58_900_000,
            received=183,
        ),
        Step("provider", "stop the worker", 0.3, "gateway", "a stop order"),
    ]
    report.queries_after = 2
    report.cases = [
        CaseReport(
            "patient 0",
            "malignant",
            "P(malignant) 0.971",
            "P(malignant) 0.971",
            True,
            {"p": 0.971},
            0.014,
            1100,
            0.012,
            0.0,
            7.13,
            7.17,
            0.004,
            164_300,
            "node1@vm",
        )
    ]
    report.evaluation_key_bytes = 58_900_000
    report.seconds = 53.2
    return report


def test_summary_and_explain_tell_the_story_in_order():
    report = _report()
    text = "\n".join(summary(report))
    assert "patient 0  FHE P(malignant) 0.971  |  clear P(malignant) 0.971 · truth: malignant  ✓ agree" in text
    assert "evaluation key 58.9 MB" in text and "compute (on the node)     7.13 s" in text
    lines = explain(report)
    assert lines[0].startswith("── each of the 1 queries") and "found in none of them" in lines[-1]
    assert "up, the ciphertext (1.1 kB), in the task message" in "\n".join(lines)
    assert "the token's id, never the token's value" in "\n".join(lines)
    report.cases[0].output_inline = False
    assert "encrypted output (164.3 kB), through the platform's store" in "\n".join(explain(report))
    report.privacy.requests = 3
    assert "only 0 of 3 bodies could be checked" in explain(report)[-1] and not report.private
    report.privacy.bodies_checked = 3
    assert report.private
    report.privacy.found = ["the secret key"]
    assert "FOUND: the secret key" in explain(report)[-1] and not report.private
    assert "privacy: 3/3 request bodies checked" in "\n".join(summary(report))
    assert "privacy" not in "\n".join(summary(report, explained=True))  # explain() says it in full
    report.cases[0].agree = False
    assert "✗ DISAGREE" in "\n".join(summary(report)) and not report.agree


def test_json_report_is_strict_json():
    import json

    report = _report()
    report.facts = {"psnr_db": float("inf"), "max_error": np.int64(1), "errors": np.array([0, 1]), "mean": np.float32(0.5)}
    document = json.loads(as_json([report], 12.5, 70.0))
    assert document["agree"] is True and document["tutorials"][0]["cases"][0]["compute_s"] == 7.13
    assert document["private"] is True and document["tutorials"][0]["privacy"]["found"] == []
    assert document["tutorials"][0]["facts"] == {"psnr_db": None, "max_error": 1, "errors": [0, 1], "mean": 0.5}


def test_bad_arguments_are_refused_before_anything_starts(tmp_path):
    for texts, message in (
        (["   "], "empty text"),
        (["the table and a chair"], "no word of the VADER lexicon"),
        ([" ".join(sorted(lexicon())[: MAX_WORDS + 1])], f"at most {MAX_WORDS}"),
    ):
        with pytest.raises(InvalidInput, match=message):
            run_demo(None, tmp_path, names=["sentiment"], texts=texts)  # type: ignore[arg-type]
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(InvalidInput, match="cannot write its files"):
        run_demo(None, tmp_path, names=["image"], out_dir=blocked)  # type: ignore[arg-type]
    assert not (tmp_path / "platform").exists()


def test_json_mode_keeps_stdout_for_the_document():
    """Python prints, C stdio (buffered in a pipe: concrete's native prints) and raw writes
    during the run all land on stderr; stdout holds only what comes after."""
    import subprocess
    import sys

    script = (
        "import ctypes, os\n"
        "from cipherpool.demo import stdout_to_stderr\n"
        "libc = ctypes.CDLL(None)\n"
        "with stdout_to_stderr():\n"
        "    print('progress')\n"
        "    libc.printf(b'native stdio\\n')\n"
        "    os.write(1, b'raw\\n')\n"
        "print('document')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == "document\n"
    assert all(word in done.stderr for word in ("progress", "native stdio", "raw"))


def test_the_global_json_flag_selects_the_json_report(monkeypatch):
    from cipherpool import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda settings, demo_dir, **kwargs: seen.update(kwargs))
    assert CliRunner().invoke(cli, ["--json", "demo", "health"]).exit_code == 0
    assert seen["json_out"] is True and seen["names"] == ("health",)


def test_size_units():
    assert (size(64), size(1100), size(58_900_000)) == ("64 B", "1.1 kB", "58.9 MB")


def test_an_image_model_encrypts_one_image_without_the_batch_axis(tmp_path):
    from cipherpool.errors import InvalidShape
    from cipherpool.fhe.client import ClientCrypto
    from cipherpool.tutorials.image import train_sharpen

    train_sharpen(tmp_path / "sharpen", side=6)
    crypto = ClientCrypto((tmp_path / "sharpen" / "client.zip").read_bytes(), tmp_path / "keys")
    assert crypto.input_shape == [1, 1, 8, 8]
    crypto.generate_keys()
    assert crypto.encrypt(np.zeros((1, 8, 8), np.float32))  # one image: the batch axis is added
    assert crypto.encrypt(np.zeros((1, 1, 8, 8), np.float32))  # a batch of one, as concrete takes it
    with pytest.raises(InvalidShape, match="one image without the batch axis"):
        crypto.encrypt(np.zeros((8, 8), np.float32))
    secret = crypto.secret_key_material()
    assert secret and all(len(key) >= 1000 for key in secret)
    log = TrafficLog()
    assert log.guard("the secret key", secret[0]) > 0


# `demo --explain` on one screen: the whole run with stand-ins for the stack, clients and model


class _FakeStack:
    gateway_url = "http://127.0.0.1:8123"

    def __init__(self, settings, options):
        from types import SimpleNamespace

        self.options = options
        self.client_settings = settings.model_copy(update={"url": self.gateway_url})
        self.supervisor = SimpleNamespace(children=[])

    def start(self):
        return self

    def describe(self):
        return [("gateway", "pid 1"), ("url", self.gateway_url)]

    def create_account(self, name):
        return "cpk_demo"

    def stop(self):
        pass


class _FakeManagement:
    def __init__(self, *args, **kwargs):
        pass

    def observe(self, log):
        pass

    def deploy_model(self, *args, **kwargs):
        pass

    def activate_model(self, name):
        pass

    def start_worker(self, name):
        from types import SimpleNamespace

        from cipherpool.statuses import WorkerStatus

        return SimpleNamespace(id="wrk_1", node="node1@host", status=WorkerStatus.UP)

    def create_token(self, *args, **kwargs):
        return "cpt_demo"

    def worker_stats(self, name):
        from types import SimpleNamespace

        return [
            SimpleNamespace(
                worker_id="wrk_1",
                node="node1@host",
                queries_succeeded=4,
                average_compute_s=0.5,
                key_cache_hits=4,
                key_cache_misses=0,
            )
        ]

    def stop_worker(self, worker_id):
        pass

    def close(self):
        pass


class _FakeQuery:
    def __init__(self, *args, key_dir=None, **kwargs):
        from types import SimpleNamespace

        self.key_dir = key_dir
        self.crypto = SimpleNamespace(
            input_shape=[1, 64], secret_key_material=lambda: [b"s" * 4000], evaluation_key=lambda: b"e" * 90_000
        )
        self.last_warmup = SimpleNamespace(nodes=1, warmed=1, seconds=0.4)
        self.last_timings = {"queue_wait_s": 0.003, "key_s": 0.0, "compute_s": 0.51}

    def observe(self, log):
        pass

    def generate_keys(self):
        return "k" * 32

    def upload_evaluation_keys(self):
        return "k" * 32

    def encrypt(self, x):
        return b"c" * 1900

    def execute(self, ciphertext):
        return b"o" * 1200

    def decrypt(self, output):
        return np.eye(10)[3][np.newaxis]

    def close(self):
        pass


class _FakeDigits(Digits):
    def __init__(self, cases: int, files: int):
        self.n_cases, self.n_files = cases, files

    def train(self, path):
        from cipherpool.tutorials.base import Trained

        return Trained(path, lambda xs: np.eye(10)[3][np.newaxis], "clear test accuracy 96.4%", {"accuracy": 0.964})

    def cases(self):
        return [Case(f"test image {i}", np.arange(64) % 17, "3") for i in range(self.n_cases)]

    def finish(self, cases, decrypted, out_dir):
        return {f"image_{i}": f"/tmp/out/image_{i}.png" for i in range(self.n_files)}


@pytest.mark.parametrize(("cases", "files"), [(4, 0), (1, 3)])
def test_demo_explain_fits_one_screen_per_tutorial(monkeypatch, tmp_path, cases, files):
    from cipherpool import demo
    from cipherpool.config.settings import Settings
    from cipherpool.tutorials import runner

    monkeypatch.setattr(demo, "EmbeddedStack", _FakeStack)
    monkeypatch.setattr(demo, "make", lambda name, texts: _FakeDigits(cases, files))
    monkeypatch.setattr(runner, "ManagementClient", _FakeManagement)
    monkeypatch.setattr(runner, "QueryClient", _FakeQuery)
    lines: list[str] = []
    demo.Demo(Settings(data_dir=tmp_path), tmp_path, nodes=1, names=["digits"], echo=lines.append, explain=True).run()
    text = "\n".join(lines).splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("• tutorial digits"))
    end = next(i for i, line in enumerate(text) if line.startswith("• operator: stop the stack"))
    tutorial = [line for line in text[start:end] if line.strip()]
    assert len(tutorial) <= 40, "\n".join(tutorial)
    shown = "\n".join(tutorial)
    # Still the whole story: each step with its time, where it ran and what crossed, in order
    for step in ("train and compile", "deploy model", "start a worker", "access token", "client specs", "generate keys"):
        assert step in shown, step
    assert shown.index("generate keys") < shown.index("test image 0") < shown.index("stop the worker")
    assert "where: end user's machine" in shown and "crossed: nothing: the secret key" in shown
    assert "the token's id, never the token's value" in shown and "in the task message" in shown
    assert re.search(r"test image 0\s+FHE digit 3\s+\|\s+clear digit 3 · truth: 3\s+✓ agree", shown)
    assert "evaluated once on 1 of 1 node(s)" in shown and "key cache 4 hits / 0 miss" in shown
    assert re.search(r"privacy: the end user sent \d+ requests .*bodies checked for \d+ samples of the secret key", shown)
