# Air-gapped stand-in for the official python image: Debian's python3 (3.11) on the debootstrap
# base. docker/Dockerfile takes it as PYTHON_IMAGE; its builder stage makes venvs with it
# (python3-venv brings ensurepip), its runtime stage removes pip and ensurepip again.
ARG BASE_IMAGE=runops-airgap/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
CMD ["python3"]
