# syntax=docker/dockerfile:1
# exitpipe daemons and CLI. Two stages: the builder turns the project into a wheel and installs
# it into a virtualenv; the final image gets only that virtualenv, so no compiler, build
# backend, source tree or pip cache reaches it.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY producers ./producers
COPY consumers ./consumers
COPY exitpipe ./exitpipe
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/exitpipe \
 && /opt/exitpipe/bin/pip install /wheels/exitpipe-*.whl \
 && /opt/exitpipe/bin/pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/exitpipe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXITPIPE_METRICS_PORT=9100
RUN groupadd --system --gid 10001 exitpipe \
 && useradd --system --uid 10001 --gid exitpipe --create-home --home-dir /var/lib/exitpipe \
      --shell /usr/sbin/nologin exitpipe
COPY --from=builder /opt/exitpipe /opt/exitpipe
USER 10001:10001
WORKDIR /var/lib/exitpipe
EXPOSE 9100
# exitpipe installs its own SIGTERM/SIGINT handlers, so it can run as PID 1 and stop cleanly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["exitpipe"]
CMD ["run"]
