"""A tutorial's report for people: the answers (FHE beside clear), the step timings and sizes,
and with ``--explain`` the path every query took and what the privacy check found (where each
other step ran and what it sent are on its progress line: :class:`TutorialRun` with
``explain``). One screen per tutorial."""

from __future__ import annotations

from statistics import median

from cipherpool.tutorials.runner import CLIENT, Privacy, TutorialReport, size


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def summary(report: TutorialReport, explained: bool = False) -> list[str]:
    """The answers, timings and the privacy verdict; ``explained``: the verdict is left to
    :func:`explain`, which says it in full."""
    lines = [
        f"── {report.name}: {report.title}  ({report.seconds:.1f} s)",
        f"model: {report.model} · {report.trained}",
        "answers, decrypted FHE beside the model's clear answer:",
    ]
    width = min(48, max(len(c.label) for c in report.cases)) if report.cases else 0
    for c in report.cases:
        label = c.label if len(c.label) <= width else c.label[: width - 1] + "…"
        truth = f" · truth: {c.truth}" if c.truth else ""
        lines.append(f"  {label:<{width}}  FHE {c.fhe}  |  clear {c.clear}{truth}  {'✓ agree' if c.agree else '✗ DISAGREE'}")
    steps = {s.title: s for s in report.steps}
    keygen = next((s for t, s in steps.items() if t.startswith("generate keys")), None)
    upload = next((s for t, s in steps.items() if t.startswith("upload the evaluation key")), None)
    lines.append("timings (per query: the median over the queries above):")
    if keygen:
        lines.append(
            f"  {'key generation':<22}{_ms(keygen.seconds):>10}   evaluation key {size(report.evaluation_key_bytes)}, "
            f"secret key {size(report.privacy.secret_key_bytes)} (kept)"
        )
    if upload:
        lines.append(f"  {'evaluation-key upload':<22}{_ms(upload.seconds):>10}   sent {size(upload.sent)}, warm-up included")
    if report.cases:
        cs = report.cases
        rows = [
            ("encrypt", median(c.encrypt_s for c in cs), f"ciphertext {size(median(c.ciphertext_bytes for c in cs))}"),
            ("queue wait", median(c.queue_wait_s for c in cs), ""),
            ("compute (on the node)", median(c.compute_s for c in cs), f"node {cs[-1].node}"),
            ("execute (round trip)", median(c.execute_s for c in cs), ""),
            ("decrypt", median(c.decrypt_s for c in cs), f"encrypted output {size(median(c.output_bytes for c in cs))}"),
        ]
        lines += [f"  {title:<22}{_ms(seconds):>10}   {note}".rstrip() for title, seconds, note in rows]
    if report.worker:
        w = report.worker
        lines.append(
            f"worker {w['worker']} on {w['node']}: {w['queries']} queries, average compute "
            f"{w['average_compute_s'] or 0:.2f} s, key cache {w['key_cache_hits']} hits / {w['key_cache_misses']} miss"
        )
    for role, path in report.files.items():
        lines.append(f"wrote {role.replace('_', ' ')}: {path}")
    p = report.privacy
    if not explained:
        lines.append(
            f"privacy: {p.bodies_checked}/{p.requests} request bodies checked for the secret key and the clear inputs: "
            f"{_verdict(p)}"
        )
    return lines


def explain(report: TutorialReport) -> list[str]:
    """The path every query took (medians over the queries), and the privacy check in full."""
    lines = []
    cs = report.cases
    if cs:
        lines += [
            f"── each of the {len(cs)} queries: encrypt ({_ms(median(c.encrypt_s for c in cs))}) and decrypt "
            f"({_ms(median(c.decrypt_s for c in cs))}) on the {CLIENT}, nothing crossed; the answer exists only there",
            f"      execute  end user → gateway → broker → pool node {cs[-1].node} ({_ms(median(c.execute_s for c in cs))}): "
            f"up, the ciphertext ({size(median(c.ciphertext_bytes for c in cs))}), "
            f"{_carried_all([c.ciphertext_inline for c in cs], 'in the task message')}; the task names "
            "the query, the model, the key set and the token's id, never the token's value; on the node: queue wait "
            f"{_ms(median(c.queue_wait_s for c in cs))}, key {_ms(median(c.key_s for c in cs))}, compute "
            f"{_ms(median(c.compute_s for c in cs))}; down, the encrypted output ({size(median(c.output_bytes for c in cs))}), "
            f"{_carried_all([c.output_inline for c in cs], 'in the task result')}",
        ]
    p = report.privacy
    secret = (
        f"{p.secret_patterns} samples of the secret key"
        if p.secret_patterns
        else "the secret key (unreadable in this concrete version: not sampled)"
    )
    inputs = f"{p.input_patterns} clear input{'s' if p.input_patterns != 1 else ''}"
    checked = secret + (f" and {inputs}" if p.input_patterns else " (inputs too sparse to check by bytes)")
    verdict = _verdict(p)
    lines.append(
        f"privacy: the end user sent {p.requests} requests ({size(p.sent)} up, {size(p.received)} down); "
        f"{p.bodies_checked} bodies checked for {checked}: {verdict}"
    )
    return lines


def _carried(inline: bool, how: str) -> str:
    return how if inline else "through the platform's store, the message carrying only its reference"


def _carried_all(inline: list[bool], how: str) -> str:
    """How the queries' payloads travelled: one way for all, or how many each way."""
    if all(inline) or not any(inline):
        return _carried(inline[0], how)
    return f"{how} for {sum(inline)}, {_carried(False, how)} for {len(inline) - sum(inline)}"


def _verdict(p: Privacy) -> str:
    if p.found:
        return f"FOUND: {', '.join(p.found)}"
    if not p.private:
        return f"only {p.bodies_checked} of {p.requests} bodies could be checked"
    return "found in none of them"
