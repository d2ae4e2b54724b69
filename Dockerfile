# llm-fleet: the gateway and the CPU worker (SmolLM2-135M-Instruct on the CPU).
#   docker build -t llm-fleet:0.1.0 .
#   docker run llm-fleet:0.1.0 gateway --host 0.0.0.0      |   ... worker --http-host 0.0.0.0 --http-port 8081
# The install is `make runtime`, the same target CI's `make test` runs (see Makefile).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY common ./common
COPY gateway ./gateway
COPY worker ./worker
RUN make runtime VENV=/opt/venv && rm -rf /root/.cache

ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 LLM_FLEET_CACHE_DIR=/var/cache/llm-fleet
RUN useradd --create-home --uid 10001 fleet && mkdir -p /var/cache/llm-fleet && chown fleet /var/cache/llm-fleet
USER fleet
EXPOSE 8000 8081
ENTRYPOINT ["llm-fleet"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
