"""Start the polytask simulator in this process: ``python _simserver.py '{"rpm": 1200, "latency": 0.3}' [port]``.

The JSON object holds :class:`polytask.testing.SimulatorConfig` fields (every knob, including those the
``polytask simulate`` CLI does not expose, such as ``max_concurrency`` and ``faults``). Listens on 127.0.0.1 (port 0:
a free one) and prints ``polytask simulator listening on http://127.0.0.1:PORT/v1`` once it accepts requests.
"""

from __future__ import annotations

import json
import sys

from polytask.testing import SimulatorConfig, serve


def main() -> None:
    config = SimulatorConfig(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    serve(config, "127.0.0.1", port)


if __name__ == "__main__":
    main()
