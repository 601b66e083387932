"""Load-test an mlfe (or azureml) scoring endpoint with locust, as a client in production would.

Start the load-testing target and note the scoring URI and key it prints:

    mlfe up --config examples/loadtest.yaml

then, headless (no web UI), 50 users for a minute:

    SCORING_URI=http://127.0.0.1:8080/api/v1/service/loadtest/score SCORING_KEY=<key> \\
        locust -f examples/locustfile.py --headless -u 50 -r 10 -t 60s --only-summary

(`pip install locust` first: it is in mlfe's `dev` extra). Environment:

- `SCORING_URI`: the scoring URI; without it, locust's `--host` plus
  `/api/v1/service/$SCORING_SERVICE/score` (`SCORING_SERVICE` defaults to `loadtest`).
- `SCORING_KEY`: the service's key (`mlfe keys loadtest` prints it too); none: no auth header.
- `SCORING_PAYLOAD`: the JSON body (default `{"data": [[5.1, 3.5, 1.4, 0.2]]}`).
- `SCORING_RETRIES`: how often a 503 is retried (default 3).

A 503 means the endpoint is overloaded (its wait queue timed out, or no replica is ready yet):
azureml tells its clients to retry those with a backoff, honouring `Retry-After`. Each 503 is
reported as its own failure ("503 (retried)"), then retried after `Retry-After` (else 0.5 s,
doubling, at most 8 s, with jitter); only a request still refused after `SCORING_RETRIES`
retries counts as given up. The summary printed at the end counts 503s, retries and give-ups.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any
from urllib.parse import urlsplit

import gevent
from locust import FastHttpUser, constant, events, task

PAYLOAD = os.environ.get("SCORING_PAYLOAD", '{"data": [[5.1, 3.5, 1.4, 0.2]]}')
RETRIES = int(os.environ.get("SCORING_RETRIES", "3"))
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0

counts = {"503": 0, "retried": 0, "gave_up": 0}
_uri = urlsplit(os.environ.get("SCORING_URI", ""))


def backoff_s(attempt: int, retry_after: str | None) -> float:
    """Seconds before retry number `attempt` (0-based): Retry-After if the server said, else
    exponential with full jitter."""
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after), BACKOFF_MAX_S)
    return random.uniform(0, min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S))


class ScoringClient(FastHttpUser):
    wait_time = constant(0)
    # SCORING_URI's scheme and address, unless --host is given.
    host = f"{_uri.scheme}://{_uri.netloc}" if _uri.netloc else None

    def on_start(self) -> None:
        service = os.environ.get("SCORING_SERVICE", "loadtest")
        self.uri = _uri.path if _uri.netloc else f"/api/v1/service/{service}/score"
        self.headers = {"Content-Type": "application/json"}
        key = os.environ.get("SCORING_KEY")
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    @task
    def score(self) -> None:
        for attempt in range(RETRIES + 1):
            with self.client.post(self.uri, data=PAYLOAD, headers=self.headers, name="score",
                                  catch_response=True) as response:
                if response.status_code == 200:
                    response.success()
                    return
                if response.status_code != 503:
                    response.failure(f"{response.status_code}: {_message(response.text)}")
                    return
                counts["503"] += 1
                if attempt == RETRIES:
                    counts["gave_up"] += 1
                    response.failure(f"503 (gave up after {RETRIES} retries)")
                    return
                counts["retried"] += 1
                response.failure("503 (retried)")
                wait = backoff_s(attempt, response.headers.get("Retry-After"))
            gevent.sleep(wait)  # the client's backoff, as azureml's clients are told to do


def _message(text: str | None) -> str:
    try:
        body: Any = json.loads(text or "")
    except ValueError:
        return (text or "")[:200]
    return str(body.get("message", body))[:200] if isinstance(body, dict) else str(body)[:200]


@events.test_stop.add_listener
def _summary(environment: Any, **kwargs: Any) -> None:
    print(f"mlfe load test: {counts['503']} responses were 503, {counts['retried']} retried, "
          f"{counts['gave_up']} gave up", flush=True)
