"""Build the libmoe Python package with the repository's CMake build.

`pip install ./bindings/python` runs this: CMake configures the repository root (two levels up, or
$LIBMOE_SOURCE_DIR) with MOE_PYTHON_WHEEL=ON, builds libmoe.so and the SWIG extension, and
`cmake --install --component python` lays out libmoe/{capi.py, _capi*.so, libmoe.so.0} (plus
libmoe_cuda.so.0 when the CUDA module is built), which go into the wheel beside the pure-Python files.

Environment: CMAKE (the cmake to run), LIBMOE_CMAKE_ARGS (extra -D options, e.g. "-DMOE_WITH_CUDA=OFF"),
LIBMOE_SOURCE_DIR (the repository root), CMAKE_BUILD_PARALLEL_LEVEL (build jobs), LIBMOE_BUILD_BASE
(setuptools' build and egg-info directory instead of ./build and ./libmoe.egg-info).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def source_root():
    root = Path(os.environ.get("LIBMOE_SOURCE_DIR") or HERE.parent.parent).resolve()
    if not (root / "include" / "moe" / "moe.h").is_file() or not (root / "bindings" / "swig" / "moe.i").is_file():
        raise RuntimeError(f"libmoe sources not found in {root}: build from a libmoe checkout "
                           f"(pip install ./bindings/python) or set LIBMOE_SOURCE_DIR")
    return root


def version():
    try:
        header = (source_root() / "include" / "moe" / "moe.h").read_text()
    except RuntimeError:
        return "0.0.0"
    parts = [re.search(rf"#define MOE_VERSION_{p} (\d+)", header).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        root = source_root()
        cmake = os.environ.get("CMAKE") or shutil.which("cmake")
        if not cmake:
            raise RuntimeError("cmake (>= 3.22) is needed to build libmoe: install it, or set CMAKE")
        build_dir = (Path(self.build_temp) / "cmake").resolve()
        stage = build_dir / "stage"
        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DMOE_BUILD_PYTHON=ON", "-DMOE_PYTHON_WHEEL=ON", "-DMOE_PYTHON_INSTALL_DIR=.",
            "-DMOE_BUILD_JAVA=OFF", "-DMOE_BUILD_RUST=OFF", "-DMOE_BUILD_TESTS=OFF",
            "-DMOE_BUILD_BENCH=OFF", "-DMOE_BUILD_EXAMPLES=OFF", "-DMOE_WITH_MPI=OFF",
        ] + shlex.split(os.environ.get("LIBMOE_CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "-S", str(root), "-B", str(build_dir)] + args)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        if stage.exists():
            shutil.rmtree(stage)
        subprocess.check_call([cmake, "--install", str(build_dir), "--component", "python", "--prefix", str(stage)])
        package_dir.mkdir(parents=True, exist_ok=True)
        built = stage / "libmoe"
        for f in built.iterdir():
            if f.is_file() and f.suffix != ".py" or f.name == "capi.py":  # the generated and native files
                shutil.copy2(f, package_dir / f.name)
        if not Path(self.get_ext_fullpath(ext.name)).is_file():
            raise RuntimeError(f"the CMake build did not produce {self.get_ext_fullpath(ext.name)}")


# Where setuptools builds (default: build/ and libmoe.egg-info/ here): the ctest of this install
# points them into the CMake build tree so the source tree stays clean.
_options = {}
if os.environ.get("LIBMOE_BUILD_BASE"):
    _options["build"] = {"build_base": os.environ["LIBMOE_BUILD_BASE"]}
    _options["egg_info"] = {"egg_base": os.environ["LIBMOE_BUILD_BASE"]}

setup(
    version=version(),
    options=_options,
    ext_modules=[Extension("libmoe._capi", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
