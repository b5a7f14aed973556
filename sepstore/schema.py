"""Write the manifest's JSON Schema: ``python -m sepstore.schema > manifests/schema.json``.

``tests/test_manifest.py`` fails when the committed schema is stale.
"""

from __future__ import annotations

import json
import sys

from .manifest import schema


def render() -> str:
    """The schema as committed: sorted keys, 2-space indent, final newline."""
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
