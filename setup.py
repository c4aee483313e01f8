"""The one part of the build pyproject.toml cannot declare stably: the C lock-step lane.

tftpd/_lane.c answers RFC 1350's common exchange (the ACK of the newest block, the next block
out) without entering the interpreter; tftpd/pump.py runs the same exchange in Python when the
module is missing.  gcc and python3-dev come from scripts/debian-packages.txt.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tftpd._lane",
            sources=["tftpd/_lane.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ]
)
