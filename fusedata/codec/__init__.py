"""Codecs for top-k columns. Importing this package registers every known codec."""

from fusedata.codec import raw, zq, zq2  # noqa: F401  (registers)
from fusedata.codec.base import Codec, CodecError, codec_from_schema, codec_from_spec, get_codec

DEFAULT_CODEC = "zq"


def decode_topk(table, source: str = "", like=None):
    """Decode the top-k columns of any fusedata table (topk, aligned, fused) into a TopK,
    whatever codec wrote them: the codec and k are read from the schema metadata.

    Readers that drop Parquet schema metadata (e.g. `datasets.load_dataset`) can pass `like`: the
    dataset folder or one of its shard files, whose schema metadata is used instead."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from schemas.common import k_of

    schema = table.schema
    if like is not None:
        path = Path(like)
        shard = path if path.is_file() else next(iter(sorted(path.glob("shard-*.parquet"))), None)
        if shard is None:
            raise CodecError(f"{like}: no shard to read the codec from")
        schema = schema.with_metadata(pq.read_schema(shard).metadata)
        source = source or str(shard)
    try:
        k = k_of(schema)
    except ValueError as exc:
        raise CodecError(f"{source}: {exc}") from None
    return codec_from_schema(schema, source).decode(table, k)


__all__ = ["Codec", "CodecError", "DEFAULT_CODEC", "codec_from_schema", "codec_from_spec", "decode_topk", "get_codec"]
