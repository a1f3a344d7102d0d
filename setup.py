"""Only the optional C extension; everything else is in pyproject.toml.

``service._native`` (service/_native.c) needs a C compiler and xxhash.h
(Debian: ``apt-get install gcc libxxhash-dev``). Without them the build skips it and the
service runs the same loops in Python (service/index/loops.py), slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "service._native",
            ["service/_native.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
