"""The data contracts between stages: every table's schema and every column list, in one place.

Stages import their schemas from here; nothing here imports a stage. A shard's tables:

- ``captions/{shard}.parquet``: :data:`CAPTION_SCHEMA`, one row per input sample, failures
  included (``status``, ``error``).
- ``filtered/{shard}.parquet``: :data:`FILTERED_SCHEMA`, one row per caption row: the decision
  (``keep``, ``reason``, ``caption_clean``) and every score column a rule declares
  (:data:`SCORE_COLUMNS`, collected from :data:`recaption.caption_rules.RULES`).
- ``dataset/parquet/{shard}.parquet``: :data:`DATASET_SCHEMA`, one row per kept sample, the
  publishable record (no pixels unless ``merge.embed_images_in_parquet`` adds an ``image``
  column of :data:`IMAGE_TYPE`, the layout of datasets' ``Image`` feature).

The Hugging Face ``features`` of the published parquet are derived from the pyarrow schema
by :func:`hf_features`, so the card and the parquet metadata can never disagree with the
table.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from recaption.caption_rules import score_columns
from recaption.images import IMAGE_EXTENSIONS

__all__ = [
    "CAPTION_COLUMNS_FOR_FILTER",
    "CAPTION_SCHEMA",
    "DATASET_SCHEMA",
    "FILTERED_SCHEMA",
    "IMAGE_EXTENSIONS",
    "IMAGE_TYPE",
    "SCORE_COLUMNS",
    "hf_features",
]

CAPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("original_text", pa.string()),
        ("model", pa.string()),
        ("revision", pa.string()),
        ("prompt", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_new_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
# The caption columns the filter stage cannot do without.
CAPTION_COLUMNS_FOR_FILTER = ("key", "caption", "status", "finish_reason")

# Every score column a rule may write, with its type, in rule order.
SCORE_COLUMNS: dict[str, pa.DataType] = score_columns()

FILTERED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),
        ("caption_clean", pa.string()),
        *SCORE_COLUMNS.items(),
    ]
)

DATASET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("image_sha256", pa.string()),
        ("image_format", pa.string()),
        ("original_text", pa.string()),
        ("synthetic_caption", pa.string()),
        ("synthetic_caption_raw", pa.string()),
        ("caption_model", pa.string()),
        ("prompt", pa.string()),
        ("finish_reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("aesthetic_score", pa.float32()),
        ("similarity", pa.float32()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        *SCORE_COLUMNS.items(),
    ]
)
# datasets' ``Image`` feature stores an image as this struct.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# pyarrow type -> datasets ``Value`` dtype name.
_HF_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.binary(): "binary",
}


def hf_features(schema: pa.Schema) -> dict[str, dict[str, Any]]:
    """datasets' feature description of ``schema`` (``{"name": {"dtype": ..., "_type": ...}}``).

    A column of :data:`IMAGE_TYPE` is an ``Image`` feature; every other column must have a
    plain type (a ``Value``), else :class:`TypeError` names it.
    """
    features: dict[str, dict[str, Any]] = {}
    for field in schema:
        if field.type == IMAGE_TYPE:
            features[field.name] = {"_type": "Image"}
        elif field.type in _HF_DTYPES:
            features[field.name] = {"dtype": _HF_DTYPES[field.type], "_type": "Value"}
        else:
            raise TypeError(f"column {field.name!r}: no datasets feature for {field.type}")
    return features
