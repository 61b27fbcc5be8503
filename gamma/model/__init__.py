"""The model side: loading a model directory (``loading``), the calibration and evaluation text
(``text``), the one block walk every phase uses (``blocks``), candidate weights (``candidates``),
an assignment applied in one call and its size account (``assignment``), and the checkpoints
serving engines load (``export``)."""
