"""The README's main job: `cipherpool demo` on the embedded stack, as a user runs it: the
quick default (digits) as text with --explain, then all four tutorials as JSON. Each asserts
that every decrypted answer agrees with the model's clear answer, from the printed figures,
not from the exit status alone."""

import json
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration
TEXTS = ["I adore this brilliant, joyful little film.", "Dreadful service; the staff were rude and useless."]


def demo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "cipherpool", "demo", *args], capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str, but: int = 0) -> list[int]:
    """Live processes (other than ``but``) whose command line or environment names ``text``:
    the demo's data dir, which its Redis, nodes and gateway all inherit."""
    found = []
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == but:
            continue
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def test_the_default_demo_is_digits_and_explains_each_step(tmp_path):
    data_dir = str(tmp_path / "demo")
    with subprocess.Popen(
        [sys.executable, "-m", "cipherpool", "demo", "--explain", "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as running:
        children: set[int] = set()
        reader = threading.Thread(target=lambda: output.extend(running.communicate(timeout=900)))
        output: list[str] = []
        reader.start()
        while reader.is_alive():
            children.update(processes_mentioning(data_dir, but=running.pid))
            time.sleep(0.5)
    out, err = output
    assert running.returncode == 0, out[-3000:] + err[-3000:]
    assert len(children) >= 3  # Redis, a pool node, the gateway … were seen running
    assert not processes_mentioning(data_dir), "the demo stops every process it started"
    answers = re.findall(r"test image (\d)\s+FHE digit (\d)\s+\|\s+clear digit (\d) · truth: (\d)\s+✓ agree", out)
    assert len(answers) == 4 and all(fhe == clear for _, fhe, clear, _ in answers), out
    assert "DISAGREE" not in out and "health" not in out  # digits only
    for step in ("key generation", "evaluation-key upload", "encrypt", "queue wait", "compute (on the node)", "decrypt"):
        assert re.search(rf"  {re.escape(step)}\s+\d+(\.\d+)? (ms|s)", out), step
    assert "evaluated once on 1 of 1 node(s)" in out  # the warm-up
    assert "key cache 4 hits / 0 miss" in out  # the warm-up loaded the key before the first query
    sent = re.search(
        r"the end user sent (\d+) requests .*?; (\d+) bodies checked for \d+ samples of the secret key "
        r"and 4 clear inputs: found in none of them",
        out,
    )
    assert sent and int(sent.group(1)) == int(sent.group(2)) > 0, out[-2000:]  # every body read, none held them
    assert "where: end user's machine" in out and "crossed: nothing: the secret key" in out
    assert "fetch the model's client specs" in out and "the node's command queue" in out
    assert "each of the 4 queries" in out and out.count("in the task message") == 1  # 1.9 kB ciphertexts ride inline


def test_all_four_tutorials_agree_with_their_clear_models(tmp_path):
    out_dir = tmp_path / "out"
    args = ["all", "--json", "--out", str(out_dir)] + [a for text in TEXTS for a in ("--text", text)]
    result = demo(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    tutorials = {t["name"]: t for t in report["tutorials"]}
    assert list(tutorials) == ["digits", "health", "image", "sentiment"] and report["agree"] is True
    assert report["private"] is True
    for t in tutorials.values():
        assert t["cases"] and all(c["agree"] for c in t["cases"]), t["name"]
        privacy = t["privacy"]
        assert privacy["found"] == [] and privacy["secret_patterns"] > 0, t["name"]
        assert privacy["bodies_checked"] == privacy["requests"] > 0 and privacy["unchecked_bodies"] == 0, t["name"]
        [upload] = [s for s in t["steps"] if s["title"].startswith("upload the evaluation key")]
        assert upload["sent"] >= t["evaluation_key_bytes"] > 0, t["name"]  # measured on the wire, not assumed
        assert all(c["compute_s"] > 0 and c["ciphertext_bytes"] > 0 and c["output_bytes"] > 0 for c in t["cases"])
        steps = [s["title"] for s in t["steps"]]
        assert any(s.startswith("generate keys") for s in steps) and any(s.startswith("upload") for s in steps)

    assert all(c["values"]["fhe"] == c["values"]["clear"] for c in tutorials["digits"]["cases"])

    health = tutorials["health"]["cases"]
    assert {c["truth"] for c in health} == {"malignant", "benign"}
    for c in health:
        v = c["values"]
        assert abs(v["fhe_p_malignant"] - v["clear_p_malignant"]) <= 1e-3
        assert (v["fhe_p_malignant"] >= 0.5) == (v["clear_p_malignant"] >= 0.5)

    [image] = tutorials["image"]["cases"]
    assert image["values"]["pixels"] == 64 * 64 and image["values"]["pixels_differing_from_clear_model"] == 0
    assert image["values"]["max_error_vs_float_convolution"] <= 1  # exact up to the last rounding
    assert image["ciphertext_inline"] is True and image["output_inline"] is False  # 35 MB out: by reference
    files = tutorials["image"]["files"]
    assert set(files) == {"original", "sharpened_fhe", "sharpened_clear", "side_by_side"}
    for role, path in files.items():
        assert stat.S_IMODE((out_dir / "image" / f"{role}.png").stat().st_mode) == 0o600, role
        with Image.open(path) as png:
            assert png.size == ((64 * 4) * 3 + 2 * 16, 64 * 4) if role == "side_by_side" else (64, 64)
    assert stat.S_IMODE((out_dir / "image").stat().st_mode) == 0o700

    sentiment = tutorials["sentiment"]["cases"]
    assert [c["label"] for c in sentiment] == TEXTS
    positive, negative = (c["values"] for c in sentiment)
    assert positive["fhe_p_positive"] > 0.5 > negative["fhe_p_positive"]
    assert "brilliant" in positive["words"] and "rude" in negative["words"]
    for v in (positive, negative):
        assert abs(v["fhe_p_positive"] - v["clear_p_positive"]) <= 1e-3
