"""What travels between pipeline stages, in one home for the simulator, the runtime and the time
model: the message codecs (codec.py: int8 / int4 blockwise quantization), message sizes and
link times (messages.py), and the link model as it moves here.

    python -c "from pipenag.link import make_codec; print(make_codec('int8').ratio(4096, 4))"
"""

from pipenag.link.codec import CODECS, Codec, Int4Codec, Int8Codec, make_codec

__all__ = ["CODECS", "Codec", "Int4Codec", "Int8Codec", "make_codec"]
