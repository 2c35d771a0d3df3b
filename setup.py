from setuptools import find_packages, setup

setup(
    name="osproject",
    version="0.1.0",
    description="File-integrity checker: a pre-fork server of untrusted MD5 workers",
    packages=find_packages(include=["osproject", "osproject.*"]),
    python_requires=">=3.11",
    install_requires=["psutil>=5.9"],     # --status: workers' RSS and CPU
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2.1", "psutil>=5.9"]},
    entry_points={"console_scripts": [
        "integrity-server=osproject.cli:server_main",
        "integrity-client=osproject.cli:client_main",
    ]},
)
