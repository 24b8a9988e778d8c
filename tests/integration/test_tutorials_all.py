"""All four tutorials, as JSON: `cipherpool demo all --json`, as a user runs it. Every
decrypted answer agrees with the model's clear answer, read from the printed figures, not from
the exit status alone. (Apart from tests/integration/test_demo.py, the quick default with
--explain, so that the two long runs can take the two processes of the integration tier.)"""

import json
import stat
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.integration
TEXTS = ["I adore this brilliant, joyful little film.", "Dreadful service; the staff were rude and useless."]


def demo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "cipherpool", "demo", *args], capture_output=True, text=True, timeout=timeout)


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
