"""Undecorated run(raw_data, request_headers): the body as a str, the headers as a dict."""

import json
import os

STATE = {}


def init():
    STATE["model_dir"] = os.getenv("AZUREML_MODEL_DIR")


def run(raw_data, request_headers):
    if raw_data.startswith("{") and "data" in raw_data:
        data = json.loads(raw_data)["data"]
        return {"sum": sum(data), "n": len(data)}
    return {
        "raw": raw_data,
        "type": type(raw_data).__name__,
        "custom": request_headers.get("X-Custom-Header"),
        "content_type": request_headers.get("Content-Type"),
        "x_keys": sorted(k for k in request_headers if k.lower().startswith("x-custom")),
    }
