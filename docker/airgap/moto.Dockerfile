# Air-gapped stand-in for MinIO: moto's S3 server (moto[server] from PyPI; MinIO is not in
# Debian). In-memory: objects do not survive a restart. docker/compose.airgap.yaml runs it
# as the `minio` service on port 9000 and creates the bucket with boto3 from this image.
ARG PYTHON_IMAGE=runops-airgap/python:3.11

FROM ${PYTHON_IMAGE} AS builder
# PEM text of extra CAs pip must trust (a TLS-intercepting proxy's): this stage only.
ARG EXTRA_CA_CERTS=""
ARG MOTO_VERSION=5.2.1
RUN python -m venv /opt/moto \
 && bundle="$(/opt/moto/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" >> "$bundle"; \
    fi \
 && /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check "moto[server,s3]==${MOTO_VERSION}" \
 && /opt/moto/bin/pip uninstall --yes --quiet pip setuptools

FROM ${PYTHON_IMAGE}
COPY --from=builder /opt/moto /opt/moto
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin moto
ENV PATH=/opt/moto/bin:$PATH
USER moto
EXPOSE 9000
CMD ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
