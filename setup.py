import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, in the package: --version and the package metadata agree.
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (Path(__file__).parent / "osproject" / "__init__.py").read_text()).group(1)

setup(
    name="osproject",
    version=VERSION,
    description="File-integrity checker: a pre-fork server of untrusted MD5 workers",
    packages=find_packages(include=["osproject", "osproject.*"]),
    python_requires=">=3.11",
    install_requires=["psutil>=5.9"],     # --status: workers' RSS and CPU
    extras_require={
        # pytest-xdist: make test runs the tests side by side (most wait on processes)
        "test": ["pytest>=7", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "psutil>=5.9"],
        # make lint; minor releases add rules and checks, so a new one is a choice
        "lint": ["ruff>=0.17,<0.18", "mypy>=2.4,<2.5"],
    },
    entry_points={"console_scripts": [
        "integrity-server=osproject.server.cli:main",
        "integrity-client=osproject.client.cli:main",
    ]},
)
