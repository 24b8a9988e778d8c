"""Error messages in the CLI's words. The library and the gateway speak to Python and HTTP
callers (``pass token=``, ``call upload_evaluation_keys()``, ``max_workers``); a person at the
command line is told the flags and commands that do the same (``--token``, `cipherpool query
upload-keys`, ``--max-workers``). The library keeps its words: the CLI translates, here.
"""

from __future__ import annotations

import re

# Whole phrases first (in order), then the API's field names that a CLI flag sets.
PHRASES: list[tuple[str, str]] = [
    (r"pass token= or set CIPHERPOOL_TOKEN", "pass --token (`cipherpool query --token cpt_…`) or set CIPHERPOOL_TOKEN"),
    (r"pass api_key= or set CIPHERPOOL_API_KEY", "pass --api-key (`cipherpool --api-key cpk_… …`) or set CIPHERPOOL_API_KEY"),
    (r"pass url=, set CIPHERPOOL_URL", "pass --url, set CIPHERPOOL_URL"),
    (r"name one \(model=\.\.\.\)", "name one (`cipherpool query --model NAME …`)"),
    (r"as generate_keys\(\) makes it", "as `cipherpool query keygen` makes it"),
    (
        r"call upload_evaluation_keys\(\) \(CLI: `cipherpool query upload-keys`\) first",
        "run `cipherpool query upload-keys` first (`cipherpool query predict` and `execute` upload it by themselves)",
    ),
    (
        r"\(QueryClient: refresh\(\), then generate_keys\(\) and upload_evaluation_keys\(\); CLI: [^)]*\)",
        "(`cipherpool query keys ensure`), then encrypt again; `cipherpool query predict` does all of it by itself",
    ),
    (
        r"\(QueryClient does, by itself; CLI: `cipherpool query upload-keys`\)",
        "(`cipherpool query upload-keys`; `cipherpool query predict` and `execute` do it by themselves)",
    ),
    (
        r"encrypt\(\) takes one sample: a 1-D array of the model's features, or one image without the batch axis\.",
        "A sample is one row of the model's features, or one image without the batch axis.",
    ),
    (
        r"pass the bytes that encrypt\(\)/execute\(\) produced, unmodified",
        "pass the file that `cipherpool query encrypt` or `execute` wrote, unmodified",
    ),
    (r"Send what encrypt\(\) produced, unmodified", "Send the file that `cipherpool query encrypt` wrote, unmodified"),
    (r"submit with wait_for_worker", "query with `cipherpool query --wait-for-worker …`"),
    (r"give an ends_at in the future", "give a --to in the future"),
]

FLAGS: dict[str, str] = {
    "ttl_s": "--expires-in",
    "expires_at": "--expires-at",
    "no_expiry": "--no-expiry",
    "max_workers": "--max-workers",
    "min_workers": "--min-workers",
    "target_queue_wait_s": "--target-wait",
    "target_queue_depth": "--target-depth",
    "scale_up_after_s": "--up-after",
    "idle_after_s": "--idle-after",
    "cooldown_up_s": "--cooldown-up",
    "cooldown_down_s": "--cooldown-down",
    "start_cron": "--start",
    "stop_cron": "--stop",
    "starts_at": "--from",
    "ends_at": "--to",
    "wait_for_worker": "--wait-for-worker",
}

_PHRASES = [(re.compile(pattern), replacement) for pattern, replacement in PHRASES]
# A field's name as a word of the sentence: not in `code`, a quoted name ('max_workers') or a path.
_FLAGS = re.compile(r"(?<![\w`'\"./-])(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")(?![\w`'\"/-])")
# What no CLI message should still hold: calls, keyword arguments, client classes, and
# snake_case names (outside `code`).
_PYTHON = re.compile(r"\b\w+\(\)|\b\w+=(?=[\s,.;)]|$)|\b(?:Query|Management)Client\b|\b[a-z]+(?:_[a-z0-9]+)+\b")


def for_cli(message: str) -> str:
    """``message`` with the library's Python and API words replaced by the CLI's."""
    for pattern, replacement in _PHRASES:
        message = pattern.sub(replacement, message)
    return _FLAGS.sub(lambda m: FLAGS[m.group(1)], message)


def python_words(message: str) -> list[str]:
    """Calls and keyword arguments left in a message (for tests: none should reach the CLI)."""
    return _PYTHON.findall(re.sub(r"`[^`]*`", "", message))
