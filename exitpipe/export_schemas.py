"""Write the models' JSON Schema to ``schemas/json`` (``python -m exitpipe.export_schemas``).

Here, not in ``schemas/``, because it writes files: the contract package does no I/O.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import json_schemas

JSON_DIR = Path(__file__).resolve().parents[1] / "schemas" / "json"


def render(schema: dict[str, object]) -> str:
    """The canonical text of one schema file."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Rewrite every exported schema file."""
    for name, schema in json_schemas().items():
        (JSON_DIR / name).write_text(render(schema), encoding="utf-8")
        print(f"wrote {JSON_DIR / name}")


if __name__ == "__main__":
    main()
