"""ctest driver for the Python binding's pytest suites.

    run_pytest.py --require numpy,pytest,torch [--package-dir DIR] -- [pytest args...]

Exits 77 (ctest SKIP_RETURN_CODE) when a required module or the built package is missing, or when
pytest ran and every test (or every module, at collection) skipped; never reports a pass for tests
that did not run. Otherwise it returns pytest's exit status (0 only when every collected test passed).
"""

import importlib
import os
import sys

SKIP = 77


def main(argv):
    if "--" not in argv:
        print(__doc__)
        return 2
    ours, pytest_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    required, package_dir = [], None
    i = 0
    while i < len(ours):
        if ours[i] == "--require":
            required += [m for m in ours[i + 1].split(",") if m]
            i += 2
        elif ours[i] == "--package-dir":
            package_dir = ours[i + 1]
            i += 2
        else:
            print(f"run_pytest.py: unknown option {ours[i]}")
            return 2
    for module in required:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure means "cannot run here"
            print(f"SKIPPED: Python module {module!r} is not importable by {sys.executable}: {e}")
            return SKIP
    if package_dir is not None:
        if not os.path.isfile(os.path.join(package_dir, "libmoe", "capi.py")):
            print(f"SKIPPED: the libmoe Python package was not built in {package_dir} (MOE_BUILD_PYTHON off?)")
            return SKIP
        sys.path.insert(0, package_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_dir, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import pytest

    class Outcomes:
        def __init__(self):
            self.passed = self.skipped = self.failed = 0

        def pytest_runtest_logreport(self, report):
            if report.when == "call" and report.passed:
                self.passed += 1
            elif report.skipped:
                self.skipped += 1
            elif report.failed:
                self.failed += 1

        def pytest_collectreport(self, report):
            if report.skipped:  # a whole module skipped (pytest.skip(allow_module_level=True), importorskip)
                self.skipped += 1

    outcomes = Outcomes()
    status = pytest.main(["-p", "no:cacheprovider", *pytest_args], plugins=[outcomes])
    # pytest exits 5 (no tests collected) when every module skipped itself at collection
    if outcomes.passed == 0 and (status == 0 or status == 5 and outcomes.skipped > 0):
        print(f"SKIPPED: no test passed ({outcomes.skipped} skipped)")
        return SKIP
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
