"""Stage I, preference learning: the one entry (``learn``) over the relaxation (``relaxation``),
teacher forcing (``teacher``), the block loss (``loss``), the augmented Lagrangian
(``lagrangian``), the Fisher proxy warm start (``proxy``), the logit rows (``rows``), the
training loop (``loop``), resumption (``checkpoint``) and data parallelism (``shard``,
``data_parallel``)."""
