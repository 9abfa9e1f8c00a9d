"""Update compression: codecs on the flat update vector and their error feedback (``codecs``)."""
