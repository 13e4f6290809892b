"""finpipe: an orchestrated data-to-model pipeline for financial language models.

Domain logic lives in plain modules (``finpipe.market`` …); the Dagster layer that wires it into
assets, checks and resources lives in ``finpipe.defs`` and ``finpipe.definitions``.
"""

__version__ = "0.1.0"
