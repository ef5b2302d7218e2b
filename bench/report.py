"""The tail the small benchmarks share: their result as one JSON document.

In: the benchmark's name, where to write it (``--out``, or None) and its own fields. Out: the
document's text, printed (unless ``echo`` is off) and written to ``out``, with the command that made
it and the host's load average at the end beside the fields.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def write_report(benchmark: str, out: Path | None, fields: dict[str, Any], echo: bool = True) -> str:
    text = json.dumps({"benchmark": benchmark, "command": " ".join(["python", *sys.argv]), **fields,
                       "host_load_average_1_5_15_min_at_end": [round(v, 2) for v in os.getloadavg()]}, indent=2)
    if echo:
        print(text)
    if out:
        out.write_text(text + "\n")
    return text
