# An entry script written exactly as Azure ML's documentation writes them: init() loads the model
# from AZUREML_MODEL_DIR once, run(raw_data) gets the request body as a str and parses it.
# It runs unchanged under Azure ML's inference server and under `mlfe score-server`.
import json
import logging
import os

import numpy


def init():
    """
    This function is called when the container is initialized/started, typically after create/update
    of the deployment. You can write the logic here to perform init operations like caching the
    model in memory.
    """
    global model
    # AZUREML_MODEL_DIR is an environment variable created during deployment.
    # It is the path to the model folder (./azureml-models/$MODEL_NAME/$VERSION)
    model_path = os.path.join(os.getenv("AZUREML_MODEL_DIR"), "iris_model.npz")
    model = dict(numpy.load(model_path))
    logging.info("Init complete")


def run(raw_data):
    """
    This function is called for every invocation of the endpoint to perform the actual scoring /
    prediction. In the example we extract the data from the json input and call the model's
    predict() logic, then return the result.
    """
    logging.info("iris model: request received")
    data = json.loads(raw_data)["data"]
    data = numpy.array(data)
    scores = data @ model["coef"].T + model["intercept"]
    result = model["classes"][scores.argmax(axis=1)]
    logging.info("Request processed")
    return result.tolist()
