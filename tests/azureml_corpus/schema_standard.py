"""inference-schema with standard types: two parameters, one with a default, plus headers."""

from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
from inference_schema.schema_decorators import input_schema, output_schema


def init():
    pass


@input_schema("text", StandardPythonParameterType("hello"))
@input_schema("repeat", StandardPythonParameterType(2))
@output_schema(StandardPythonParameterType({"out": "hellohello"}))
def run(text, repeat=1, request_headers=None):
    return {"out": text * repeat, "seen_custom": (request_headers or {}).get("X-Custom-Header")}
