"""Analysis of a results table: scores (:mod:`~plwlab.analysis.scores`), the beta GLMM as glmmTMB fits it
(:mod:`~plwlab.analysis.glmm` with R's optimizer :mod:`~plwlab.analysis.nlminb`), the te(PLW, Rg) GAM
(:mod:`~plwlab.analysis.gam`), figures, ``plwlab analyze`` (:mod:`~plwlab.analysis.analyze`), PLW recommendations
(:mod:`~plwlab.analysis.recommend`) and the study's REPORT.md (:mod:`~plwlab.analysis.report`)."""
