"""init() raises: the server must not come up."""


def init():
    raise RuntimeError("cannot load the model")


def run(raw_data):
    return raw_data
