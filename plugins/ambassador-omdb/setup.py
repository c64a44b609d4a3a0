from setuptools import find_packages, setup

setup(
    name="ambassador-omdb",
    version="0.1.0",
    description="The Open Movie Database (OMDb) adapter for the ambassador sidecar.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted.plugins holds the dropin only: it must never ship an __init__.py.
    packages=find_packages(include=["ambassador_omdb", "ambassador_omdb.*"]) + ["twisted.plugins"],
    install_requires=["ambassador>=0.1"],
)
