"""Data: where examples come from (:mod:`~plwlab.data.sources`, :mod:`~plwlab.data.alpaca`,
:mod:`~plwlab.data.chat`), the paper's dataset variants (:mod:`~plwlab.data.variants`), Rg
(:mod:`~plwlab.data.rg`), tokens with a segment per token (:mod:`~plwlab.data.segments`,
:mod:`~plwlab.data.tokenization`), batches (:mod:`~plwlab.data.batching`) and the Lightning DataModule
(:mod:`~plwlab.data.datamodule`); token statistics for ``plwlab stats`` (:mod:`~plwlab.data.stats`)."""
