"""The training stage's parts: the data stream (``data``)."""
