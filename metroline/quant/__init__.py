"""Weight formats as layers, and the transform that swaps them into a model (see packed.py)."""

from metroline.quant.packed import (EMBEDDABLE, PACKABLE, PackedEmbedding, PackedLinear, RawWeight,
                                    swap_in_packed_layers)

__all__ = ["EMBEDDABLE", "PACKABLE", "PackedEmbedding", "PackedLinear", "RawWeight", "swap_in_packed_layers"]
