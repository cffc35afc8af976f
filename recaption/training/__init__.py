"""The training stage's parts: the data stream (``data``), the distiller (``distiller``)
and checkpoints with the training record (``checkpoints``)."""
