# The worker image: `docker build -t pravaha-worker .` (CUDA torch comes from PyPI's default wheel).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/cache/huggingface
RUN useradd --uid 10001 --create-home --home-dir /home/pravaha pravaha
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pravaha_core ./pravaha_core
COPY worker ./worker
COPY producer ./producer
COPY benchmarks ./benchmarks
RUN pip install --upgrade pip && pip install ".[worker]"

USER 10001:10001
EXPOSE 9400
# SIGTERM drains: in-flight requests finish (PRAVAHA_DRAIN_TIMEOUT_S), the rest stay pending.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pravaha"]
CMD ["worker"]
