"""pipenag: asynchronous pipeline-parallel training with the Nesterov look-ahead correction.

    python -m pipenag train --config configs/tiny.toml
"""

__version__ = "0.1.0"
