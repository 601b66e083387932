"""run() returns numpy values, None, str, bytes, ... chosen by the request."""

import json

import numpy as np

VALUES = {
    "none": lambda: None,
    "str": lambda: "a plain string",
    "list": lambda: [1, 2.5, "x", None, True],
    "float64": lambda: {"x": np.float64(1.5)},
    "int_keys": lambda: {1: "one", 2: "two"},
    "bytes": lambda: b"raw bytes",
    "set": lambda: {1, 2},
    "int64": lambda: {"x": np.int64(3)},
    "array": lambda: {"x": np.arange(3)},
    "tolist": lambda: {"x": np.arange(3).tolist()},
}


def init():
    pass


def run(raw_data):
    return VALUES[json.loads(raw_data)["what"]]()
