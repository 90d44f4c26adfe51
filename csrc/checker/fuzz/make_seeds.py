"""Write the fuzz seed corpus: small well-formed dumps of every format.

    python csrc/checker/fuzz/make_seeds.py OUTDIR

The dump writers live with the tests (tests/unit/test_checker_dumps.py).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))

import test_checker_dumps  # noqa: E402


def main(outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    for name, data in test_checker_dumps.seeds():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1])
