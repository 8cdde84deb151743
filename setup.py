"""Packaging for virthotplug."""

import re

from setuptools import find_packages, setup


def version() -> str:
    """The one version, ``__version__`` in virthotplug/__init__.py (read, not imported);
    debian/changelog must agree (debian/rules refuses to build otherwise)."""
    with open("virthotplug/__init__.py", encoding="utf-8") as init:
        found = re.search(r'^__version__ = "([^"]+)"$', init.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError("no __version__ in virthotplug/__init__.py")
    return found.group(1)


setup(
    name="virthotplug",
    version=version(),
    description="Make vCPU hotplug on libvirt/QEMU hosts work end to end",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["virthotplug", "virthotplug.*"]),
    install_requires=[
        "libvirt-python>=6.5",
        "lxml>=4.6",
        "tenacity>=8.0",
    ],
    extras_require={
        "metrics": ["prometheus-client>=0.12"],
        # Only the soak's plot (bench/soak_series.py) draws: never needed by the program.
        "bench": ["matplotlib>=3.5"],
        "dev": [
            "pytest>=7",
            "hypothesis>=6",
            "ruff>=0.4",
            "mypy>=1.5",
            "lxml-stubs",
            "import-linter>=2",
            "prometheus-client>=0.12",
            # The tests validate every --json output against schemas/*.json.
            "jsonschema>=4.18",
        ],
    },
    entry_points={"console_scripts": ["virthotplug = virthotplug.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Systems Administration",
    ],
)
