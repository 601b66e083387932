"""inference-schema with pandas: a DataFrame input, orient records, and a plain-list output."""

import pandas as pd
from inference_schema.parameter_types.pandas_parameter_type import PandasParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema, output_schema

SAMPLE = pd.DataFrame({"sepal_length": [5.1], "sepal_width": [3.5], "species": ["setosa"]})


def init():
    pass


@input_schema("frame", PandasParameterType(SAMPLE))
@output_schema(StandardPythonParameterType([{"sepal_length": 5.1}]))
def run(frame):
    return {
        "columns": list(frame.columns),
        "rows": len(frame),
        "total_length": float(frame["sepal_length"].sum()),
        "species": frame["species"].tolist(),
    }
