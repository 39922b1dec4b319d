"""Write the random 2-layer BERT that the .test configuration trains (resources/tiny-bert, relative
to the working directory): the test suite's own fixture model, so the whole DAG runs in minutes.

    python .test/make_tiny_backbone.py [OUTPUT]     # default: .test/resources/tiny-bert
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_tiny_bert  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".test" / "resources" / "tiny-bert"
    make_tiny_bert(out, layers=2, hidden=32)
    print(f"wrote {out}")
