"""run() raises, or outlives SCORING_TIMEOUT_MS, or returns invalid JSON input handling."""

import json
import time


def init():
    pass


def run(raw_data):
    data = json.loads(raw_data)
    if "sleep" in data:
        time.sleep(data["sleep"])
        return {"slept": data["sleep"]}
    raise ValueError("secret detail that must not reach the client")
