# gamma images. Build from the repository root:
#   docker build --target cpu -t gamma:cpu .      # the main job on CPU (default command: gamma run)
#   docker build --target gpu -t gamma:gpu .      # adds vLLM in its own environment for evaluation
# Run (results, MLflow database and DVC remote land in the mounted folder):
#   docker run --rm -v "$PWD/out:/work" gamma:cpu
#   docker run --rm --gpus all -v "$PWD/out:/work" gamma:gpu gamma run --set evaluation.backend=vllm

FROM python:3.11-slim AS cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_HOME=/work/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
# git: DVC versions the prepared data in a git repository. Not version-pinned: the slim base's
# Debian release decides which git exists, and any recent git serves DVC.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/gamma
COPY requirements.txt requirements-data.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps -r requirements-data.txt
COPY pyproject.toml README.md ./
COPY gamma gamma
COPY tasks tasks
COPY flows flows
RUN pip install --no-cache-dir --no-deps -e .
# The project (params.yaml, dvc.yaml, .dvc, and gamma/ because the `prepare` stage depends on its
# model and text code) is copied into /work at start, so that a mounted, empty /work becomes a
# git + DVC project holding everything the run produces.
COPY params.yaml dvc.yaml dvc.lock .gitignore /opt/gamma/project/
COPY .dvc/config /opt/gamma/project/.dvc/config
COPY gamma /opt/gamma/project/gamma
COPY scripts/docker-entrypoint.sh /usr/local/bin/gamma-entrypoint
WORKDIR /work
ENTRYPOINT ["gamma-entrypoint"]
CMD ["gamma", "run"]

FROM cpu AS gpu
# vLLM pins torch and fastapi differently from the main environment: a venv of its own,
# found by the vLLM evaluation backend through GAMMA_VLLM_PYTHON.
RUN python -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir vllm==0.33.0
ENV GAMMA_VLLM_PYTHON=/opt/vllm/bin/python
