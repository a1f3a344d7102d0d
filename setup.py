"""Only the native data plane; everything else is in pyproject.toml.

``service._dataplane`` (native/*.cpp, C++17) needs a C++ compiler and four Debian packages:
``libxxhash-dev`` (block keys), ``libzmq3-dev`` (the event sockets), ``libssl-dev``
(sha256 for vLLM's own block hashes) and ``libgrpc++-dev`` (the gRPC front). ``make``
installs them when it can (scripts/native_deps.sh). The build is not optional: without them
it stops and says what to install, rather than leave a service that silently runs the slow
path.

``KV_CACHE_SANITIZE=1`` builds with AddressSanitizer and UBSan (``make sanitize``).
"""

import os
from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

ParallelCompile("KV_CACHE_BUILD_JOBS", default=0).install()

_NEEDED = {
    "xxhash.h": "libxxhash-dev",
    "zmq.h": "libzmq3-dev",
    "openssl/evp.h": "libssl-dev",
    "grpcpp/grpcpp.h": "libgrpc++-dev",
}


def _check_headers() -> None:
    roots = ["/usr/include", "/usr/local/include", *os.environ.get("CPATH", "").split(":")]
    missing = [
        package
        for header, package in _NEEDED.items()
        if not any(root and os.path.exists(os.path.join(root, header)) for root in roots)
    ]
    if missing:
        raise SystemExit(
            "kv-cache's native data plane needs "
            + ", ".join(missing)
            + f": install them (Debian/Ubuntu: apt-get install {' '.join(missing)}),"
            " or run `make`, which does so when it can."
        )


_check_headers()
_sanitize = os.environ.get("KV_CACHE_SANITIZE") == "1"
_flags = (
    ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    if _sanitize
    else ["-O2"]
)

setup(
    ext_modules=[
        Pybind11Extension(
            "service._dataplane",
            sorted(glob("native/*.cpp")),
            depends=sorted(glob("native/*.hpp")),  # rebuilt when a header alone changes
            include_dirs=["native"],
            libraries=["zmq", "crypto", "grpc++", "grpc", "gpr"],
            cxx_std=17,
            extra_compile_args=["-Wall", "-Wextra", "-Wno-missing-field-initializers", *_flags],
            extra_link_args=["-fsanitize=address,undefined"] if _sanitize else [],
        ),
    ]
)
