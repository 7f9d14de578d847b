"""ctest driver for the Python examples: run one against the libmoe package in the build tree.

    run_example.py --package-dir DIR [--require numpy,matplotlib] [--expect-file PATH]... -- SCRIPT [ARGS...]

Exits 77 (ctest SKIP_RETURN_CODE) when a required module cannot be imported or the package was not
built in DIR (DIR/libmoe/capi.py missing), never a pass for an example that did not run. Otherwise it
runs SCRIPT with DIR first on PYTHONPATH and returns its exit status, or 1 when it exited 0 but an
--expect-file is missing or empty (each one is removed before the run, so a stale file never counts).
"""

import importlib
import os
import subprocess
import sys

SKIP = 77


def main(argv):
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__)
        return 2
    ours, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    required, package_dir, expected = [], None, []
    i = 0
    while i < len(ours):
        if ours[i] in ("--require", "--package-dir", "--expect-file") and i + 1 < len(ours):
            if ours[i] == "--require":
                required += [m for m in ours[i + 1].split(",") if m]
            elif ours[i] == "--package-dir":
                package_dir = ours[i + 1]
            else:
                expected.append(ours[i + 1])
            i += 2
        else:
            print(f"run_example.py: unknown option or missing value: {ours[i]}")
            return 2
    if package_dir is None:
        print("run_example.py: --package-dir is required")
        return 2

    os.environ.setdefault("MPLBACKEND", "Agg")  # no display: matplotlib must not look for one
    for module in required:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
            print(f"SKIPPED: Python module {module!r} is not importable by {sys.executable}: {e}")
            return SKIP
    if not os.path.isfile(os.path.join(package_dir, "libmoe", "capi.py")):
        print(f"SKIPPED: the libmoe Python package was not built in {package_dir} (MOE_BUILD_PYTHON off?)")
        return SKIP

    for path in expected:
        if os.path.exists(path):
            os.remove(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_dir, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    status = subprocess.call([sys.executable, *command], env=env)
    if status != 0:
        return status
    for path in expected:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size == 0:
            print(f"FAIL: {path} was not written or is empty")
            return 1
        print(f"{path}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
