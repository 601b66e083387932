# The mlfe image: the router (`mlfe serve`, the default command) and the replica inference server
# (`mlfe score-server`, what model Deployments run). Build: docker build -t mlfe:0.1.0 .
# Models go into an image built FROM this one (deploy/kubernetes/README.md).

# ---- builder: install mlfe and its runtime dependencies into a venv --------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlfe ./mlfe
COPY router ./router
COPY autoscaler ./autoscaler
COPY deploy ./deploy
COPY mlfe_azureml ./mlfe_azureml
# The bundled examples ship inside the package (deploy/examples/ in the wheel: pyproject.toml).
COPY examples ./examples
# Runtime dependencies only, with the Kubernetes client the in-cluster router needs; no test,
# dev, examples, bench or azureml extras (a model image adds inference-schema if its script uses it).
RUN /opt/venv/bin/pip install ".[kubernetes]"

# ---- runtime: the venv on a clean slim base, as a non-root user ------------------------------
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 mlfe \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mlfe \
    && mkdir -p /var/azureml-app /var/lib/mlfe \
    && chown 10001:10001 /var/lib/mlfe
COPY --from=builder /opt/venv /opt/venv
WORKDIR /var/azureml-app
USER 10001:10001
# 8080 scoring, 8081 admin API, 8082 /metrics alone (router.metrics_listen; the config must
# listen on 0.0.0.0 in a container).
EXPOSE 8080 8081 8082
# No curl in the slim image: Python asks the router's liveness route.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/-/healthy', timeout=2).status == 200 else 1)"]
CMD ["mlfe", "serve", "--config", "/etc/mlfe/config.yaml"]
