"""A real model: a scikit-learn classifier of iris flowers.

`init()` loads the model from `$AZUREML_MODEL_DIR/model.joblib`, training it first if it is not
there yet (on the iris data that ships inside scikit-learn: no download). `run()` gets the request
body as a str, as Azure ML's entry scripts do, and predicts.

    {"data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}  ->  {"result": ["setosa", "virginica"]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from train import train  # the script's own folder is on sys.path

model: Any = None
classes: list[str] = []

swagger = {
    "swagger": "2.0",
    "info": {"title": "iris", "version": "1.0"},
    "paths": {"/score": {"post": {"parameters": [{"in": "body", "name": "body", "schema": {
        "type": "object", "properties": {"data": {"type": "array", "items": {
            "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}}}}}]}}},
}


def init() -> None:
    global model, classes
    model_dir = Path(os.environ.get("AZUREML_MODEL_DIR", Path(__file__).parent / "model"))
    path = model_dir / "model.joblib"
    if not path.exists():
        train(path)
    bundle = joblib.load(path)
    model, classes = bundle["model"], bundle["classes"]


def run(raw_data: str) -> dict[str, Any]:
    rows = np.asarray(json.loads(raw_data)["data"], dtype=float)
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise ValueError("expected rows of 4 measurements")
    return {"result": [classes[i] for i in model.predict(rows)]}
