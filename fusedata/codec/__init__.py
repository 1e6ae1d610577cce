"""Codecs for top-k columns. Importing this package registers every known codec."""

from fusedata.codec import raw  # noqa: F401  (registers)
from fusedata.codec.base import Codec, CodecError, codec_from_schema, codec_from_spec, get_codec

DEFAULT_CODEC = "raw"

__all__ = ["Codec", "CodecError", "DEFAULT_CODEC", "codec_from_schema", "codec_from_spec", "get_codec"]
