"""Codecs for top-k columns. Importing this package registers every known codec."""

from fusedata.codec import raw, zq  # noqa: F401  (registers)
from fusedata.codec.base import Codec, CodecError, codec_from_schema, codec_from_spec, get_codec

DEFAULT_CODEC = "zq"


def decode_topk(table, source: str = ""):
    """Decode the top-k columns of any fusedata table (topk, aligned, fused) into a TopK,
    whatever codec wrote them: the codec and k are read from the schema metadata."""
    from schemas.common import k_of

    try:
        k = k_of(table.schema)
    except ValueError as exc:
        raise CodecError(f"{source}: {exc}") from None
    return codec_from_schema(table.schema, source).decode(table, k)

__all__ = ["Codec", "CodecError", "DEFAULT_CODEC", "codec_from_schema", "codec_from_spec", "decode_topk", "get_codec"]
