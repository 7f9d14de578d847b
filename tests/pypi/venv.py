"""A virtual environment with today's PyPI packages (requirements.txt) for the Python suites.

    venv.py setup VENV REQUIREMENTS   create or reuse VENV (ctest fixture pypi.venv)
    venv.py run VENV -- ARGS...       run VENV's python with ARGS (the suites' launcher)

setup exits 0 when VENV holds exactly the pinned packages (reused when its record of them
matches), 77 (ctest SKIP_RETURN_CODE) when PyPI cannot be reached, saying so, and 1 on any other
failure. run exits 77 with setup's reason when the venv is not ready, so a suite that could not
run reports SKIPPED, never a pass. The venv does not see Debian's packages
(no --system-site-packages): numpy and torch must come from PyPI.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request

SKIP = 77


def _paths(venv):
    return os.path.join(venv, "bin", "python"), os.path.join(venv, "libmoe-ready"), os.path.join(venv + ".skipped")


def _index_url():
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")


def _reachable():
    """None when the package index answers, else why not."""
    url = _index_url().rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            r.read(1)
        return None
    except Exception as e:  # noqa: BLE001 - any failure to reach the index is the reason to skip
        return f"the package index {url} cannot be reached ({e})"


def setup(venv, requirements):
    python, ready, skipped = _paths(venv)
    with open(requirements, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(ready) and open(ready).read().strip() == want and os.access(python, os.X_OK):
        print(f"pypi venv {venv}: reused ({requirements} unchanged)")
        _versions(python)
        return 0
    if os.path.exists(skipped):
        os.remove(skipped)
    reason = _reachable()
    if reason:
        with open(skipped, "w") as f:
            f.write(reason + "\n")
        print(f"SKIPPED: {reason}")
        return SKIP
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.check_call([sys.executable, "-m", "venv", venv])
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    subprocess.check_call([python, "-m", "pip", "install", "-q", "-r", requirements], env=env)
    with open(ready, "w") as f:
        f.write(want + "\n")
    _versions(python)
    return 0


def _versions(python):
    subprocess.call([python, "-c", "import sys, numpy, torch; "
                     "print('pypi venv: python', sys.version.split()[0], 'numpy', numpy.__version__, "
                     "'torch', torch.__version__)"])


def run(venv, args):
    python, ready, skipped = _paths(venv)
    if not os.path.exists(ready):
        reason = open(skipped).read().strip() if os.path.exists(skipped) else "the pypi.venv fixture did not run"
        print(f"SKIPPED: no PyPI venv in {venv}: {reason}")
        return SKIP
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    os.execve(python, [python, *args], env)
    return 1  # not reached


def main(argv):
    if len(argv) == 3 and argv[0] == "setup":
        return setup(argv[1], argv[2])
    if len(argv) >= 3 and argv[0] == "run" and argv[2] == "--":
        return run(argv[1], argv[3:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
