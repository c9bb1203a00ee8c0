"""The public Python API; every CLI command is a thin wrapper over one function here.

    import quantkit.api as qk
    qk.inspect("model.gguf")
    qk.quantize("model.gguf", "out.gguf", qtype="q4_0")
"""

from __future__ import annotations
