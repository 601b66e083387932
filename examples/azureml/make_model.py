"""How model_dir/iris_model.npz was made: a logistic regression of the iris data that ships
inside scikit-learn (no download), saved as plain numpy arrays so any numpy can read it back.

    python examples/azureml/make_model.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

TARGET = Path(__file__).parent / "model_dir" / "iris_model.npz"


def main() -> None:
    iris = load_iris()
    model = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    np.savez(
        TARGET,
        coef=model.coef_.round(6),
        intercept=model.intercept_.round(6),
        classes=np.array(iris.target_names),
    )
    print(f"accuracy {model.score(iris.data, iris.target):.3f}; saved {TARGET}")


if __name__ == "__main__":
    main()
