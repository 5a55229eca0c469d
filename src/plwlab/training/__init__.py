"""Training: the config schema and its checks (:mod:`~plwlab.training.config`), the model
(:mod:`~plwlab.training.model`, :mod:`~plwlab.training.sharding`), THE loss (:mod:`~plwlab.training.loss`), the
Lightning module (:mod:`~plwlab.training.module`, :mod:`~plwlab.training.optim`), callbacks and checkpoints,
sweeps (:mod:`~plwlab.training.sweep`) and ``train()`` (:mod:`~plwlab.training.train`; ``train.py`` calls
:mod:`~plwlab.training.main`)."""
