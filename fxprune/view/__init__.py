"""What users read: the :class:`~.report.Report` of a pruned model, and tables and pictures of
channel groups (:mod:`.inspect`)."""
