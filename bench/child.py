"""``python -m bench.child REQUEST ANSWER``: run one benchmark function in this fresh process.

REQUEST is ``{"target": "module:function", "kwargs": {...}, "threads": n}``; ANSWER receives the function's
result with this process's peak RSS and thread count added.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from bench.common import peak_rss_mib


def main(argv: list[str]) -> int:
    request_file, answer_file = Path(argv[0]), Path(argv[1])
    request = json.loads(request_file.read_text())
    import torch

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    module_name, _, function_name = request["target"].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**request["kwargs"])
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = peak_rss_mib()
    answer_file.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
