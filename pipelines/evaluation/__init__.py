"""Measuring what the pipeline produced: the metrics and the report the evaluate stage writes.

``classifier`` (the judge behind CAS and rejection sampling), ``cas`` (the arithmetic of a fair
Classification Accuracy Score), ``feature_space`` (distances between image sets), ``metrics``
(reconstruction, code and classification figures), ``figures`` (training curves, code usage),
``report`` (the page layout), ``sections`` (what the evaluate report says) and ``upstream`` (the
upstream manifests the evaluation reads).
"""
