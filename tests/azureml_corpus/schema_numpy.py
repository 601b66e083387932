"""inference-schema with numpy: @input_schema('data', NumpyParameterType(...)) and @output_schema."""

import numpy as np
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema, output_schema


def init():
    pass


@input_schema("data", NumpyParameterType(np.array([[1.0, 2.0, 3.0]])))
@output_schema(StandardPythonParameterType({"sums": [6.0], "dtype": "float64"}))
def run(data):
    return {"sums": data.sum(axis=1).tolist(), "dtype": str(data.dtype), "shape": list(data.shape)}
