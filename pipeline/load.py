"""A bounded load generator for the Serve endpoint: every request sent once, every answer counted.

Used by the Serve tests and `benchmarks/bench_serve.py`. A run sends a fixed list of payloads from a
fixed number of client threads and stops by itself: no payload is sent after `deadline_s`, and each
request waits at most `timeout_s` for its answer. What comes back is sorted into answers (any HTTP
status, with its latency and Retry-After header) and requests *lost*: no HTTP answer at all (a
connection error or a timeout), which a server under overload must never cause.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class Answer:
    status: int
    latency_s: float
    retry_after: str | None


@dataclass
class LoadReport:
    seconds: float  # wall time of the run
    answers: list[Answer] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # why each lost request got no answer
    not_sent: int = 0  # payloads left when the deadline passed

    @property
    def statuses(self) -> Counter:
        return Counter(a.status for a in self.answers)

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    @property
    def refused(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 503]

    @property
    def other(self) -> Counter:
        """Statuses other than 200 and 503 (a server error, or a request the test built wrong)."""
        return Counter(a.status for a in self.answers if a.status not in (200, 503))

    def latency(self, share: float) -> float | None:
        """The latency below which `share` of the 200 answers came (0.5: the median)."""
        latencies = sorted(a.latency_s for a in self.ok)
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))] if latencies else None

    @property
    def ok_per_second(self) -> float:
        return len(self.ok) / self.seconds


def run_load(
    url: str, payloads: list[dict], concurrency: int, deadline_s: float, timeout_s: float = 120.0
) -> LoadReport:
    """POST each payload (JSON) to `url` once, `concurrency` at a time, and sort what comes back."""
    stop = time.monotonic() + deadline_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    def send(client: httpx.Client, payload: dict) -> Answer | str | None:
        if time.monotonic() > stop:
            return None
        started = time.perf_counter()
        try:
            reply = client.post(url, json=payload, timeout=timeout_s)
        except httpx.HTTPError as err:  # no answer: refused connection, reset, timeout
            return f"{type(err).__name__}: {err}"
        return Answer(reply.status_code, time.perf_counter() - started, reply.headers.get("retry-after"))

    started = time.perf_counter()
    report = LoadReport(seconds=0.0)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(lambda payload: send(client, payload), payloads):
            if outcome is None:
                report.not_sent += 1
            elif isinstance(outcome, str):
                report.lost.append(outcome)
            else:
                report.answers.append(outcome)
    report.seconds = time.perf_counter() - started
    return report
