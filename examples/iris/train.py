"""Train the iris classifier and save it with joblib (run by score.py's init() when needed)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


def train(path: Path) -> float:
    iris = load_iris()
    model = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temp file and renamed: replicas starting together never read half a model.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    joblib.dump({"model": model, "classes": list(iris.target_names)}, tmp)
    os.replace(tmp, path)
    return float(model.score(iris.data, iris.target))


if __name__ == "__main__":
    default = Path(__file__).parent / "model" / "model.joblib"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    print(f"trained, accuracy {train(target):.3f}, saved to {target}")
