"""@rawhttp imported from azmlinfsrv's own package (where it is installed), returning its
flask-based AMLResponse."""

from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request):
    if request.args.get("mode") == "fail":
        return AMLResponse({"error": "sad"}, 502, json_str=True)
    return AMLResponse(request.get_data()[::-1], 200, {"Content-Type": "application/octet-stream",
                                                      "X-Reversed": "yes"})
