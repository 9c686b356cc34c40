# Turnout as a sidecar or edge proxy.
#
#   docker build -t turnout .
#   docker run --stop-timeout 35 -p 8080:8080 \
#       -v "$PWD/my-turnout.yaml:/etc/turnout/turnout.yaml:ro" turnout
#
# The default configuration is config/turnout.yaml, whose pools point at 127.0.0.1:9001/9002:
# right for a sidecar sharing the network namespace of its service, wrong elsewhere, so mount
# your own. To reach the admin API from outside the container, set admin.host to 0.0.0.0 and
# pass a token (-e TURNOUT_ADMIN_TOKEN=...). Give `docker stop` more time than drain.timeout
# (30 s by default) so that requests in flight finish: --stop-timeout 35.

# Build stage: the full image has the C compiler that mypyc needs to compile the data path
# (setup.py); the wheels it builds carry the compiled modules into the slim image.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

COPY --from=build /wheels /wheels
# Fails the build when the data path did not compile (it would run, at half the speed).
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "import sys, proxy.native as n; print(n.describe()); sys.exit(n.BUILD != 'compiled')"

COPY config/turnout.yaml /etc/turnout/turnout.yaml
RUN groupadd --system --gid 10001 turnout \
    && useradd --system --uid 10001 --gid 10001 --no-create-home turnout
USER 10001:10001
WORKDIR /etc/turnout

EXPOSE 8080 9901
# Liveness: the proxy accepts connections on its listener.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8080), 2).close()"]

# Exec form: SIGTERM from `docker stop` reaches turnout itself, which drains before exiting.
ENTRYPOINT ["turnout", "run"]
CMD ["-c", "/etc/turnout/turnout.yaml"]
