# The ambassador image. Build: podman build -t ambassador:0.1.0 .  (or docker build)
# BASE must provide python3 with venv; CI builds against a local Debian image instead.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/ambassador/bin:$PATH

COPY setup.py pyproject.toml README.md /tmp/src/
COPY ambassador /tmp/src/ambassador
COPY twisted /tmp/src/twisted

# Install into a venv, then build Twisted's plugin cache now: at run time the
# root filesystem is read-only and twistd could not write dropin.cache.
# Image layers keep whole-second mtimes, so a cache written in the same second
# as a plugin would look stale to twistd: date the cache a few seconds ahead.
# pip and setuptools are removed once done: nothing installs at run time (an
# image built FROM this one to add a plugin runs `python -m ensurepip` first).
RUN python3 -m venv /opt/ambassador \
 && /opt/ambassador/bin/pip install /tmp/src \
 && /opt/ambassador/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && touch -d '5 seconds' /opt/ambassador/lib/python3*/site-packages/twisted/plugins/dropin.cache \
 && /opt/ambassador/bin/pip uninstall --yes --quiet pip setuptools \
 && rm -rf /tmp/src /root/.cache

# Numeric so Kubernetes can check runAsNonRoot without a passwd entry.
USER 10001:10001
EXPOSE 8080 9901

# --pidfile= : no pid file (read-only root filesystem, one process per container).
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "ambassador"]
# Containers in a Pod share its network namespace: loopback reaches the main container.
# The admin port (health, readiness, metrics) listens on all interfaces for the kubelet.
CMD ["--port", "tcp:8080:interface=127.0.0.1:backlog=511", "--admin-port", "tcp:9901", "--log-format", "json"]
