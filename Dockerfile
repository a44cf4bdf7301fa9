# exitpipe daemons and CLI. Two stages: the builder turns the project into a wheel and installs
# it into a virtualenv; the final image gets only that virtualenv, so no compiler, build
# backend, source tree or pip cache reaches it.
#
# PYTHON_IMAGE is any Debian-based Python 3.11+ with venv: the official python:3.11-slim by
# default, or exitpipe-local/python:3.11 from Debian's packages (containers/build, no registry).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml ./
# The dependencies get a layer of their own, rebuilt only when pyproject.toml changes.
RUN python -m venv /opt/exitpipe \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >/tmp/requirements.txt \
 && /opt/exitpipe/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY schemas ./schemas
COPY producers ./producers
COPY consumers ./consumers
COPY exitpipe ./exitpipe
RUN /opt/exitpipe/bin/pip wheel --no-deps --wheel-dir /wheels . \
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
# exitpipe installs its own SIGTERM/SIGINT handlers and stops cleanly; compose.yaml still runs it
# under an init (init: true), so a signal that comes before the handlers is not lost on PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["exitpipe"]
CMD ["run"]
