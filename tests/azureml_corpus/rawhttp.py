"""@rawhttp: the request object in, AMLResponse (or a plain value) out."""

from azureml.contrib.services.aml_request import AMLRequest, rawhttp
from azureml.contrib.services.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request):
    mode = request.args.get("mode", "")
    if mode == "binary":  # echo the body back as an image, with custom headers and status
        return AMLResponse(request.get_data(), 201, {"Content-Type": "image/png",
                                                      "X-Model": "echo", "X-Multi": "a, b"})
    if mode == "json":
        return AMLResponse({"got": request.get_json()}, 202, json_str=True)
    if mode == "fail":
        return AMLResponse("model is sad", 503)
    if mode == "none":
        return AMLResponse(None, 200)
    if mode == "files":
        return {
            "form": request.form.to_dict(),
            "files": {k: [f.filename, f.read().hex()] for k, f in request.files.items()},
            "data": request.data.hex(),
        }
    if mode == "plain":
        return "just a string"
    return {
        "method": request.method,
        "full_path": request.full_path,
        "path": request.path,
        "args": request.args.to_dict(flat=False),
        "body_hex": request.get_data().hex(),
        "data_hex": request.data.hex(),
        "custom": request.headers.get("X-Custom-Header"),
        "content_type": request.headers.get("content-type"),
        "is_json": request.is_json,
        "mimetype": request.mimetype,
        "is_aml_request_class": isinstance(AMLRequest, type),
    }
