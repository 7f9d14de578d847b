"""ctest: `pip install ./bindings/python` into a fresh venv, then use the installed package.

    pip_install_check.py SOURCE_ROOT WORK_DIR

Offline-safe: --no-build-isolation --no-deps against the interpreter's own setuptools/wheel/numpy
(a venv with --system-site-packages). Exits 77 (skipped) when venv, pip, setuptools or wheel is not
available to this interpreter; any failure of the build, install or smoke test fails.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

SKIP = 77

SMOKE = textwrap.dedent("""
    import os, sys, numpy as np, libmoe
    here = os.path.dirname(libmoe.__file__)
    assert here.startswith(sys.prefix), (here, sys.prefix)
    assert os.path.isfile(os.path.join(here, "libmoe.so.0")), os.listdir(here)
    layer = libmoe.Layer(d_model=16, d_ff=32, num_experts=4, top_k=2)
    ctx = layer.context()
    y = layer.forward(np.ones((8, 16), np.float32), ctx)
    dx = layer.backward(ctx, np.ones_like(y))
    assert np.isfinite(dx).all() and ctx.stats()["num_tokens"] == 8
    try:
        libmoe.Layer(d_model=0, d_ff=1)
    except libmoe.InvalidArgumentError as e:
        assert e.status == "MOE_ERR_INVALID_ARGUMENT"
    try:
        import torch
    except ImportError:
        print("installed libmoe", libmoe.library_version(), "from", here, "(no torch)")
    else:
        import libmoe.torch
        m = libmoe.torch.MoE(16, 32, 4, 2)
        m(torch.randn(2, 3, 16, requires_grad=True)).sum().backward()
        assert m.experts.w1.grad is not None
        print("installed libmoe", libmoe.library_version(), "from", here, "with torch", torch.__version__)
""")


def main(source_root, work):
    for module in ("venv", "ensurepip", "setuptools", "wheel"):
        if importlib.util.find_spec(module) is None:
            print(f"SKIPPED: {sys.executable} has no {module!r} module")
            return SKIP
    venv = os.path.join(work, "venv")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.check_call([sys.executable, "-m", "venv", "--system-site-packages", venv])
    python = os.path.join(venv, "bin", "python")
    env = dict(os.environ, LIBMOE_SOURCE_DIR=source_root, PIP_NO_INPUT="1",
               LIBMOE_BUILD_BASE=os.path.join(work, "setuptools-build"),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    subprocess.check_call([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                           os.path.join(source_root, "bindings", "python")], env=env)
    subprocess.check_call([python, "-c", SMOKE], env=env, cwd=work)
    return check_runtime_libraries(python, env, work)


# What the installed libmoe.so.0 may need from the system: the runtime libraries the binding's
# README names (oneDNN, libgomp, libstdc++) and the C library's own. Anything else would make the
# README wrong: name it there, or carry it in the package.
DOCUMENTED = ("libdnnl.so.", "libgomp.so.", "libstdc++.so.", "libgcc_s.so.", "libm.so.", "libmvec.so.", "libc.so.",
              "ld-linux")


def check_runtime_libraries(python, env, work):
    here = subprocess.check_output([python, "-c", "import os, libmoe; print(os.path.dirname(libmoe.__file__))"],
                                   env=env, cwd=work, text=True).strip()
    lib = os.path.join(here, "libmoe.so.0")
    readelf = shutil.which("readelf")
    if not readelf:
        print("readelf not found: the runtime libraries of the installed package were not checked")
        return 0
    dynamic = subprocess.check_output([readelf, "-d", lib], text=True)
    needed = [line.split("[", 1)[1].split("]", 1)[0] for line in dynamic.splitlines() if "(NEEDED)" in line]
    undocumented = [n for n in needed if not n.startswith(DOCUMENTED)]
    if undocumented:
        print(f"{lib} needs {undocumented}, which bindings/python/README.md does not name as runtime "
              f"dependencies (it needs {needed})")
        return 1
    print(f"installed libmoe.so.0 needs {needed}: all named in the README")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
