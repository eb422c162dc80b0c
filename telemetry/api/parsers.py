"""The ingestion endpoints parse JSON like every other endpoint: see `iot.api.parsers`.

Kept as a name so the views can say which parser they rely on (orjson's speed
and strictness: `NaN`, `1e400` and nesting past 1 024 levels are 400s).
"""

from iot.api.parsers import StrictJSONParser

__all__ = ["StrictJSONParser"]
