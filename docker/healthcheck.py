"""Docker HEALTHCHECK: exit 0 when the server in this container answers GET /healthz with 200.

Python rather than curl because the image has Python anyway and the slim bases ship no curl.
The port comes from the same variable the server reads, so changing it cannot break the check.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LIVEAVATAR_PORT", "8080")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
