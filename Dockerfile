# Turnout as a sidecar or edge proxy.
#   docker build -t turnout .
#   docker run -p 8080:8080 -v $PWD/config/turnout.yaml:/etc/turnout/turnout.yaml turnout
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && rm -rf /src

COPY config/turnout.yaml /etc/turnout/turnout.yaml
RUN useradd --system --uid 10001 --no-create-home turnout
USER turnout
WORKDIR /etc/turnout

EXPOSE 8080 9901
# Liveness: the proxy accepts connections on its listener.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()"]

# Exec form: SIGTERM from `docker stop` reaches turnout itself, which drains before exiting.
ENTRYPOINT ["turnout", "run"]
CMD ["-c", "/etc/turnout/turnout.yaml"]
STOPSIGNAL SIGTERM
