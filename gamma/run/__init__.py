"""A run over one configuration: its resolved inputs (``workspace``), its score tables
(``tables``), its variants (``variant``) and its pictures (``plots``). The command line and the
Prefect tasks call these; nothing here imports an orchestrator or a tracking store."""
