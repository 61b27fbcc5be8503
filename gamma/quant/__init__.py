"""Weight quantizers behind one interface (``interface.py``): round-to-nearest (``rtn.py``) and
GPTQ (``gptq.py``) with the Hessians it reads (``hessians.py``)."""

from __future__ import annotations

from gamma.quant.gptq import GPTQ
from gamma.quant.interface import QuantizationError, Quantizer
from gamma.quant.rtn import RTN

QUANTIZERS: dict[str, type] = {"rtn": RTN, "gptq": GPTQ}


def get_quantizer(name: str, **settings) -> Quantizer:
    """The quantizer registered under ``name`` (a key of ``QUANTIZERS``)."""
    if name not in QUANTIZERS:
        raise QuantizationError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[name](**settings)
